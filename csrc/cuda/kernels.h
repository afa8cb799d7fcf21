// The kernel runners, one explicit instantiation per input type in lse_forward_<t>.cu and
// pair_grad_<t>.cu; launch.cu reaches them through these declarations (no template bodies there).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "params.h"

// kernel<<<grid, block, smem, stream>>>(args) spelled FASTCL_LAUNCH(grid, block, smem, stream, kernel)(args):
// the host execution's shim (host/include/cuda_runtime.h) defines it as a lane-by-lane run.
#ifndef FASTCL_LAUNCH
#define FASTCL_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace fastcl::cuda {

// grid (cdiv(rows_a, kBlockA), splits): row and column (shift, sum) partials of the masked S.
template <typename T>
cudaError_t run_lse_forward(const LseForwardParams& p, dim3 grid, cudaStream_t stream);

// grid (cdiv(rows_a, kBlockA) * cdiv(rows_b, kBlockB)): the G tiles of one block, pointwise row sums.
template <typename T, GradKind kKind>
cudaError_t run_pair_grad(const GradParams& p, dim3 grid, cudaStream_t stream);

// Op lse_prefixes (prefixes.cuh): grid (cdiv(rows_a, kBlockA), splits), per prefix (shift, sum) partials.
template <typename T>
cudaError_t run_lse_prefixes_forward(const LsePrefixForwardParams& p, dim3 grid, cudaStream_t stream);

// prefix_grad.cuh: grid (cdiv(rows_a, kBlockA) * cdiv(rows_b, kBlockB)): the K suffix-summed H blocks,
// factor-gradient partials (pointwise_prefixes: and the loss partials).
template <typename T, GradKind kKind>
cudaError_t run_prefix_grad(const PrefixGradParams& p, dim3 grid, cudaStream_t stream);

}  // namespace fastcl::cuda
