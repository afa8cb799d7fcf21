# fastcl_check_torch_cuda(TORCH_CUDA NVCC_CUDA NVCC): warn when torch and the nvcc that compiles
# fastcl's CUDA kernels belong to different CUDA major versions.
#
# Why it matters: fastcl._C links the CUDA runtime of that nvcc statically (CMakeLists.txt), so at
# run time the NVIDIA driver must support the nvcc's CUDA version, not torch's. A torch for CUDA 12
# runs under a driver for CUDA 12 (R550-R570); kernels built by nvcc 13 need a driver for CUDA 13
# (R580+), and the cuda backend refuses to run without one (python/fastcl/_cuda_driver.py). A newer
# driver runs both, so the build goes on; but it is rarely what was meant.
#
# TORCH_CUDA is torch.version.cuda ("12.8"), empty for a CPU build of torch, which CI builds the
# kernels against: nothing to compare then. NVCC_CUDA is CUDAToolkit_VERSION ("13.0.88").
function(fastcl_check_torch_cuda torch_cuda nvcc_cuda nvcc)
  if(NOT torch_cuda)
    return()
  endif()
  string(REGEX MATCH "^[0-9]+" torch_major "${torch_cuda}")
  string(REGEX MATCH "^[0-9]+" nvcc_major "${nvcc_cuda}")
  if(torch_major STREQUAL nvcc_major)
    return()
  endif()
  message(WARNING
    "fastcl: torch is built for CUDA ${torch_cuda}, but the CUDA kernels are compiled by nvcc "
    "${nvcc_cuda} (${nvcc}), whose runtime fastcl._C links statically. The cuda backend will need an "
    "NVIDIA driver for CUDA ${nvcc_major} or newer, and refuses to run under a driver for CUDA "
    "${torch_major} that torch itself runs on. To match torch, point CUDACXX (or CMAKE_CUDA_COMPILER) "
    "at the nvcc of CUDA ${torch_major}.x and rebuild from an empty build directory.")
endfunction()
