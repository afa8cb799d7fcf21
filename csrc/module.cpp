// fastcl._C: the compiled half of fastcl. For now it reports what this build contains;
// the CPU and CUDA kernels register themselves here as they land.
#include <pybind11/pybind11.h>

#include <ATen/Parallel.h>
#include <torch/version.h>

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = FASTCL_VERSION;
  info["torch_version"] = TORCH_VERSION;  // the torch this extension was compiled against
  info["cuda_archs"] = std::string(FASTCL_CUDA_ARCHS);  // "" when built without CUDA
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
