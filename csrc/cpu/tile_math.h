// Vectorised element-wise work on one row-major tile of S (at::vec: AVX2/AVX-512 when compiled
// for them, plain loops otherwise).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

namespace fastcl::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// tile = scale * x[r0:r1] @ y[c0:c1].T  (beta = 0: the tile's old contents are ignored)
inline void tile_logits(at::Tensor& tile, const at::Tensor& x, const at::Tensor& y, double scale,
                        int64_t r0, int64_t c0) {
  tile.addmm_(x.narrow(0, r0, tile.size(0)), y.narrow(0, c0, tile.size(1)).t(), /*beta=*/0, /*alpha=*/scale);
}

// Set tile[i][j] = value wherever row_keys[r0 + i] == col_keys[c0 + j] (no-op without keys).
template <typename T>
void fill_keyed(T* tile, int64_t rows, int64_t cols, const int64_t* row_keys, const int64_t* col_keys,
                int64_t r0, int64_t c0, T value) {
  if (row_keys == nullptr) return;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t key = row_keys[r0 + i];
    T* row = tile + i * cols;
    for (int64_t j = 0; j < cols; ++j) {
      if (col_keys[c0 + j] == key) row[j] = value;
    }
  }
}

// Set tile[i][j] = value for each column c0 + j that row r0 + i lists in exclude [rows, width]
// (-1 padding and columns outside the tile are passed over; no-op without a list).
template <typename T>
void fill_listed(T* tile, int64_t rows, int64_t cols, const int64_t* exclude, int64_t width, int64_t r0,
                 int64_t c0, T value) {
  if (exclude == nullptr) return;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t* listed = exclude + (r0 + i) * width;
    for (int64_t e = 0; e < width; ++e) {
      const int64_t j = listed[e] - c0;
      if (j >= 0 && j < cols) tile[i * cols + j] = value;
    }
  }
}

// Negate tile[i][j] wherever the keys match (SigLIP's positives).
template <typename T>
void negate_keyed(T* tile, int64_t rows, int64_t cols, const int64_t* row_keys, const int64_t* col_keys,
                  int64_t r0, int64_t c0) {
  if (row_keys == nullptr) return;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t key = row_keys[r0 + i];
    T* row = tile + i * cols;
    for (int64_t j = 0; j < cols; ++j) {
      if (col_keys[c0 + j] == key) row[j] = -row[j];
    }
  }
}

// tile[i][j] += bias[i] (bias already offset to the tile's first row; nullptr: no-op).
template <typename T>
void add_row_bias(T* tile, int64_t rows, int64_t cols, const T* bias) {
  if (bias == nullptr) return;
  for (int64_t i = 0; i < rows; ++i) {
    const T b = bias[i];
    T* row = tile + i * cols;
    for (int64_t j = 0; j < cols; ++j) row[j] += b;
  }
}

// S into the softplus argument f in place: SigLIP f = -z S (z = +1 on the keyed pairs, its positives,
// -1 elsewhere); MW f = S with the keyed pairs (its excluded targets) at -inf, whose loss is 0.
template <typename T>
void pointwise_input(T* tile, int64_t rows, int64_t cols, bool siglip, const int64_t* row_keys,
                     const int64_t* col_keys, int64_t r0, int64_t c0) {
  if (siglip) {
    negate_keyed(tile, rows, cols, row_keys, col_keys, r0, c0);
  } else {
    fill_keyed(tile, rows, cols, row_keys, col_keys, r0, c0, -kInf<T>);
  }
}

// Over a tile of f (SigLIP: -z S; MW: S with the excluded pairs at -inf): adds each row's sum of
// softplus(f) to sums[i]; with want_grads the tile becomes weight[i] * sigmoid(f) = weight * d loss / df
// (sums, weight offset to the tile's first row; weight nullptr: 1).
template <typename T>
void softplus_tile(T* tile, int64_t rows, int64_t cols, T* sums, const T* weight, bool want_grads) {
  constexpr int64_t kW = Vec<T>::size();
  const Vec<T> zero(T(0)), one(T(1));
  for (int64_t i = 0; i < rows; ++i) {
    T* row = tile + i * cols;
    // With e = exp(-|f|): loss softplus(f) = max(f, 0) + log1p(e), and d loss / d f = sigmoid(f)
    // = 1 / (1 + e) for f >= 0, e / (1 + e) otherwise: one exp per element for both.
    const Vec<T> scale(weight != nullptr ? weight[i] : T(1));
    Vec<T> loss(T(0));
    for (int64_t j = 0; j < cols; j += kW) {
      const int64_t w = std::min<int64_t>(kW, cols - j);
      const Vec<T> f = Vec<T>::loadu(row + j, w);
      const Vec<T> e = f.abs().neg().exp();
      loss = loss + Vec<T>::set(zero, at::vec::maximum(f, zero) + e.log1p(), w);
      if (want_grads) {
        const Vec<T> r = one / (one + e);
        const Vec<T> sigmoid = Vec<T>::blendv(e * r, r, f >= zero);
        (sigmoid * scale).store(row + j, w);
      }
    }
    sums[i] += at::vec::vec_reduce_all<T>([](Vec<T>& p, Vec<T>& q) { return p + q; }, loss);
  }
}

