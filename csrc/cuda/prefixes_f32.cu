// Explicit instantiations: the prefix kernels (ops lse_prefixes, pointwise_prefixes) for float inputs.
#include "prefix_grad.cuh"
#include "prefixes.cuh"

namespace fastcl::cuda {
template cudaError_t run_lse_prefixes_forward<float>(const LsePrefixForwardParams&, dim3, cudaStream_t);
template cudaError_t run_prefix_grad<float, GradKind::kLse>(const PrefixGradParams&, dim3, cudaStream_t);
template cudaError_t run_prefix_grad<float, GradKind::kSigLip>(const PrefixGradParams&, dim3, cudaStream_t);
template cudaError_t run_prefix_grad<float, GradKind::kMW>(const PrefixGradParams&, dim3, cudaStream_t);
}  // namespace fastcl::cuda
