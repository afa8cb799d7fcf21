// What the one-pass prefix kernels (lse_prefixes.cpp, pointwise_prefixes.cpp) share: a tile's P grows
// segment [d_{k-1}, d_k) by segment, each T^k = scale a^k b^k P^k is read off it on the way, and the
// backward's K tiles H^k = a^k b^k G^k feed segment s's gradient GEMMs with their suffix sums
// sum_{k >= s} H^k. The executable description is backend/chunked/prefixes.py.
#pragma once

#include <algorithm>
#include <vector>

#include "cpu/grid.h"
#include "cpu/kernels.h"
#include "cpu/tile_math.h"

namespace fastcl::cpu {

// out = scale * a_i * b_j * p over a rows x cols tile (a, b nullptr: 1).
template <typename T>
void scaled_tile(T* out, const T* p, int64_t rows, int64_t cols, T scale, const T* a, const T* b) {
  constexpr int64_t kW = Vec<T>::size();
  for (int64_t i = 0; i < rows; ++i) {
    const Vec<T> f(a ? scale * a[i] : scale);
    const T* in = p + i * cols;
    T* o = out + i * cols;
    for (int64_t j = 0; j < cols; j += kW) {
      const int64_t w = std::min<int64_t>(kW, cols - j);
      Vec<T> v = Vec<T>::loadu(in + j, w) * f;
      if (b) v = v * Vec<T>::loadu(b + j, w);
      v.store(o + j, w);
    }
  }
}

// Row sums (into row_gs[i]) and column sums (into col_gs[j]) of g * s, and of g alone into g_sums[i]
// (nullptr: not wanted); then g *= a_i * b_j.
template <typename T>
void factor_grads(T* g, const T* s, int64_t rows, int64_t cols, const T* a, const T* b, T* row_gs, T* col_gs,
                  T* g_sums = nullptr) {
  constexpr int64_t kW = Vec<T>::size();
  const auto add = [](Vec<T>& x, Vec<T>& y) { return x + y; };
  for (int64_t i = 0; i < rows; ++i) {
    T* gi = g + i * cols;
    const T* si = s + i * cols;
    Vec<T> row_sum(T(0)), g_sum(T(0));
    const Vec<T> fa(a ? a[i] : T(1));
    for (int64_t j = 0; j < cols; j += kW) {
      const int64_t w = std::min<int64_t>(kW, cols - j);
      Vec<T> gv = Vec<T>::loadu(gi + j, w);
      // loadu zero-fills past w, so the row sums' extra lanes add 0
      const Vec<T> gs = gv * Vec<T>::loadu(si + j, w);
      row_sum = row_sum + gs;
      if (g_sums) g_sum = g_sum + gv;
      (Vec<T>::loadu(col_gs + j, w) + gs).store(col_gs + j, w);
      if (a) (gv * fa * Vec<T>::loadu(b + j, w)).store(gi + j, w);
    }
    row_gs[i] += at::vec::vec_reduce_all<T>(add, row_sum);
    if (g_sums) g_sums[i] += at::vec::vec_reduce_all<T>(add, g_sum);
  }
}

struct Segment {
  int64_t start, width;
};

inline std::vector<Segment> segments(const std::vector<int64_t>& dims) {
  std::vector<Segment> out;
  int64_t start = 0;
  for (int64_t d : dims) {
    out.push_back({start, d - start});
    start = d;
  }
  return out;
}

// p (+)= x[tile rows, seg] @ y[tile cols, seg].T; the first segment overwrites (beta = 0 ignores p).
inline void grow(at::Tensor& p, const Prefixes& a, const Tile& t, const Segment& seg, bool first) {
  p.addmm_(a.x.narrow(0, t.r0, t.rows()).narrow(1, seg.start, seg.width),
           a.y.narrow(0, t.c0, t.cols()).narrow(1, seg.start, seg.width).t(), first ? 0 : 1, 1);
}

// Prefix q's factors from `start` of a [K, length] factor tensor (undefined: nullptr, i.e. 1).
template <typename T>
const T* factor(const at::Tensor& f, int64_t q, int64_t length, int64_t start) {
  return f.defined() ? f.template data_ptr<T>() + q * length + start : nullptr;
}

// h [K, rows, cols] holds the tile's H^k: H^q += H^{q+1} (the suffix sums, last to first), then
// segment q's two gradient GEMMs into gy and gx.
inline void feature_grads(at::Tensor& h, const Prefixes& a, const Tile& t, const std::vector<Segment>& segs,
                          at::Tensor& gy, at::Tensor& gx) {
  for (int64_t q = static_cast<int64_t>(segs.size()) - 1; q >= 0; --q) {
    auto hq = h[q];
    if (q + 1 < static_cast<int64_t>(segs.size())) hq.add_(h[q + 1]);
    const Segment& seg = segs[q];
    gy.narrow(0, t.r0, t.rows()).narrow(1, seg.start, seg.width)
        .addmm_(hq, a.y.narrow(0, t.c0, t.cols()).narrow(1, seg.start, seg.width));
    gx.narrow(0, t.c0, t.cols()).narrow(1, seg.start, seg.width)
        .addmm_(hq.t(), a.x.narrow(0, t.r0, t.rows()).narrow(1, seg.start, seg.width));
  }
}

}  // namespace fastcl::cpu
