// Explicit instantiations: the gradient / pointwise kernels for __nv_bfloat16 inputs.
#include "pair_grad.cuh"

namespace fastcl::cuda {
template cudaError_t run_pair_grad<__nv_bfloat16, GradKind::kLse>(const GradParams&, dim3, cudaStream_t);
template cudaError_t run_pair_grad<__nv_bfloat16, GradKind::kSigLip>(const GradParams&, dim3, cudaStream_t);
template cudaError_t run_pair_grad<__nv_bfloat16, GradKind::kMW>(const GradParams&, dim3, cudaStream_t);
}  // namespace fastcl::cuda
