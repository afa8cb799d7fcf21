// The row log-sum-exp of a symmetric S = scale * z @ z.T (self-similarity: NT-Xent, SupCon, DCL,
// multi-view) and its backward, visiting only the tiles on and above the diagonal.
//
// Forward: an upper tile (I, J) gives the statistics of rows I over columns J and, read by column,
// those of rows J over columns I (S_JI = S_IJ^T). Backward: the gradient of sum_i g_i lse_i is
// dz = scale (G + G^T) z with G_ij = g_i exp(S_ij - lse_i); on an upper tile,
// H = G_IJ + (G_JI)^T = g_I exp(S_IJ - lse_I) + g_J exp(S_IJ - lse_J)^T, then dz_I += H z_J and
// dz_J += H^T z_I. Half the tiles: 2 GEMMs' worth in all instead of 4.
#include "cpu/kernels.h"

#include "cpu/grid.h"
#include "cpu/tile_math.h"

namespace fastcl::cpu {

namespace {

template <typename T>
at::Tensor lse_forward_symmetric_impl(const PairArgs& a) {
  const int64_t n = a.x.size(0);
  auto state_m = at::full({n}, -kInf<T>, a.x.options());
  auto state_s = at::zeros({n}, a.x.options());
  T* m = state_m.template data_ptr<T>();
  T* s = state_s.template data_ptr<T>();
  for_each_upper_tile(Grid(n, n), [&](const Tile& t) {
    auto tile = at::empty({t.rows(), t.cols()}, a.x.options());
    tile_logits(tile, a.x, a.x, a.scale, t.r0, t.c0);
    T* p = tile.template data_ptr<T>();
    fill_keyed(p, t.rows(), t.cols(), a.row_keys, a.row_keys, t.r0, t.c0, -kInf<T>);
    merge_row_stats(p, t.rows(), t.cols(), m, s, t.r0);
    if (t.r0 != t.c0) merge_column_stats(p, t.rows(), t.cols(), m, s, t.c0);
  });
  return state_m + state_s.log();
}

template <typename T>
void lse_backward_symmetric_impl(const PairArgs& a, const at::Tensor& shift, const at::Tensor& g,
                                 at::Tensor& gz) {
  const int64_t n = a.x.size(0);
  const T* sh = shift.template data_ptr<T>();
  const T* gr = g.template data_ptr<T>();
  for_each_upper_tile(Grid(n, n), [&](const Tile& t) {
    auto tile = at::empty({t.rows(), t.cols()}, a.x.options());
    tile_logits(tile, a.x, a.x, a.scale, t.r0, t.c0);
    T* p = tile.template data_ptr<T>();
    fill_keyed(p, t.rows(), t.cols(), a.row_keys, a.row_keys, t.r0, t.c0, -kInf<T>);
    const at::Tensor z_rows = a.x.narrow(0, t.r0, t.rows()), z_cols = a.x.narrow(0, t.c0, t.cols());
    if (t.r0 == t.c0) {  // diagonal tile: G_II, contributing G z_I and G^T z_I to the same rows
      softmax_grad_tile<T>(p, t.rows(), t.cols(), gr, sh, t.r0, nullptr, nullptr, t.c0);
      gz.narrow(0, t.r0, t.rows()).addmm_(tile, z_cols).addmm_(tile.t(), z_rows);
    } else {
      softmax_grad_tile<T>(p, t.rows(), t.cols(), gr, sh, t.r0, gr, sh, t.c0);
      gz.narrow(0, t.r0, t.rows()).addmm_(tile, z_cols);
      gz.narrow(0, t.c0, t.cols()).addmm_(tile.t(), z_rows);
    }
  });
}

}  // namespace

at::Tensor lse_forward_symmetric(const PairArgs& a) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fastcl_lse_forward_symmetric", [&] {
    out = lse_forward_symmetric_impl<scalar_t>(a);
  });
  return out;
}

at::Tensor lse_backward_symmetric(const PairArgs& a, const at::Tensor& shift, const at::Tensor& g) {
  auto gz = at::zeros_like(a.x);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fastcl_lse_backward_symmetric", [&] {
    lse_backward_symmetric_impl<scalar_t>(a, shift, g, gz);
  });
  return gz;
}

}  // namespace fastcl::cpu
