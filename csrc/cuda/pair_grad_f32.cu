// Explicit instantiations: the gradient / pointwise kernels for float inputs.
#include "pair_grad.cuh"

namespace fastcl::cuda {
template cudaError_t run_pair_grad<float, GradKind::kLse>(const GradParams&, dim3, cudaStream_t);
template cudaError_t run_pair_grad<float, GradKind::kSigLip>(const GradParams&, dim3, cudaStream_t);
template cudaError_t run_pair_grad<float, GradKind::kMW>(const GradParams&, dim3, cudaStream_t);
}  // namespace fastcl::cuda
