// Explicit instantiation: lse_forward for float inputs (one translation unit per input type).
#include "lse_forward.cuh"

namespace fastcl::cuda {
template cudaError_t run_lse_forward<float>(const LseForwardParams&, dim3, cudaStream_t);
}  // namespace fastcl::cuda
