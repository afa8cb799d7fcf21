// Explicit instantiations: op lse_prefixes' kernels for float16 inputs.
#include "prefixes.cuh"

namespace fastcl::cuda {
template cudaError_t run_lse_prefixes_forward<__half>(const LsePrefixForwardParams&, dim3, cudaStream_t);
template cudaError_t run_lse_prefixes_grad<__half>(const PrefixGradParams&, dim3, cudaStream_t);
}  // namespace fastcl::cuda
