// Explicit instantiation: lse_forward for __nv_bfloat16 inputs (one translation unit per input type).
#include "lse_forward.cuh"

namespace fastcl::cuda {
template cudaError_t run_lse_forward<__nv_bfloat16>(const LseForwardParams&, dim3, cudaStream_t);
}  // namespace fastcl::cuda
