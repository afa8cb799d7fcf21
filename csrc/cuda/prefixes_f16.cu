// Explicit instantiations: the prefix kernels (ops lse_prefixes, pointwise_prefixes) for float16 inputs.
#include "prefix_grad.cuh"
#include "prefixes.cuh"

namespace fastcl::cuda {
template cudaError_t run_lse_prefixes_forward<__half>(const LsePrefixForwardParams&, dim3, cudaStream_t);
template cudaError_t run_prefix_grad<__half, GradKind::kLse>(const PrefixGradParams&, dim3, cudaStream_t);
template cudaError_t run_prefix_grad<__half, GradKind::kSigLip>(const PrefixGradParams&, dim3, cudaStream_t);
template cudaError_t run_prefix_grad<__half, GradKind::kMW>(const PrefixGradParams&, dim3, cudaStream_t);
}  // namespace fastcl::cuda
