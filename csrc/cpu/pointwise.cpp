// Sums of a pointwise loss of S = scale * x @ y.T + row_bias (SigLIP, MW), with all gradients
// in the same pass.
#include "cpu/kernels.h"

#include "cpu/grid.h"
#include "cpu/tile_math.h"

namespace fastcl::cpu {

namespace {

template <typename T>
void pointwise_impl(const PointwiseArgs& a, at::Tensor& row_sum, at::Tensor& gy, at::Tensor& gx,
                    at::Tensor& d_bias) {
  const int64_t m = a.x.size(0), n = a.y.size(0);
  const T* bias = a.row_bias.defined() ? a.row_bias.template data_ptr<T>() : nullptr;
  const T* g_row = a.g_row.defined() ? a.g_row.template data_ptr<T>() : nullptr;
  T* sums = row_sum.template data_ptr<T>();
  T* db = a.want_grads ? d_bias.template data_ptr<T>() : nullptr;
  const bool siglip = a.kind == PointwiseKind::kSigLip;
  const Grid grid(m, n);
  for_each_tile(grid, [&](const Tile& t) {
    auto tile = at::empty({t.rows(), t.cols()}, a.x.options());
    tile_logits(tile, a.x, a.y, a.scale, t.r0, t.c0);
    T* s = tile.template data_ptr<T>();
    add_row_bias(s, t.rows(), t.cols(), bias == nullptr ? nullptr : bias + t.r0);
    pointwise_input(s, t.rows(), t.cols(), siglip, a.row_keys, a.col_keys, t.r0, t.c0);
    softplus_tile(s, t.rows(), t.cols(), sums + t.r0, g_row == nullptr ? nullptr : g_row + t.r0, a.want_grads);
    if (!a.want_grads) return;
    if (siglip) negate_keyed(s, t.rows(), t.cols(), a.row_keys, a.col_keys, t.r0, t.c0);  // dS = -z df
    for (int64_t i = 0; i < t.rows(); ++i) {
      db[t.r0 + i] += at::vec::reduce_all<T>([](Vec<T>& p, Vec<T>& q) { return p + q; }, s + i * t.cols(), t.cols());
    }
    gy.narrow(0, t.r0, t.rows()).addmm_(tile, a.y.narrow(0, t.c0, t.cols()));
    gx.narrow(0, t.c0, t.cols()).addmm_(tile.t(), a.x.narrow(0, t.r0, t.rows()));
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pointwise(const PointwiseArgs& a) {
  auto row_sum = at::zeros({a.x.size(0)}, a.x.options());
  at::Tensor gy, gx, d_bias;
  if (a.want_grads) {
    gy = at::zeros_like(a.x);
    gx = at::zeros_like(a.y);
    d_bias = at::zeros({a.x.size(0)}, a.x.options());
  } else {
    gy = at::empty({0}, a.x.options());
    gx = at::empty({0}, a.x.options());
    d_bias = at::empty({0}, a.x.options());
  }
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fastcl_pointwise", [&] {
    pointwise_impl<scalar_t>(a, row_sum, gy, gx, d_bias);
  });
  return {row_sum, gy, gx, d_bias};
}

}  // namespace fastcl::cpu