// An infinite maximum shifts by 0: an all -inf line then sums to 0 (lse -inf), a +inf entry to
// +inf (lse +inf); NaN stays NaN.
template <typename T>
T finite_shift(T max) { return std::isinf(max) ? T(0) : max; }

template <typename T>
Vec<T> finite_shift(Vec<T> max) {
  return Vec<T>::blendv(max, Vec<T>(T(0)), max.abs() == Vec<T>(kInf<T>));
}

// Online log-sum-exp state: the sum is s * exp(m). Merging a block's (shift, sum) in a fixed order
// keeps results deterministic; NaN in a block makes its sum NaN, which propagates.
template <typename T>
void lse_merge(T& m, T& s, T block_shift, T block_sum) {
  if (block_sum == T(0)) return;
  if (s == T(0)) {
    m = block_shift;
    s = block_sum;
    return;
  }
  const T top = std::max(m, block_shift);
  s = s * std::exp(m - top) + block_sum * std::exp(block_shift - top);
  m = top;
}

// Row i of the tile: returns (shift, sum_j exp(tile[i][j] - shift)).
template <typename T>
std::pair<T, T> row_shift_sum(const T* row, int64_t cols) {
  const T max = at::vec::reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, row, cols);
  const T shift = finite_shift(max);
  const T sum = at::vec::map_reduce_all<T>([shift](Vec<T> v) { return (v - Vec<T>(shift)).exp(); },
                                           [](Vec<T>& a, Vec<T>& b) { return a + b; }, row, cols);
  return {shift, sum};
}

// Column statistics of the tile, merged into the running state m[c0 + j], s[c0 + j].
template <typename T>
void merge_column_stats(const T* tile, int64_t rows, int64_t cols, T* m, T* s, int64_t c0) {
  constexpr int64_t kW = Vec<T>::size();
  T shift_buf[kW], sum_buf[kW];
  for (int64_t j = 0; j < cols; j += kW) {
    const int64_t w = std::min<int64_t>(kW, cols - j);
    Vec<T> max(-kInf<T>);
    for (int64_t i = 0; i < rows; ++i) max = at::vec::maximum(max, Vec<T>::loadu(tile + i * cols + j, w));
    const Vec<T> shift = finite_shift(max);
    Vec<T> sum(T(0));
    for (int64_t i = 0; i < rows; ++i) sum = sum + (Vec<T>::loadu(tile + i * cols + j, w) - shift).exp();
    shift.store(shift_buf, w);
    sum.store(sum_buf, w);
    for (int64_t q = 0; q < w; ++q) lse_merge(m[c0 + j + q], s[c0 + j + q], shift_buf[q], sum_buf[q]);
  }
}

// Row statistics of the tile merged into the running state m[r0 + i], s[r0 + i].
template <typename T>
void merge_row_stats(const T* tile, int64_t rows, int64_t cols, T* m, T* s, int64_t r0) {
  for (int64_t i = 0; i < rows; ++i) {
    const auto [shift, sum] = row_shift_sum(tile + i * cols, cols);
    lse_merge(m[r0 + i], s[r0 + i], shift, sum);
  }
}

// In place: tile[i][j] = g_row[r0+i] exp(S - row_shift[r0+i]) + g_col[c0+j] exp(S - col_shift[c0+j]),
// each term only if its pointers are given: the gradient of sum g * lse through this tile of S.
template <typename T>
void softmax_grad_tile(T* tile, int64_t rows, int64_t cols, const T* g_row, const T* row_shift, int64_t r0,
                       const T* g_col, const T* col_shift, int64_t c0) {
  constexpr int64_t kW = Vec<T>::size();
  for (int64_t i = 0; i < rows; ++i) {
    T* row = tile + i * cols;
    const Vec<T> ga(g_row ? g_row[r0 + i] : T(0)), sh(g_row ? row_shift[r0 + i] : T(0));
    for (int64_t j = 0; j < cols; j += kW) {
      const int64_t w = std::min<int64_t>(kW, cols - j);
      const Vec<T> v = Vec<T>::loadu(row + j, w);
      Vec<T> out(T(0));
      if (g_row) out = ga * (v - sh).exp();
      if (g_col) out = out + Vec<T>::loadu(g_col + c0 + j, w) * (v - Vec<T>::loadu(col_shift + c0 + j, w)).exp();
      out.store(row + j, w);
    }
  }
}

}  // namespace fastcl::cpu
