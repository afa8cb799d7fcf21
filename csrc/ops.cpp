// The engine's operators, registered with torch.library as fastcl::*: schemas, boundary checks,
// and the CPU implementations. Python reaches them as torch.ops.fastcl.<name>.
#include <torch/library.h>

#include "cpu/kernels.h"

namespace fastcl {

namespace {

using at::Tensor;

void check_pair(const Tensor& x, const Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, "fastcl: x and y must be 2-D, got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.size(1) == y.size(1), "fastcl: x and y must have the same feature width, got ", x.size(1),
              " and ", y.size(1));
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "fastcl: x and y must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "fastcl: the CPU kernels take float32 or float64 (callers upcast 16-bit inputs), got ",
              x.scalar_type());
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "fastcl: x and y must be contiguous");
}

void check_vector(const Tensor& t, int64_t length, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length && t.is_contiguous(), "fastcl: ", name,
              " must be a contiguous vector of length ", length, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fastcl: ", name, " must be ", dtype, ", got ", t.scalar_type());
}

cpu::PairArgs pair_args(const Tensor& x, const Tensor& y, const Tensor& scale,
                        const std::optional<Tensor>& row_keys, const std::optional<Tensor>& col_keys) {
  check_pair(x, y);
  TORCH_CHECK(scale.numel() == 1, "fastcl: scale must hold one value");
  TORCH_CHECK(row_keys.has_value() == col_keys.has_value(), "fastcl: pass both row_keys and col_keys, or neither");
  const int64_t* rk = nullptr;
  const int64_t* ck = nullptr;
  if (row_keys.has_value()) {
    check_vector(*row_keys, x.size(0), at::kLong, "row_keys");
    check_vector(*col_keys, y.size(0), at::kLong, "col_keys");
    rk = row_keys->data_ptr<int64_t>();
    ck = col_keys->data_ptr<int64_t>();
  }
  // Detached: the kernels' tile GEMMs must never be recorded by autograd (the engine's
  // torch.autograd.Function owns the gradient).
  return {x.detach(), y.detach(), scale.item<double>(), rk, ck};
}

std::tuple<Tensor, Tensor> lse_forward_cpu(const Tensor& x, const Tensor& y, const Tensor& scale,
                                           const std::optional<Tensor>& row_keys,
                                           const std::optional<Tensor>& col_keys, bool rows, bool cols) {
  cpu::LseArgs args{pair_args(x, y, scale, row_keys, col_keys), rows, cols};
  return cpu::lse_forward(args);
}

std::tuple<Tensor, Tensor> lse_backward_args(const cpu::LseArgs& args, const Tensor& x, const Tensor& y,
                                             const Tensor& row_shift, const Tensor& col_shift, const Tensor& g_row,
                                             const Tensor& g_col) {
  const bool rows = args.rows, cols = args.cols;
  if (rows) {
    check_vector(row_shift, x.size(0), x.scalar_type(), "row_shift");
    check_vector(g_row, x.size(0), x.scalar_type(), "g_row");
  }
  if (cols) {
    check_vector(col_shift, y.size(0), x.scalar_type(), "col_shift");
    check_vector(g_col, y.size(0), x.scalar_type(), "g_col");
  }
  return cpu::lse_backward(args, {row_shift, col_shift, g_row, g_col});
}

std::tuple<Tensor, Tensor> lse_backward_cpu(const Tensor& x, const Tensor& y, const Tensor& scale,
                                            const std::optional<Tensor>& row_keys,
                                            const std::optional<Tensor>& col_keys, const Tensor& row_shift,
                                            const Tensor& col_shift, const Tensor& g_row, const Tensor& g_col,
                                            bool rows, bool cols) {
  return lse_backward_args({pair_args(x, y, scale, row_keys, col_keys), rows, cols}, x, y, row_shift, col_shift,
                           g_row, g_col);
}

void check_matrix(const Tensor& t, int64_t rows, int64_t cols, at::ScalarType dtype, const char* name);

// exclude [M, E] int64, contiguous: row i's listed column indices into y, -1 padded.
void set_exclude(cpu::LseArgs& args, const Tensor& exclude) {
  TORCH_CHECK(exclude.dim() == 2 && exclude.size(0) == args.x.size(0), "fastcl: exclude must be [",
              args.x.size(0), ", E], got ", exclude.sizes());
  check_matrix(exclude, args.x.size(0), exclude.size(1), at::kLong, "exclude");
  args.exclude = exclude.data_ptr<int64_t>();
  args.exclude_width = exclude.size(1);
}

