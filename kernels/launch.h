// Host entry points of the fastcl CUDA kernels: plain C++ (raw device pointers, sizes, strides and
// a stream; no torch), so that csrc/cuda/ops_cuda.cpp is the only file that sees both worlds.
//
// S = scale * x @ y.T for row-major x [m, d], y [n, d] (row strides ldx, ldy in elements, features
// contiguous) of one input type; pairs with row_keys[i] == col_keys[j] are keyed (nullptr: none).
// Statistics, gradients and losses are float32 whatever the input type. Every call is
// asynchronous on `stream`; temporary partials live in a caller-provided device workspace of at
// least the matching *_workspace_bytes (256-byte aligned). Results are deterministic: partials
// are merged in a fixed order, no float atomics.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fastcl::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct PairInputs {
  DType dtype;
  const void* x;
  const void* y;
  int64_t m, n, d, ldx, ldy;
  const float* scale_ptr;  // device float32 scalar, or nullptr: use scale
  float scale;
  const int64_t* row_keys;  // [m] or nullptr
  const int64_t* col_keys;  // [n] or nullptr
};

// row_lse [m] (if rows) and col_lse [n] (if cols): log-sum-exp over the non-keyed pairs
// (-inf for a line with none).
size_t lse_forward_workspace_bytes(const PairInputs& in);
cudaError_t lse_forward(const PairInputs& in, bool rows, bool cols, float* row_lse, float* col_lse, void* workspace,
                        cudaStream_t stream);

// gy = G @ y [m, d] and gx = G.T @ x [n, d] for G_ij = g_row_i exp(S_ij - row_shift_i)
// + g_col_j exp(S_ij - col_shift_j) on non-keyed pairs (a term is absent when its g is nullptr).
size_t lse_backward_workspace_bytes(const PairInputs& in);
cudaError_t lse_backward(const PairInputs& in, const float* row_shift, const float* g_row, const float* col_shift,
                         const float* g_col, float* gy, float* gx, void* workspace, cudaStream_t stream);

// kind 0 (SigLIP): keyed pairs positive; 1 (MW): keyed pairs excluded. f = S + row_bias (row_bias
// may be nullptr). row_loss [m] = sum_j loss. With want_grads, for D = g_row * d loss / dS (g_row
// nullptr: 1): gy = D @ y [m, d], gx = D.T @ x [n, d], d_bias = row sums of D [m].
size_t pointwise_workspace_bytes(const PairInputs& in, bool want_grads);
cudaError_t pointwise(const PairInputs& in, int kind, const float* row_bias, const float* g_row, bool want_grads,
                      float* row_loss, float* gy, float* gx, float* d_bias, void* workspace, cudaStream_t stream);

}  // namespace fastcl::cuda
