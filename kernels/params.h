// Parameters of the fastcl CUDA kernels: plain structs of pointers, sizes and strides (no torch).
//
// Every kernel works on S = scale * A @ B.T for a row-major A [rows_a, d] (the "A side", whose
// rows a CTA owns) and B [rows_b, d]. The engine's x, y map to (A, B) = (x, y) for row statistics
// and G @ y, and to (A, B) = (y, x) for G.T @ x: the same kernel, launched with the roles swapped.
#pragma once

#include <cstdint>

namespace fastcl::cuda {

// Tile shape shared by every kernel: 4 warps, each owning 16 rows of a 64 x 64 tile of S.
constexpr int kBlockA = 64;      // rows of A per CTA (tile rows)
constexpr int kBlockB = 64;      // rows of B per tile (tile columns)
constexpr int kBlockK = 32;      // features per pipeline stage
constexpr int kThreads = 128;    // 4 warps
constexpr int kBlockD = 128;     // features of dA accumulated per CTA (gradient kernels)

struct PairParams {
  const void* a;                 // [rows_a, lda] of T; row stride lda (elements), features contiguous
  const void* b;                 // [rows_b, ldb] of T
  int64_t rows_a, rows_b, d, lda, ldb;
  const float* scale_ptr;        // device scalar, or nullptr: use scale
  float scale;
  const int64_t* keys_a;         // [rows_a] or nullptr (then keys_b is ignored)
  const int64_t* keys_b;         // [rows_b]
  bool vec16;                    // rows 16-byte aligned: tiles load with 16-byte cp.async
  int64_t tiles_per_split;       // B tiles visited by one CTA (blockIdx.y / blockIdx.z = split)
};

// Forward log-sum-exp. Online (shift, sum) partials, merged later in a fixed order:
// row partials [splits, rows_a] (one per B range), column partials [cdiv(rows_a, 64), rows_b].
struct LseForwardParams : PairParams {
  bool rows, cols;
  float* row_shift;  // partial shifts (finite: an infinite maximum shifts by 0)
  float* row_sum;    // partial sums of exp(S - shift)
  float* col_shift;
  float* col_sum;
};

enum class GradKind : int { kLse = 0, kSigLip = 1, kMW = 2 };

// Gradient kernels: out[split] = G @ B restricted to this split's B range, where
//   kLse:     G_ab = ga_a exp(S_ab - sa_a) + gb_b exp(S_ab - sb_b)  (either term absent if its g is null)
//   kSigLip / kMW: G = w * d loss(S + bias) / dS with bias and w on the engine's row side
//             (the A side if a_is_row, else the B side); see pointwise.cuh.
struct GradParams : PairParams {
  const float* ga;  const float* sa;   // [rows_a] or nullptr
  const float* gb;  const float* sb;   // [rows_b] or nullptr
  const float* bias;                   // [engine rows] or nullptr (pointwise)
  const float* weight;                 // [engine rows] or nullptr = 1 (pointwise)
  bool a_is_row;                       // pointwise: A holds the engine's rows
  bool accumulate;                     // compute out (false: pointwise loss sums only)
  float* out;                          // [splits, rows_a, d] (split-major partials) or nullptr
  float* row_loss;                     // [splits, rows_a] pointwise loss sums, or nullptr
  float* row_dsum;                     // [splits, rows_a] row sums of G, or nullptr
};

}  // namespace fastcl::cuda
