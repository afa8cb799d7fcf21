// Explicit instantiations: op lse_prefixes' kernels for float inputs.
#include "prefixes.cuh"

namespace fastcl::cuda {
template cudaError_t run_lse_prefixes_forward<float>(const LsePrefixForwardParams&, dim3, cudaStream_t);
template cudaError_t run_lse_prefixes_grad<float>(const PrefixGradParams&, dim3, cudaStream_t);
}  // namespace fastcl::cuda
