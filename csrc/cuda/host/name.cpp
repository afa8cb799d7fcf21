// The torch.ops namespace of one build of the host execution (module.cpp): tests/cuda_host.py
// compiles this file with -DFASTCL_HOST_LIBRARY='"fastcl_cuda_host_<hash of the build>"'.
#ifndef FASTCL_HOST_LIBRARY
#define FASTCL_HOST_LIBRARY "fastcl_cuda_host"
#endif

const char* fastcl_host_library_name() { return FASTCL_HOST_LIBRARY; }
