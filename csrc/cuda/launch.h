// Host entry points of the fastcl CUDA kernels: plain C++ (raw device pointers, sizes, strides and
// a stream; no torch), so that csrc/cuda/ops_cuda.cpp is the only file that sees both worlds.
//
// S = scale * x @ y.T for row-major x [m, d], y [n, d] (row strides ldx, ldy in elements, features
// contiguous) of one input type; pairs with row_keys[i] == col_keys[j] are keyed (nullptr: none), and
// pairs (i, exclude[i, e]) listed (op lse_exclude; nullptr: none): both leave the log-sum-exp.
// x, y, ldx, ldy and d must be whole 16-byte chunks (plan.h aligned_features: the host pads a copy
// otherwise); a launcher given anything else returns cudaErrorInvalidValue. Statistics, gradients
// and losses are float32 whatever the input type. Every call is asynchronous on `stream`; results
// are deterministic: partials are merged in a fixed order, no float atomics.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "params.h"

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
  const int64_t* exclude;   // [m, exclude_width] column indices into y, -1 padded, or nullptr (kLse only)
  int64_t exclude_width;
};

// row_lse [m] (if rows) and col_lse [n] (if cols): log-sum-exp over the pairs neither keyed nor listed
// (-inf for a line with none). S is visited in blocks (plan.h forward_block) whose partials fit `budget`
// bytes; the workspace (at least lse_forward_workspace_bytes, 256-byte aligned) holds them and a
// running (shift, sum) per row and column: O(m + n) + budget, never O(m n).
size_t lse_forward_workspace_bytes(const PairInputs& in, bool rows, bool cols, int64_t budget);
cudaError_t lse_forward(const PairInputs& in, bool rows, bool cols, float* row_lse, float* col_lse, void* workspace,
                        int64_t budget, cudaStream_t stream);

// What G = dLoss/dS is made of (vectors over all of x's rows [m] or y's rows [n]; launch.cu offsets
// them to the block):
//   kLse:     G_ij = g_row_i exp(S_ij - row_shift_i) + g_col_j exp(S_ij - col_shift_j) on pairs neither
//             keyed nor listed (a term is absent when its g is nullptr);
//   kSigLip:  keyed pairs positive, kMW: keyed pairs excluded; f = S + row_bias (nullptr: 0),
//             G = row_weight * d softplus(+-f) / dS (row_weight nullptr: 1).
struct GradTerms {
  GradKind kind;
  const float *row_shift, *g_row, *col_shift, *g_col;
  const float *row_bias, *row_weight;
  const float* g_scale;  // device scalar: G is stored times it (a power of two), or nullptr: 1
};

struct BlockRange {
  int64_t r0, r1, c0, c1;  // rows [r0, r1) of x against rows [c0, c1) of y
};

// One block of G: g [r1 - r0, ldg] of the input type (float for float32 inputs), or nullptr;
// pointwise kinds also write row_loss and row_dsum [r1 - r0, cdiv(c1 - c0, kBlockB)] partials
// (each may be nullptr): the loss and G (unscaled) summed over each 64-column tile.
cudaError_t grad_block(const PairInputs& in, const GradTerms& terms, const BlockRange& block, void* g, int64_t ldg,
                       float* row_loss, float* row_dsum, cudaStream_t stream);

// out[0] = 2^k, out[1] = 2^-k with k = plan::grad_scale_exponent(extra + max|g_row| + max|g_col|)
// (a null vector counts 0): the float16 G scale, computed on the device (no host sync).
cudaError_t grad_scale(const float* g_row, int64_t m, const float* g_col, int64_t n, float extra, float* out,
                       cudaStream_t stream);

// Op lse_prefixes: K nested prefixes d_1 < ... < d_K of the features, laid out in x and y (the
// kernels' copies) so that prefix q's features end at ends[q] (host array, increasing, in elements;
// plan.h prefix_ends: every segment starts on a 16-byte chunk and is zero past its own features);
// S^q = scale a^q_i b^q_j <x_i[:ends[q]], y_j[:ends[q]]> with factors row_scale [K, m], col_scale
// [K, n] (float32, contiguous, device; both nullptr: 1).
struct PrefixInputs {
  int64_t prefixes;
  const int64_t* ends;
  const float* row_scale;
  const float* col_scale;
};

// row_lse [K, m] (if rows) and col_lse [K, n] (if cols), one pass over the features per launch of at
// most kMaxPrefixes prefixes (larger K: groups, each from feature 0). Keys and lists are not taken.
size_t lse_forward_prefixes_workspace_bytes(const PairInputs& in, int64_t prefixes, bool rows, bool cols,
                                            int64_t budget);
cudaError_t lse_forward_prefixes(const PairInputs& in, const PrefixInputs& pre, bool rows, bool cols, float* row_lse,
                                 float* col_lse, void* workspace, int64_t budget, cudaStream_t stream);

// One block and the prefixes [q0, q1) (q1 - q0 <= kMaxPrefixes; the first segment starts at feature 0),
// T^k = scale a^k b^k P^k:
//   kLse:     G^k = g_row^k exp(T^k - row_shift^k) + g_col^k exp(T^k - col_shift^k) ([K, m] / [K, n]
//             vectors, a term absent when its g is nullptr);
//   kSigLip / kMW (op pointwise_prefixes): G^k = g_row^k d loss(T^k + row_bias) / dS as GradTerms'
//             pointwise kinds (g_row [K, m] the per-prefix row weight, nullptr: 1; keys from `in`).
// g holds q1 - q0 blocks [r1 - r0, ldg] of the input type, g_stride elements apart, each the suffix
// sum sum_{q <= k < q1} a^k b^k G^k times *g_scale (nullptr: 1), or is nullptr (no H); row_gs
// [q1 - q0][r1 - r0][cdiv(c1 - c0, kBlockB)] and col_gs [q1 - q0][cdiv(r1 - r0, kBlockA)][c1 - c0] the
// partial row and column sums of G^k T^k; pointwise: row_loss and row_dsum (may be nullptr) the loss's
// and G^k's row sums, laid out as row_gs.
struct PrefixTerms {
  GradKind kind;
  const float *row_shift, *g_row, *col_shift, *g_col;
  const float* row_bias;
  const float* g_scale;
};
cudaError_t grad_block_prefixes(const PairInputs& in, const PrefixInputs& pre, int64_t q0, int64_t q1,
                                const PrefixTerms& terms, const BlockRange& block, void* g, int64_t ldg,
                                int64_t g_stride, float* row_gs, float* col_gs, float* row_loss, float* row_dsum,
                                cudaStream_t stream);

}  // namespace fastcl::cuda
