// Masked row/column log-sum-exp of S = scale * x @ y.T, and its backward, tile by tile.
#include "cpu/kernels.h"

#include "cpu/grid.h"
#include "cpu/tile_math.h"

namespace fastcl::cpu {

namespace {

template <typename T>
void lse_forward_impl(const LseArgs& a, at::Tensor& row_lse, at::Tensor& col_lse) {
  const int64_t m = a.x.size(0), n = a.y.size(0);
  // running online state (shift, sum) per row and per column
  auto row_m = at::full({a.rows ? m : 0}, -kInf<T>, a.x.options());
  auto row_s = at::zeros({a.rows ? m : 0}, a.x.options());
  auto col_m = at::full({a.cols ? n : 0}, -kInf<T>, a.x.options());
  auto col_s = at::zeros({a.cols ? n : 0}, a.x.options());
  T* rm = row_m.template data_ptr<T>();
  T* rs = row_s.template data_ptr<T>();
  T* cm = col_m.template data_ptr<T>();
  T* cs = col_s.template data_ptr<T>();
  const Grid grid(m, n);
  for_each_tile(grid, [&](const Tile& t) {
    auto tile = at::empty({t.rows(), t.cols()}, a.x.options());
    tile_logits(tile, a.x, a.y, a.scale, t.r0, t.c0);
    T* s = tile.template data_ptr<T>();
    fill_keyed(s, t.rows(), t.cols(), a.row_keys, a.col_keys, t.r0, t.c0, -kInf<T>);
    fill_listed(s, t.rows(), t.cols(), a.exclude, a.exclude_width, t.r0, t.c0, -kInf<T>);
    if (a.rows) merge_row_stats(s, t.rows(), t.cols(), rm, rs, t.r0);
    if (a.cols) merge_column_stats(s, t.rows(), t.cols(), cm, cs, t.c0);
  });
  row_lse = row_m + row_s.log();
  col_lse = col_m + col_s.log();
}

template <typename T>
void lse_backward_impl(const LseArgs& a, const LseGrads& g, at::Tensor& gy, at::Tensor& gx) {
  const int64_t m = a.x.size(0), n = a.y.size(0);
  const T* row_shift = a.rows ? g.row_shift.template data_ptr<T>() : nullptr;
  const T* col_shift = a.cols ? g.col_shift.template data_ptr<T>() : nullptr;
  const T* g_row = a.rows ? g.g_row.template data_ptr<T>() : nullptr;
  const T* g_col = a.cols ? g.g_col.template data_ptr<T>() : nullptr;
  const Grid grid(m, n);
  for_each_tile(grid, [&](const Tile& t) {
    auto tile = at::empty({t.rows(), t.cols()}, a.x.options());
    tile_logits(tile, a.x, a.y, a.scale, t.r0, t.c0);
    T* s = tile.template data_ptr<T>();
    fill_keyed(s, t.rows(), t.cols(), a.row_keys, a.col_keys, t.r0, t.c0, -kInf<T>);
    fill_listed(s, t.rows(), t.cols(), a.exclude, a.exclude_width, t.r0, t.c0, -kInf<T>);
    // G_ij = g_row_i exp(S_ij - lse_i) + g_col_j exp(S_ij - lse_j), in place of S
    softmax_grad_tile(s, t.rows(), t.cols(), g_row, row_shift, t.r0, g_col, col_shift, t.c0);
    gy.narrow(0, t.r0, t.rows()).addmm_(tile, a.y.narrow(0, t.c0, t.cols()));
    gx.narrow(0, t.c0, t.cols()).addmm_(tile.t(), a.x.narrow(0, t.r0, t.rows()));
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lse_forward(const LseArgs& a) {
  at::Tensor row_lse, col_lse;
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fastcl_lse_forward", [&] {
    lse_forward_impl<scalar_t>(a, row_lse, col_lse);
  });
  return {row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor> lse_backward(const LseArgs& a, const LseGrads& g) {
  auto gy = at::zeros_like(a.x), gx = at::zeros_like(a.y);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fastcl_lse_backward", [&] {
    lse_backward_impl<scalar_t>(a, g, gy, gx);
  });
  return {gy, gx};
}

}  // namespace fastcl::cpu
