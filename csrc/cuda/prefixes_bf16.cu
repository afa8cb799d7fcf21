// Explicit instantiations: op lse_prefixes' kernels for bfloat16 inputs.
#include "prefixes.cuh"

namespace fastcl::cuda {
template cudaError_t run_lse_prefixes_forward<__nv_bfloat16>(const LsePrefixForwardParams&, dim3, cudaStream_t);
template cudaError_t run_lse_prefixes_grad<__nv_bfloat16>(const PrefixGradParams&, dim3, cudaStream_t);
}  // namespace fastcl::cuda
