// Sums of a pointwise loss (SigLIP, MW) at K nested feature prefixes d_1 < ... < d_K (Matryoshka),
// with all gradients in the same pass over the features:
//
//   S^k_ij = T^k_ij + row_bias_i,   T^k_ij = scale * a^k_i * b^k_j * <x_i[:d_k], y_j[:d_k]>
//
// As lse_prefixes.cpp: a tile's P grows segment by segment (prefix_tiles.h), so the K tiles of S cost
// the GEMM work of one at d_K; with gradients the K tiles H^k = a^k b^k D^k are held at once and
// segment s's gradient GEMMs take their suffix sums. The executable description is
// backend/chunked/prefixes.py.
#include "cpu/kernels.h"

#include "cpu/grid.h"
#include "cpu/prefix_tiles.h"
#include "cpu/tile_math.h"

namespace fastcl::cpu {

namespace {

template <typename T>
T* data_or_null(at::Tensor& t, bool wanted) {
  return wanted ? t.template data_ptr<T>() : nullptr;
}

template <typename T>
void pointwise_prefixes_impl(const PointwisePrefixArgs& a, at::Tensor& row_sum, at::Tensor& gy, at::Tensor& gx,
                             at::Tensor& d_bias, at::Tensor& row_gs, at::Tensor& col_gs) {
  const int64_t m = a.x.size(0), n = a.y.size(0), k = static_cast<int64_t>(a.dims.size());
  const bool want = a.want_grads, siglip = a.kind == PointwiseKind::kSigLip;
  const T* bias = a.row_bias.defined() ? a.row_bias.template data_ptr<T>() : nullptr;
  const T* g_row = a.g_row.defined() ? a.g_row.template data_ptr<T>() : nullptr;
  T* sums = row_sum.template data_ptr<T>();
  T* db = data_or_null<T>(d_bias, want);
  T* rgs = data_or_null<T>(row_gs, want);
  T* cgs = data_or_null<T>(col_gs, want);
  const auto segs = segments(a.dims);
  const Grid grid(m, n);
  for_each_tile(grid, [&](const Tile& t) {
    const int64_t cells = t.rows() * t.cols();
    auto p = at::empty({t.rows(), t.cols()}, a.x.options());
    auto tq = at::empty_like(p);
    // the loss alone needs T^q only; the gradients the K tiles D^q, turned into H^q
    auto h = want ? at::empty({k, t.rows(), t.cols()}, a.x.options()) : at::Tensor();
    T* tp = tq.template data_ptr<T>();
    for (int64_t q = 0; q < k; ++q) {
      grow(p, a, t, segs[q], q == 0);
      const T* fa = factor<T>(a.row_scale, q, m, t.r0);
      const T* fb = factor<T>(a.col_scale, q, n, t.c0);
      scaled_tile(tp, p.template data_ptr<T>(), t.rows(), t.cols(), static_cast<T>(a.scale), fa, fb);
      T* f = tp;
      if (want) {
        f = h.template data_ptr<T>() + q * cells;
        std::copy(tp, tp + cells, f);
      }
      add_row_bias(f, t.rows(), t.cols(), bias == nullptr ? nullptr : bias + t.r0);
      pointwise_input(f, t.rows(), t.cols(), siglip, a.row_keys, a.col_keys, t.r0, t.c0);
      softplus_tile(f, t.rows(), t.cols(), sums + q * m + t.r0, g_row == nullptr ? nullptr : g_row + q * m + t.r0,
                    want);
      if (!want) continue;
      if (siglip) negate_keyed(f, t.rows(), t.cols(), a.row_keys, a.col_keys, t.r0, t.c0);  // D = -z df
      // d S^q / d a^q_i = T^q_ij / a^q_i: the factors' gradients from the sums of D^q T^q; D^q becomes H^q
      factor_grads(f, tp, t.rows(), t.cols(), fa, fb, rgs + q * m + t.r0, cgs + q * n + t.c0, db + t.r0);
    }
    if (want) feature_grads(h, a, t, segs, gy, gx);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pointwise_prefixes(
    const PointwisePrefixArgs& a) {
  const int64_t m = a.x.size(0), n = a.y.size(0), k = static_cast<int64_t>(a.dims.size());
  auto row_sum = at::zeros({k, m}, a.x.options());
  const auto empty = at::empty({0}, a.x.options());
  at::Tensor gy = empty, gx = empty, d_bias = empty, row_gs = empty, col_gs = empty;
  if (a.want_grads) {
    gy = at::zeros_like(a.x);
    gx = at::zeros_like(a.y);
    d_bias = at::zeros({m}, a.x.options());
    row_gs = at::zeros({k, m}, a.x.options());
    col_gs = at::zeros({k, n}, a.x.options());
  }
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fastcl_pointwise_prefixes", [&] {
    pointwise_prefixes_impl<scalar_t>(a, row_sum, gy, gx, d_bias, row_gs, col_gs);
  });
  return {row_sum, gy, gx, d_bias, row_gs, col_gs};
}

}  // namespace fastcl::cpu
