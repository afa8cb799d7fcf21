// Explicit instantiations: the gradient / pointwise kernels for __half inputs.
#include "pair_grad.cuh"

namespace fastcl::cuda {
template cudaError_t run_pair_grad<__half, GradKind::kLse>(const GradParams&, dim3, cudaStream_t);
template cudaError_t run_pair_grad<__half, GradKind::kSigLip>(const GradParams&, dim3, cudaStream_t);
template cudaError_t run_pair_grad<__half, GradKind::kMW>(const GradParams&, dim3, cudaStream_t);
}  // namespace fastcl::cuda
