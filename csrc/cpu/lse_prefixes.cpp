// Row/column log-sum-exp at K nested feature prefixes d_1 < ... < d_K (Matryoshka), and its
// backward, tile by tile and in one pass over the features:
//
//   S^k_ij = scale * a^k_i * b^k_j * P^k_ij,   P^k_ij = <x_i[:d_k], y_j[:d_k]>
//
// A tile's P grows by one GEMM per segment [d_{k-1}, d_k), so the K tiles of S cost the GEMM work
// of one at d_K. Backward holds the K tiles H^k = a^k b^k G^k of a tile at once (K x 256 KiB) and
// feeds segment s's gradient GEMMs with their suffix sum sum_{k >= s} H^k: again one loss's GEMMs.
// The shared tile steps are in prefix_tiles.h; the executable description is backend/chunked/prefixes.py.
#include "cpu/kernels.h"

#include "cpu/grid.h"
#include "cpu/prefix_tiles.h"
#include "cpu/tile_math.h"

namespace fastcl::cpu {

namespace {

template <typename T>
void forward_impl(const PrefixArgs& a, at::Tensor& row_lse, at::Tensor& col_lse) {
  const int64_t m = a.x.size(0), n = a.y.size(0), k = static_cast<int64_t>(a.dims.size());
  auto row_m = at::full({k, a.rows ? m : 0}, -kInf<T>, a.x.options());
  auto row_s = at::zeros({k, a.rows ? m : 0}, a.x.options());
  auto col_m = at::full({k, a.cols ? n : 0}, -kInf<T>, a.x.options());
  auto col_s = at::zeros({k, a.cols ? n : 0}, a.x.options());
  const auto segs = segments(a.dims);
  const Grid grid(m, n);
  for_each_tile(grid, [&](const Tile& t) {
    auto p = at::empty({t.rows(), t.cols()}, a.x.options());
    auto s = at::empty_like(p);
    T* sp = s.template data_ptr<T>();
    for (int64_t q = 0; q < k; ++q) {
      grow(p, a, t, segs[q], q == 0);
      scaled_tile(sp, p.template data_ptr<T>(), t.rows(), t.cols(), static_cast<T>(a.scale),
                  factor<T>(a.row_scale, q, m, t.r0), factor<T>(a.col_scale, q, n, t.c0));
      if (a.rows)
        merge_row_stats(sp, t.rows(), t.cols(), row_m.template data_ptr<T>() + q * m,
                        row_s.template data_ptr<T>() + q * m, t.r0);
      if (a.cols)
        merge_column_stats(sp, t.rows(), t.cols(), col_m.template data_ptr<T>() + q * n,
                           col_s.template data_ptr<T>() + q * n, t.c0);
    }
  });
  row_lse = row_m + row_s.log();
  col_lse = col_m + col_s.log();
}

template <typename T>
void backward_impl(const PrefixArgs& a, const LseGrads& g, at::Tensor& gy, at::Tensor& gx, at::Tensor& row_gs,
                   at::Tensor& col_gs) {
  const int64_t m = a.x.size(0), n = a.y.size(0), k = static_cast<int64_t>(a.dims.size());
  const auto segs = segments(a.dims);
  const Grid grid(m, n);
  for_each_tile(grid, [&](const Tile& t) {
    auto p = at::empty({t.rows(), t.cols()}, a.x.options());
    auto s = at::empty_like(p);
    auto h = at::empty({k, t.rows(), t.cols()}, a.x.options());
    T* sp = s.template data_ptr<T>();
    for (int64_t q = 0; q < k; ++q) {
      grow(p, a, t, segs[q], q == 0);
      const T* fa = factor<T>(a.row_scale, q, m, t.r0);
      const T* fb = factor<T>(a.col_scale, q, n, t.c0);
      scaled_tile(sp, p.template data_ptr<T>(), t.rows(), t.cols(), static_cast<T>(a.scale), fa, fb);
      T* hq = h[q].template data_ptr<T>();
      std::copy(sp, sp + t.rows() * t.cols(), hq);
      // G^q = g_row exp(S - row_lse) + g_col exp(S - col_lse), in place of the copy
      softmax_grad_tile(hq, t.rows(), t.cols(), a.rows ? g.g_row.template data_ptr<T>() + q * m : nullptr,
                        a.rows ? g.row_shift.template data_ptr<T>() + q * m : nullptr, t.r0,
                        a.cols ? g.g_col.template data_ptr<T>() + q * n : nullptr,
                        a.cols ? g.col_shift.template data_ptr<T>() + q * n : nullptr, t.c0);
      factor_grads(hq, sp, t.rows(), t.cols(), fa, fb, row_gs.template data_ptr<T>() + q * m + t.r0,
                   col_gs.template data_ptr<T>() + q * n + t.c0);
    }
    feature_grads(h, a, t, segs, gy, gx);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lse_forward_prefixes(const PrefixArgs& a) {
  at::Tensor row_lse, col_lse;
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fastcl_lse_forward_prefixes", [&] {
    forward_impl<scalar_t>(a, row_lse, col_lse);
  });
  return {row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lse_backward_prefixes(const PrefixArgs& a,
                                                                                 const LseGrads& g) {
  const int64_t k = static_cast<int64_t>(a.dims.size());
  auto gy = at::zeros_like(a.x), gx = at::zeros_like(a.y);
  auto row_gs = at::zeros({k, a.x.size(0)}, a.x.options()), col_gs = at::zeros({k, a.y.size(0)}, a.x.options());
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fastcl_lse_backward_prefixes", [&] {
    backward_impl<scalar_t>(a, g, gy, gx, row_gs, col_gs);
  });
  return {gy, gx, row_gs, col_gs};
}

}  // namespace fastcl::cpu
