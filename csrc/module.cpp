// fastcl._C: the compiled half of fastcl. Importing it registers the engine's operators
// (torch.ops.fastcl.*, see ops.cpp); this module itself reports what the build contains.
#include <pybind11/pybind11.h>

#include <ATen/Parallel.h>
#include <torch/version.h>

#include "cuda/gemm_path.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = FASTCL_VERSION;
  info["torch_version"] = TORCH_VERSION;  // the torch this extension was compiled against
  info["cuda_archs"] = std::string(FASTCL_CUDA_ARCHS);  // "" when built without CUDA
  info["cuda_version"] = std::string(FASTCL_CUDA_VERSION);  // the toolkit (static cudart); "" without CUDA
  // How the CUDA kernels' gradient GEMMs take 16-bit G blocks ("out_dtype" or "widened", cuda/gemm_path.h):
  // the same header and torch as ops_cuda.cpp, so the same choice. "" without CUDA.
  info["cuda_gemm"] = std::string(FASTCL_CUDA_ARCHS).empty() ? "" : FASTCL_CUDA_GEMM;
  info["cpu_capability"] = FASTCL_CPU_CAPABILITY;       // what the CPU kernels were compiled for
  info["ops"] = py::make_tuple("lse_forward", "lse_backward", "lse_forward_excluding", "lse_backward_excluding",
                               "lse_forward_prefixes", "lse_backward_prefixes",
                               "lse_forward_symmetric",
                               "lse_backward_symmetric", "pointwise", "pointwise_prefixes", "topk", "maxsim_forward",
                               "maxsim_backward");  // torch.ops.fastcl.*
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["compiler"] = __VERSION__;
  info["cxx_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
  info["parallel"] = at::get_parallel_info();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastcl compiled extension";
  m.def("build_info", &build_info, "What this build of fastcl._C contains (versions, CUDA archs, OpenMP).");
}
