// Explicit instantiations: the prefix kernels (ops lse_prefixes, pointwise_prefixes) for bfloat16 inputs.
#include "prefix_grad.cuh"
#include "prefixes.cuh"

namespace fastcl::cuda {
template cudaError_t run_lse_prefixes_forward<__nv_bfloat16>(const LsePrefixForwardParams&, dim3, cudaStream_t);
template cudaError_t run_prefix_grad<__nv_bfloat16, GradKind::kLse>(const PrefixGradParams&, dim3, cudaStream_t);
template cudaError_t run_prefix_grad<__nv_bfloat16, GradKind::kSigLip>(const PrefixGradParams&, dim3, cudaStream_t);
template cudaError_t run_prefix_grad<__nv_bfloat16, GradKind::kMW>(const PrefixGradParams&, dim3, cudaStream_t);
}  // namespace fastcl::cuda