std::tuple<Tensor, Tensor> lse_forward_excluding_cpu(const Tensor& x, const Tensor& y, const Tensor& scale,
                                                     const std::optional<Tensor>& row_keys,
                                                     const std::optional<Tensor>& col_keys, const Tensor& exclude,
                                                     bool rows, bool cols) {
  cpu::LseArgs args{pair_args(x, y, scale, row_keys, col_keys), rows, cols};
  set_exclude(args, exclude);
  return cpu::lse_forward(args);
}

std::tuple<Tensor, Tensor> lse_backward_excluding_cpu(const Tensor& x, const Tensor& y, const Tensor& scale,
                                                      const std::optional<Tensor>& row_keys,
                                                      const std::optional<Tensor>& col_keys, const Tensor& exclude,
                                                      const Tensor& row_shift, const Tensor& col_shift,
                                                      const Tensor& g_row, const Tensor& g_col, bool rows,
                                                      bool cols) {
  cpu::LseArgs args{pair_args(x, y, scale, row_keys, col_keys), rows, cols};
  set_exclude(args, exclude);
  return lse_backward_args(args, x, y, row_shift, col_shift, g_row, g_col);
}

void check_matrix(const Tensor& t, int64_t rows, int64_t cols, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.is_contiguous(), "fastcl: ", name,
              " must be a contiguous [", rows, ", ", cols, "] tensor, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fastcl: ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// The prefixes and factors of a pair already checked (pair_args): dims strictly increasing within
// [1, D], row_scale [K, M] and col_scale [K, N] in x's dtype, both or neither.
cpu::Prefixes prefixes(const cpu::PairArgs& pair, at::IntArrayRef dims, const std::optional<Tensor>& row_scale,
                       const std::optional<Tensor>& col_scale) {
  const Tensor& x = pair.x;
  const int64_t k = static_cast<int64_t>(dims.size());
  TORCH_CHECK(k > 0, "fastcl: dims must name at least one prefix");
  for (int64_t q = 0; q < k; ++q) {
    TORCH_CHECK(dims[q] > (q ? dims[q - 1] : 0) && dims[q] <= x.size(1),
                "fastcl: dims must increase strictly within [1, ", x.size(1), "], got ", dims);
  }
  TORCH_CHECK(row_scale.has_value() == col_scale.has_value(), "fastcl: pass both row_scale and col_scale, or neither");
  Tensor rs, cs;
  if (row_scale.has_value()) {
    check_matrix(*row_scale, k, x.size(0), x.scalar_type(), "row_scale");
    check_matrix(*col_scale, k, pair.y.size(0), x.scalar_type(), "col_scale");
    rs = row_scale->detach();
    cs = col_scale->detach();
  }
  return {pair.x, pair.y, pair.scale, dims.vec(), rs, cs};
}

cpu::PrefixArgs prefix_args(const Tensor& x, const Tensor& y, const Tensor& scale, at::IntArrayRef dims,
                            const std::optional<Tensor>& row_scale, const std::optional<Tensor>& col_scale,
                            bool rows, bool cols) {
  return {prefixes(pair_args(x, y, scale, std::nullopt, std::nullopt), dims, row_scale, col_scale), rows, cols};
}

std::tuple<Tensor, Tensor> lse_forward_prefixes_cpu(const Tensor& x, const Tensor& y, const Tensor& scale,
                                                    at::IntArrayRef dims, const std::optional<Tensor>& row_scale,
                                                    const std::optional<Tensor>& col_scale, bool rows, bool cols) {
  return cpu::lse_forward_prefixes(prefix_args(x, y, scale, dims, row_scale, col_scale, rows, cols));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lse_backward_prefixes_cpu(
    const Tensor& x, const Tensor& y, const Tensor& scale, at::IntArrayRef dims,
    const std::optional<Tensor>& row_scale, const std::optional<Tensor>& col_scale, const Tensor& row_shift,
    const Tensor& col_shift, const Tensor& g_row, const Tensor& g_col, bool rows, bool cols) {
  const cpu::PrefixArgs args = prefix_args(x, y, scale, dims, row_scale, col_scale, rows, cols);
  const int64_t k = static_cast<int64_t>(dims.size());
  if (rows) {
    check_matrix(row_shift, k, x.size(0), x.scalar_type(), "row_shift");
    check_matrix(g_row, k, x.size(0), x.scalar_type(), "g_row");
  }
  if (cols) {
    check_matrix(col_shift, k, y.size(0), x.scalar_type(), "col_shift");
    check_matrix(g_col, k, y.size(0), x.scalar_type(), "g_col");
  }
  return cpu::lse_backward_prefixes(args, {row_shift, col_shift, g_row, g_col});
}

Tensor lse_forward_symmetric_cpu(const Tensor& z, const Tensor& scale, const std::optional<Tensor>& keys) {
  return cpu::lse_forward_symmetric(pair_args(z, z, scale, keys, keys));
}

Tensor lse_backward_symmetric_cpu(const Tensor& z, const Tensor& scale, const std::optional<Tensor>& keys,
                                  const Tensor& shift, const Tensor& g) {
  check_vector(shift, z.size(0), z.scalar_type(), "shift");
  check_vector(g, z.size(0), z.scalar_type(), "g");
  return cpu::lse_backward_symmetric(pair_args(z, z, scale, keys, keys), shift, g);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pointwise_cpu(const Tensor& x, const Tensor& y, const Tensor& scale,
                                                         const std::optional<Tensor>& row_bias,
                                                         const std::optional<Tensor>& row_keys,
                                                         const std::optional<Tensor>& col_keys, int64_t kind,
                                                         const std::optional<Tensor>& g_row, bool want_grads) {
  TORCH_CHECK(kind == 0 || kind == 1, "fastcl: pointwise kind must be 0 (siglip) or 1 (mw), got ", kind);
  cpu::PointwiseArgs args{pair_args(x, y, scale, row_keys, col_keys), Tensor(),
                          static_cast<cpu::PointwiseKind>(kind), Tensor(), want_grads};
  if (row_bias.has_value()) {
    check_vector(*row_bias, x.size(0), x.scalar_type(), "row_bias");
    args.row_bias = *row_bias;
  }
  if (g_row.has_value()) {
    check_vector(*g_row, x.size(0), x.scalar_type(), "g_row");
    args.g_row = *g_row;
  }
  return cpu::pointwise(args);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> pointwise_prefixes_cpu(
    const Tensor& x, const Tensor& y, const Tensor& scale, const std::optional<Tensor>& row_bias,
    at::IntArrayRef dims, const std::optional<Tensor>& row_scale, const std::optional<Tensor>& col_scale,
    const std::optional<Tensor>& row_keys, const std::optional<Tensor>& col_keys, int64_t kind,
    const std::optional<Tensor>& g_row, bool want_grads) {
  TORCH_CHECK(kind == 0 || kind == 1, "fastcl: pointwise kind must be 0 (siglip) or 1 (mw), got ", kind);
  const cpu::PairArgs pair = pair_args(x, y, scale, row_keys, col_keys);
  cpu::PointwisePrefixArgs args{prefixes(pair, dims, row_scale, col_scale), pair.row_keys, pair.col_keys, Tensor(),
                                static_cast<cpu::PointwiseKind>(kind), Tensor(), want_grads};
  if (row_bias.has_value()) {
    check_vector(*row_bias, x.size(0), x.scalar_type(), "row_bias");
    args.row_bias = *row_bias;
  }
  if (g_row.has_value()) {
    check_matrix(*g_row, static_cast<int64_t>(dims.size()), x.size(0), x.scalar_type(), "g_row");
    args.g_row = *g_row;
  }
  return cpu::pointwise_prefixes(args);
}

std::tuple<Tensor, Tensor> topk_cpu(const Tensor& x, const Tensor& y, const Tensor& scale, int64_t k,
                                    const std::optional<Tensor>& row_keys, const std::optional<Tensor>& col_keys,
                                    bool exclude_diagonal) {
  TORCH_CHECK(k >= 0 && k <= y.size(0), "fastcl: topk needs 0 <= k <= N = ", y.size(0), ", got k = ", k);
  cpu::TopkArgs args{pair_args(x, y, scale, row_keys, col_keys), k, exclude_diagonal};
  return cpu::topk(args);
}

cpu::MaxSimArgs maxsim_args(const Tensor& q, const Tensor& d, const std::optional<Tensor>& q_mask,
                            const std::optional<Tensor>& d_mask) {
  TORCH_CHECK(q.dim() == 3 && d.dim() == 3, "fastcl: q and d must be 3-D [rows, tokens, D], got ", q.sizes(),
              " and ", d.sizes());
  check_pair(q.view({-1, q.size(2)}), d.view({-1, d.size(2)}));
  const bool* qm = nullptr;
  const bool* dm = nullptr;
  for (auto [mask, tokens, name, ptr] : {std::tuple{&q_mask, &q, "q_mask", &qm}, std::tuple{&d_mask, &d, "d_mask", &dm}}) {
    if (!mask->has_value()) continue;
    const Tensor& m = **mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.is_contiguous() && m.dim() == 2 && m.size(0) == tokens->size(0) &&
                    m.size(1) == tokens->size(1),
                "fastcl: ", name, " must be a contiguous bool [rows, tokens] tensor matching its tokens, got ",
                m.sizes(), " ", m.scalar_type());
    *ptr = m.data_ptr<bool>();
  }
  return {q.detach(), d.detach(), qm, dm};  // detached: see pair_args
}

Tensor maxsim_forward_cpu(const Tensor& q, const Tensor& d, const std::optional<Tensor>& q_mask,
                          const std::optional<Tensor>& d_mask) {
  return cpu::maxsim_forward(maxsim_args(q, d, q_mask, d_mask));
}

std::tuple<Tensor, Tensor> maxsim_backward_cpu(const Tensor& q, const Tensor& d, const std::optional<Tensor>& q_mask,
                                               const std::optional<Tensor>& d_mask, const Tensor& g, bool need_q,
                                               bool need_d) {
  auto args = maxsim_args(q, d, q_mask, d_mask);
  TORCH_CHECK(g.dim() == 2 && g.size(0) == q.size(0) && g.size(1) == d.size(0) && g.is_contiguous() &&
                  g.scalar_type() == q.scalar_type(),
              "fastcl: g must be a contiguous [B, N] tensor of q's dtype, got ", g.sizes(), " ", g.scalar_type());
  return cpu::maxsim_backward(args, g, need_q, need_d);
}

}  // namespace

TORCH_LIBRARY(fastcl, m) {
  m.def("lse_forward(Tensor x, Tensor y, Tensor scale, Tensor? row_keys, Tensor? col_keys, bool rows, "
        "bool cols) -> (Tensor, Tensor)");
  m.def("lse_backward(Tensor x, Tensor y, Tensor scale, Tensor? row_keys, Tensor? col_keys, Tensor row_shift, "
        "Tensor col_shift, Tensor g_row, Tensor g_col, bool rows, bool cols) -> (Tensor, Tensor)");
  m.def("lse_forward_excluding(Tensor x, Tensor y, Tensor scale, Tensor? row_keys, Tensor? col_keys, "
        "Tensor exclude, bool rows, bool cols) -> (Tensor, Tensor)");
  m.def("lse_backward_excluding(Tensor x, Tensor y, Tensor scale, Tensor? row_keys, Tensor? col_keys, "
        "Tensor exclude, Tensor row_shift, Tensor col_shift, Tensor g_row, Tensor g_col, bool rows, bool cols) "
        "-> (Tensor, Tensor)");
  m.def("lse_forward_prefixes(Tensor x, Tensor y, Tensor scale, int[] dims, Tensor? row_scale, Tensor? col_scale, "
        "bool rows, bool cols) -> (Tensor, Tensor)");
  m.def("lse_backward_prefixes(Tensor x, Tensor y, Tensor scale, int[] dims, Tensor? row_scale, "
        "Tensor? col_scale, Tensor row_shift, Tensor col_shift, Tensor g_row, Tensor g_col, bool rows, bool cols) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lse_forward_symmetric(Tensor z, Tensor scale, Tensor? keys) -> Tensor");
  m.def("lse_backward_symmetric(Tensor z, Tensor scale, Tensor? keys, Tensor shift, Tensor g) -> Tensor");
  m.def("pointwise(Tensor x, Tensor y, Tensor scale, Tensor? row_bias, Tensor? row_keys, Tensor? col_keys, "
        "int kind, Tensor? g_row, bool want_grads) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("pointwise_prefixes(Tensor x, Tensor y, Tensor scale, Tensor? row_bias, int[] dims, Tensor? row_scale, "
        "Tensor? col_scale, Tensor? row_keys, Tensor? col_keys, int kind, Tensor? g_row, bool want_grads) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("topk(Tensor x, Tensor y, Tensor scale, int k, Tensor? row_keys, Tensor? col_keys, bool exclude_diagonal) "
        "-> (Tensor, Tensor)");
  m.def("maxsim_forward(Tensor q, Tensor d, Tensor? q_mask, Tensor? d_mask) -> Tensor");
  m.def("maxsim_backward(Tensor q, Tensor d, Tensor? q_mask, Tensor? d_mask, Tensor g, bool need_q, bool need_d) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastcl, CPU, m) {
  m.impl("lse_forward", &lse_forward_cpu);
  m.impl("lse_backward", &lse_backward_cpu);
  m.impl("lse_forward_excluding", &lse_forward_excluding_cpu);
  m.impl("lse_backward_excluding", &lse_backward_excluding_cpu);
  m.impl("lse_forward_prefixes", &lse_forward_prefixes_cpu);
  m.impl("lse_backward_prefixes", &lse_backward_prefixes_cpu);
  m.impl("lse_forward_symmetric", &lse_forward_symmetric_cpu);
  m.impl("lse_backward_symmetric", &lse_backward_symmetric_cpu);
  m.impl("pointwise", &pointwise_cpu);
  m.impl("pointwise_prefixes", &pointwise_prefixes_cpu);
  m.impl("topk", &topk_cpu);
  m.impl("maxsim_forward", &maxsim_forward_cpu);
  m.impl("maxsim_backward", &maxsim_backward_cpu);
}

}  // namespace fastcl
