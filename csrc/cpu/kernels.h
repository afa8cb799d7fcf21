// The CPU engine's kernels: plain structs in, tensors out. Inputs are already validated,
// contiguous and in the math dtype (float32 or float64); see ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace fastcl::cpu {

// S = scale * x @ y.T; pairs with row_keys[i] == col_keys[j] are "keyed" (nullptr: none).
struct PairArgs {
  at::Tensor x, y;  // [M, D], [N, D]
  double scale;
  const int64_t* row_keys;
  const int64_t* col_keys;
};

struct LseArgs : PairArgs {
  bool rows, cols;  // which log-sum-exps (over the non-keyed pairs) are wanted
  // Row i's listed columns exclude[i * exclude_width + e] (-1 padded) leave the statistics too
  // (op lse_exclude: decoupled positives, a guide's false negatives); nullptr: none.
  const int64_t* exclude = nullptr;
  int64_t exclude_width = 0;
};

struct LseGrads {
  at::Tensor row_shift, col_shift;  // the saved lse with -inf replaced by 0
  at::Tensor g_row, g_col;          // upstream gradients of the row and column lse
};

// -> (row_lse [M] or [0], col_lse [N] or [0])
std::tuple<at::Tensor, at::Tensor> lse_forward(const LseArgs& a);
// -> (G @ y [M, D], G.T @ x [N, D]) with G = d(sum g * lse) / dS
std::tuple<at::Tensor, at::Tensor> lse_backward(const LseArgs& a, const LseGrads& g);

// K nested prefixes d_1 < ... < d_K <= D (Matryoshka):
//   T^k_ij = scale * row_scale[k, i] * col_scale[k, j] * <x_i[:d_k], y_j[:d_k]>
struct Prefixes {
  at::Tensor x, y;  // [M, D], [N, D]
  double scale;
  std::vector<int64_t> dims;
  at::Tensor row_scale, col_scale;  // [K, M], [K, N] contiguous in x's dtype, or both undefined (= 1)
};

// The log-sum-exps of S^k = T^k, no keys.
struct PrefixArgs : Prefixes {
  bool rows, cols;
};

// -> (row_lse [K, M] or [K, 0], col_lse [K, N] or [K, 0]), one pass over the features
std::tuple<at::Tensor, at::Tensor> lse_forward_prefixes(const PrefixArgs& a);
// -> (gy [M, D], gx [N, D], row_gs [K, M], col_gs [K, N]) for G^k = d(sum g^k * lse^k) / dS^k (the
//    LseGrads hold [K, M] / [K, N]): features [d_{s-1}, d_s) of gy are sum_{k >= s} H^k @ y there,
//    H^k = row_scale^k col_scale^k.T * G^k (0 past d_K), gx likewise with x; row_gs and col_gs the
//    row and column sums of G^k * S^k.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lse_backward_prefixes(const PrefixArgs& a,
                                                                                 const LseGrads& g);

// Symmetric S = scale * z @ z.T (a.x is z; a.y is ignored, keys are a.row_keys on both sides):
// -> row_lse [N], visiting only tiles on and above the diagonal.
at::Tensor lse_forward_symmetric(const PairArgs& a);
// -> (G + G.T) @ z for G = d(sum g * lse) / dS
at::Tensor lse_backward_symmetric(const PairArgs& a, const at::Tensor& shift, const at::Tensor& g);

enum class PointwiseKind : int64_t { kSigLip = 0, kMW = 1 };

struct PointwiseArgs : PairArgs {
  at::Tensor row_bias;  // [M] added to S's rows, or undefined
  PointwiseKind kind;   // siglip: keyed pairs positive; mw: keyed pairs excluded
  at::Tensor g_row;     // [M] weights of each row's loss in the gradients, or undefined (= 1)
  bool want_grads;
};

// -> (per-row loss sums [M], D @ y, D.T @ x, row sums of D) with D = weighted d loss / dS;
//    the last three are empty unless want_grads.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pointwise(const PointwiseArgs& a);

// The pointwise loss of S^k = T^k + row_bias (Prefixes) at each prefix, keyed as PointwiseArgs.
struct PointwisePrefixArgs : Prefixes {
  const int64_t* row_keys;
  const int64_t* col_keys;
  at::Tensor row_bias;  // [M], or undefined
  PointwiseKind kind;
  at::Tensor g_row;     // [K, M] weights of each prefix's row losses in the gradients, or undefined (= 1)
  bool want_grads;
};

// -> (per-row loss sums [K, M], gy [M, D], gx [N, D], d_bias [M], row_gs [K, M], col_gs [K, N]), one pass
//    over the features, for D^k = weighted d loss / dS^k: features [d_{s-1}, d_s) of gy are
//    sum_{k >= s} H^k @ y there, H^k = row_scale^k col_scale^k.T * D^k (0 past d_K), gx likewise with x;
//    d_bias the row sums of sum_k D^k; row_gs and col_gs the row and column sums of D^k * T^k. All but
//    the first are empty unless want_grads.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pointwise_prefixes(
    const PointwisePrefixArgs& a);

// Streaming top-k: per row of S = scale * x @ y.T, the k largest entries over the eligible columns
// (not j == i when exclude_diagonal, not row_keys[i] == col_keys[j]), largest first, NaN above all,
// ties to the lower column.
struct TopkArgs : PairArgs {
  int64_t k;
  bool exclude_diagonal;
};

// -> (values [M, k] in x's dtype, column indices [M, k] int64)
std::tuple<at::Tensor, at::Tensor> topk(const TopkArgs& a);

// Late interaction: s_ij = sum_{a real} max_{t real} <q_ia, d_jt>, ties to the lowest t.
struct MaxSimArgs {
  at::Tensor q, d;      // [B, Lq, D], [N, Ld, D]
  const bool* q_mask;   // [B, Lq] true = real token, or nullptr (all real)
  const bool* d_mask;   // [N, Ld] likewise
};

// -> s [B, N]; a document without real tokens scores -inf against queries with real tokens
at::Tensor maxsim_forward(const MaxSimArgs& a);
// -> (dq [B, Lq, D], dd [N, Ld, D]) for upstream g [B, N]; each empty unless needed
std::tuple<at::Tensor, at::Tensor> maxsim_backward(const MaxSimArgs& a, const at::Tensor& g, bool need_q,
                                                   bool need_d);

}  // namespace fastcl::cpu
