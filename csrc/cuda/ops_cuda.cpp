// CUDA implementations of the fastcl::* operators (schemas in csrc/ops.cpp): boundary checks, then
// the torch-free launchers of launch.h on the current stream, and for the gradients the
// library GEMMs G @ y and G.T @ x through ATen (cuBLAS under a CUDA torch; DESIGN.md says
// why). Compiled only when the extension is built with FASTCL_CUDA_ARCHS.
//
// No c10_cuda: the device guard and the current stream come through c10's device-generic
// interfaces (c10::DeviceGuard, DeviceGuardImplInterface::getStream, Stream::native_handle), and
// the GEMMs through ATen's dispatcher, all of which the CUDA build of torch implements at run time.
// So this file compiles against any torch (a CPU wheel included) with only the CUDA toolkit's
// cuda_runtime.h, and links no CUDA library of torch.
//
// Inputs: float32, float16 or bfloat16 features (16-bit ones run on 16-bit tensor cores); every
// statistic, gradient and loss comes back in float32. Work is cut into blocks of S whose
// workspace FASTCL_WORKSPACE_MB bounds (plan.h, the Triton engine's rule). Op lse_prefixes
// (Matryoshka CLIP) and pointwise_prefixes (Matryoshka SigLIP) run their K prefixes from one pass
// over the features (prefixes.cuh). The symmetric ops have no CUDA kernels yet.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <tuple>
#include <vector>

#include "gemm_path.h"  // FASTCL_MM_OUT_DTYPE: how the G GEMMs take 16-bit blocks
#include "launch.h"
#include "plan.h"

namespace fastcl {

namespace {

using at::Tensor;

// Where the kernels' tensors live: the GPU, or the CPU under the host execution (csrc/cuda/host, which
// includes this file with FASTCL_HOST_EXEC and registers these functions under its own names).
#ifdef FASTCL_HOST_EXEC
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
cudaStream_t current_stream(const at::Device&) { return nullptr; }
#else
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;

// torch's current CUDA stream on `device` (what c10::cuda::getCurrentCUDAStream(index) returns).
cudaStream_t current_stream(const at::Device& device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}
#endif

bool on_kernel_device(const Tensor& t) { return t.device().type() == kKernelDevice; }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastcl: CUDA kernels of ", op, " failed: ", cudaGetErrorString(err));
}

cuda::DType kernel_dtype(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastcl: the CUDA kernels take float32, float16 or bfloat16 features, got ",
                  x.scalar_type());
  }
}

void check_on(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(on_kernel_device(t) && t.device() == like.device(), "fastcl: ", name, " must be on ", like.device(),
              ", got ", t.device());
}

void check_vector(const Tensor& t, const Tensor& like, int64_t length, at::ScalarType dtype, const char* name) {
  check_on(t, like, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length && t.is_contiguous(), "fastcl: ", name,
              " must be a contiguous vector of length ", length, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fastcl: ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// FASTCL_WORKSPACE_MB in bytes, read at every call (as the Triton engine does).
int64_t workspace_budget() {
  const char* raw = std::getenv("FASTCL_WORKSPACE_MB");
  const int64_t budget = cuda::plan::workspace_budget(raw);
  TORCH_CHECK_VALUE(budget > 0, "FASTCL_WORKSPACE_MB must be a positive number of MiB, got '", raw, "'");
  return budget;
}

// The features as the kernels read them: t itself when its rows are whole 16-byte chunks from a
// 16-byte aligned base, else a zero-padded copy (plan.h aligned_features; zero features add
// nothing to S). One O(rows * d) copy instead of unpipelined scalar loads in every tile.
Tensor kernel_features(const Tensor& t) {
  const int64_t d = t.size(1);
  const int64_t d_pad = cuda::plan::aligned_features(d, static_cast<int64_t>(t.element_size()));
  if (d_pad == d && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0) return t;
  Tensor padded = at::zeros({t.size(0), d_pad}, t.options());
  padded.narrow(1, 0, d).copy_(t);
  return padded;
}

// One call's operands: the caller's x, y (what the gradient GEMMs read), the kernels' aligned
// views of them, and the launcher arguments for S = scale * x @ y.T. `scale_holder` keeps a device
// float32 copy of a CUDA scale alive (read by the kernels: no host sync); a CPU scale is read here.
struct Problem {
  Tensor x, y, xk, yk, scale_holder;
  cuda::PairInputs in{};
};

Problem problem(const Tensor& x, const Tensor& y, const Tensor& scale, const std::optional<Tensor>& row_keys,
                const std::optional<Tensor>& col_keys) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, "fastcl: x and y must be 2-D, got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.size(1) == y.size(1), "fastcl: x and y must have the same feature width, got ", x.size(1),
              " and ", y.size(1));
  TORCH_CHECK(on_kernel_device(x), "fastcl: the CUDA kernels take CUDA tensors, got x on ", x.device());
  check_on(y, x, "y");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "fastcl: x and y must share a dtype");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "fastcl: x and y must be contiguous");
  TORCH_CHECK(scale.numel() == 1, "fastcl: scale must hold one value");
  TORCH_CHECK(row_keys.has_value() == col_keys.has_value(), "fastcl: pass both row_keys and col_keys, or neither");

  Problem pr;
  pr.x = x;
  pr.y = y;
  pr.xk = kernel_features(x);
  pr.yk = kernel_features(y);
  cuda::PairInputs& in = pr.in;
  in.dtype = kernel_dtype(x);
  in.x = pr.xk.data_ptr();
  in.y = pr.yk.data_ptr();
  in.m = x.size(0);
  in.n = y.size(0);
  in.d = pr.xk.size(1);
  in.ldx = in.d;
  in.ldy = in.d;
  if (on_kernel_device(scale)) {
    check_on(scale, x, "scale");
    pr.scale_holder = scale.detach().reshape({}).to(at::kFloat).contiguous();
    in.scale_ptr = pr.scale_holder.data_ptr<float>();
  } else {
    in.scale = static_cast<float>(scale.item<double>());
  }
  if (row_keys.has_value()) {
    check_vector(*row_keys, x, in.m, at::kLong, "row_keys");
    check_vector(*col_keys, x, in.n, at::kLong, "col_keys");
    in.row_keys = row_keys->data_ptr<int64_t>();
    in.col_keys = col_keys->data_ptr<int64_t>();
  }
  return pr;
}

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// dst = a @ b in float32 for a G block a (the input type) and features b (the input type).
void product(Tensor& dst, const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(dst, a, b);  // torch's float32 matmul precision (full float32 unless the user allows TF32)
    return;
  }
#if FASTCL_MM_OUT_DTYPE
  at::mm_out(dst, a, b, at::kFloat);
#else
  at::mm_out(dst, a.to(at::kFloat), b.to(at::kFloat));
#endif
}

// out = a @ b (first block of its rows) or out += a @ b through tmp: blocks are added in a fixed
// order, each product by one GEMM call, so the result is the same bits run to run.
void accumulate_product(Tensor out, const Tensor& a, const Tensor& b, bool first, const Tensor& tmp) {
  if (first) {
    product(out, a, b);
    return;
  }
  Tensor part = tmp.narrow(0, 0, out.size(0));
  product(part, a, b);
  out.add_(part);
}

// What one gradient pass produces (each may be undefined: not wanted).
struct GradOutputs {
  Tensor gy, gx;           // G @ y [m, d], G.T @ x [n, d] (float32)
  Tensor row_loss, dsum;   // pointwise: row sums of the loss and of G [m] (float32)
};

// Every block of S in a fixed order: the tile kernel writes the block's G (and pointwise partials),
// then two GEMMs add G @ y into gy's rows and G.T @ x into gx's rows. float16 G is stored times a
// power of two chosen on the device from the upstream gradients (scale_row, scale_col, extra: see
// launch.h grad_scale) and the products are divided by it at the end: G of a mean loss is ~1 / N^2,
// below float16's subnormals unscaled.
void gradient_pass(const Problem& pr, cuda::GradTerms terms, const float* scale_row, const float* scale_col,
                   float extra, GradOutputs& out, cudaStream_t stream) {
  const cuda::PairInputs& in = pr.in;
  const bool grads = out.gy.defined();
  const bool pointwise = terms.kind != cuda::GradKind::kLse;
  const int64_t d = pr.x.size(1);
  const cuda::plan::Block block =
      cuda::plan::gradient_block(in.m, in.n, static_cast<int64_t>(pr.x.element_size()), workspace_budget());
  const auto f32 = pr.x.options().dtype(at::kFloat);
  Tensor g, tmp, scales, parts;
  if (grads) {
    g = at::empty({block.rows * block.cols}, pr.x.options());  // G in the input type (float for float32)
    tmp = at::empty({std::max(block.rows, block.cols), d}, f32);
    if (in.dtype == cuda::DType::kFloat16) {
      scales = at::empty({2}, f32);
      check_launch(cuda::grad_scale(scale_row, in.m, scale_col, in.n, extra, scales.data_ptr<float>(), stream),
                   "gradient scale");
      terms.g_scale = scales.data_ptr<float>();
    }
  }
  const int64_t col_tiles = cuda::cdiv(block.cols, cuda::kBlockB);
  if (pointwise) parts = at::empty({2, block.rows * col_tiles}, f32);
  for (int64_t r0 = 0; r0 < in.m; r0 += block.rows) {
    for (int64_t c0 = 0; c0 < in.n; c0 += block.cols) {
      const int64_t r = std::min(block.rows, in.m - r0), c = std::min(block.cols, in.n - c0);
      check_launch(cuda::grad_block(in, terms, {r0, r0 + r, c0, c0 + c}, grads ? g.data_ptr() : nullptr, c,
                                    pointwise ? parts[0].data_ptr<float>() : nullptr,
                                    pointwise && out.dsum.defined() ? parts[1].data_ptr<float>() : nullptr, stream),
                   "gradient tile");
      if (pointwise) {
        const int64_t tiles = cuda::cdiv(c, cuda::kBlockB);
        for (auto [dst, i] : {std::pair<Tensor*, int>{&out.row_loss, 0}, {&out.dsum, 1}}) {
          if (!dst->defined()) continue;
          Tensor sums = parts[i].narrow(0, 0, r * tiles).view({r, tiles}).sum(1);
          Tensor rows = dst->narrow(0, r0, r);
          if (c0 == 0) rows.copy_(sums); else rows.add_(sums);
        }
      }
      if (grads) {
        const Tensor gb = g.narrow(0, 0, r * c).view({r, c});
        accumulate_product(out.gy.narrow(0, r0, r), gb, pr.y.narrow(0, c0, c), c0 == 0, tmp);
        accumulate_product(out.gx.narrow(0, c0, c), gb.t(), pr.x.narrow(0, r0, r), r0 == 0, tmp);
      }
    }
  }
  if (scales.defined()) {
    const Tensor inverse = scales[1];
    out.gy.mul_(inverse);
    out.gx.mul_(inverse);
  }
}

// exclude [M, E] int64, contiguous, beside x: row i's listed column indices into y, -1 padded (op
// lse_exclude); the kernels read it as it is (launch.cu offsets it to each block).
void set_exclude(Problem& pr, const Tensor& exclude) {
  check_on(exclude, pr.x, "exclude");
  TORCH_CHECK(exclude.dim() == 2 && exclude.size(0) == pr.in.m && exclude.is_contiguous(), "fastcl: exclude must be ",
              "a contiguous [", pr.in.m, ", E] matrix, got ", exclude.sizes());
  TORCH_CHECK(exclude.scalar_type() == at::kLong, "fastcl: exclude must be ", at::kLong, ", got ",
              exclude.scalar_type());
  pr.in.exclude = exclude.data_ptr<int64_t>();
  pr.in.exclude_width = exclude.size(1);
}

std::tuple<Tensor, Tensor> lse_forward_problem(const Problem& pr, bool rows, bool cols) {
  const Tensor& x = pr.x;
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor row_lse = at::empty({rows ? pr.in.m : 0}, f32), col_lse = at::empty({cols ? pr.in.n : 0}, f32);
  const int64_t budget = workspace_budget();
  Tensor ws = workspace(cuda::lse_forward_workspace_bytes(pr.in, rows, cols, budget), x);
  check_launch(cuda::lse_forward(pr.in, rows, cols, row_lse.data_ptr<float>(), col_lse.data_ptr<float>(),
                                 ws.data_ptr(), budget, current_stream(x.device())),
               "lse_forward");
  return {row_lse, col_lse};
}

std::tuple<Tensor, Tensor> lse_forward_cuda(const Tensor& x, const Tensor& y, const Tensor& scale,
                                            const std::optional<Tensor>& row_keys,
                                            const std::optional<Tensor>& col_keys, bool rows, bool cols) {
  const c10::DeviceGuard guard(x.device());
  return lse_forward_problem(problem(x, y, scale, row_keys, col_keys), rows, cols);
}

std::tuple<Tensor, Tensor> lse_forward_excluding_cuda(const Tensor& x, const Tensor& y, const Tensor& scale,
                                                      const std::optional<Tensor>& row_keys,
                                                      const std::optional<Tensor>& col_keys, const Tensor& exclude,
                                                      bool rows, bool cols) {
  const c10::DeviceGuard guard(x.device());
  Problem pr = problem(x, y, scale, row_keys, col_keys);
  set_exclude(pr, exclude);
  return lse_forward_problem(pr, rows, cols);
}

std::tuple<Tensor, Tensor> lse_backward_problem(const Problem& pr, const Tensor& row_shift, const Tensor& col_shift,
                                                const Tensor& g_row, const Tensor& g_col, bool rows, bool cols) {
  const Tensor& x = pr.x;
  if (rows) {
    check_vector(row_shift, x, pr.in.m, at::kFloat, "row_shift");
    check_vector(g_row, x, pr.in.m, at::kFloat, "g_row");
  }
  if (cols) {
    check_vector(col_shift, x, pr.in.n, at::kFloat, "col_shift");
    check_vector(g_col, x, pr.in.n, at::kFloat, "g_col");
  }
  const auto f32 = x.options().dtype(at::kFloat);
  GradOutputs out;
  out.gy = at::zeros({pr.in.m, x.size(1)}, f32);  // zeros: an empty side (n = 0) adds nothing
  out.gx = at::zeros({pr.in.n, x.size(1)}, f32);
  if ((!rows && !cols) || x.size(1) == 0) return {out.gy, out.gx};
  cuda::GradTerms terms{};
  terms.kind = cuda::GradKind::kLse;
  terms.row_shift = rows ? row_shift.data_ptr<float>() : nullptr;
  terms.g_row = rows ? g_row.data_ptr<float>() : nullptr;
  terms.col_shift = cols ? col_shift.data_ptr<float>() : nullptr;
  terms.g_col = cols ? g_col.data_ptr<float>() : nullptr;
  gradient_pass(pr, terms, terms.g_row, terms.g_col, 0.0f, out, current_stream(x.device()));
  return {out.gy, out.gx};
}

std::tuple<Tensor, Tensor> lse_backward_cuda(const Tensor& x, const Tensor& y, const Tensor& scale,
                                             const std::optional<Tensor>& row_keys,
                                             const std::optional<Tensor>& col_keys, const Tensor& row_shift,
                                             const Tensor& col_shift, const Tensor& g_row, const Tensor& g_col,
                                             bool rows, bool cols) {
  const c10::DeviceGuard guard(x.device());
  return lse_backward_problem(problem(x, y, scale, row_keys, col_keys), row_shift, col_shift, g_row, g_col, rows,
                              cols);
}

std::tuple<Tensor, Tensor> lse_backward_excluding_cuda(const Tensor& x, const Tensor& y, const Tensor& scale,
                                                       const std::optional<Tensor>& row_keys,
                                                       const std::optional<Tensor>& col_keys, const Tensor& exclude,
                                                       const Tensor& row_shift, const Tensor& col_shift,
                                                       const Tensor& g_row, const Tensor& g_col, bool rows,
                                                       bool cols) {
  const c10::DeviceGuard guard(x.device());
  Problem pr = problem(x, y, scale, row_keys, col_keys);
  set_exclude(pr, exclude);
  return lse_backward_problem(pr, row_shift, col_shift, g_row, g_col, rows, cols);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pointwise_cuda(const Tensor& x, const Tensor& y, const Tensor& scale,
                                                          const std::optional<Tensor>& row_bias,
                                                          const std::optional<Tensor>& row_keys,
                                                          const std::optional<Tensor>& col_keys, int64_t kind,
                                                          const std::optional<Tensor>& g_row, bool want_grads) {
  TORCH_CHECK(kind == 0 || kind == 1, "fastcl: pointwise kind must be 0 (siglip) or 1 (mw), got ", kind);
  const c10::DeviceGuard guard(x.device());
  const Problem pr = problem(x, y, scale, row_keys, col_keys);
  cuda::GradTerms terms{};
  terms.kind = kind == 0 ? cuda::GradKind::kSigLip : cuda::GradKind::kMW;
  if (row_bias.has_value()) {
    check_vector(*row_bias, x, pr.in.m, at::kFloat, "row_bias");
    terms.row_bias = row_bias->data_ptr<float>();
  }
  if (g_row.has_value()) {
    check_vector(*g_row, x, pr.in.m, at::kFloat, "g_row");
    terms.row_weight = g_row->data_ptr<float>();
  }
  const auto f32 = x.options().dtype(at::kFloat);
  GradOutputs out;
  out.row_loss = at::zeros({pr.in.m}, f32);  // zeros: an empty side (n = 0) sums to 0
  if (want_grads) {
    out.gy = at::zeros({pr.in.m, x.size(1)}, f32);
    out.gx = at::zeros({pr.in.n, x.size(1)}, f32);
    out.dsum = at::zeros({pr.in.m}, f32);
  }
  // |G| <= |w| (sigmoid <= 1), and 1 when no weight is given
  gradient_pass(pr, terms, terms.row_weight, nullptr, terms.row_weight != nullptr ? 0.0f : 1.0f, out,
                current_stream(x.device()));
  const Tensor none = at::empty({0}, f32);
  return {out.row_loss, want_grads ? out.gy : none, want_grads ? out.gx : none, want_grads ? out.dsum : none};
}

// ---- op lse_prefixes -------------------------------------------------------------------------------

// One call's prefixes: dims (checked: strictly increasing within [1, D]), the kernels' copies of x
// and y with each segment [d_{q-1}, d_q) starting on a 16-byte chunk (plan.h prefix_ends; the caller's
// rows when every d_q already is one), and the factors as float32 [K, M], [K, N].
struct Prefixes {
  std::vector<int64_t> dims, ends;
  Tensor row_scale, col_scale;
  cuda::PrefixInputs in{};
};

// t's features laid out on the segments: segment q's d_q - d_{q-1} features at ends[q - 1], zeros to ends[q].
Tensor segment_features(const Tensor& t, const std::vector<int64_t>& dims, const std::vector<int64_t>& ends) {
  Tensor out = at::zeros({t.size(0), ends.back()}, t.options());
  int64_t start = 0, at = 0;
  for (size_t q = 0; q < dims.size(); ++q) {
    out.narrow(1, at, dims[q] - start).copy_(t.narrow(1, start, dims[q] - start));
    start = dims[q];
    at = ends[q];
  }
  return out;
}

Prefixes prefixes(Problem& pr, at::IntArrayRef dims, const std::optional<Tensor>& row_scale,
                  const std::optional<Tensor>& col_scale) {
  const Tensor& x = pr.x;
  const int64_t k = static_cast<int64_t>(dims.size()), d = x.size(1);
  TORCH_CHECK(k > 0, "fastcl: dims must name at least one prefix");
  for (int64_t q = 0; q < k; ++q) {
    TORCH_CHECK(dims[q] > (q ? dims[q - 1] : 0) && dims[q] <= d, "fastcl: dims must increase strictly within [1, ",
                d, "], got ", dims);
  }
  TORCH_CHECK(row_scale.has_value() == col_scale.has_value(), "fastcl: pass both row_scale and col_scale, or neither");
  Prefixes pf;
  pf.dims = dims.vec();
  pf.ends.resize(k);
  const int64_t elem = static_cast<int64_t>(x.element_size());
  cuda::plan::prefix_ends(pf.dims.data(), k, elem, pf.ends.data());
  // the caller's rows serve when every segment already starts on a chunk and they are aligned (problem()
  // made xk, yk aligned copies of the whole width otherwise: zero past D, which the last end never passes)
  if (pf.ends != pf.dims) {
    pr.xk = segment_features(x, pf.dims, pf.ends);
    pr.yk = segment_features(pr.y, pf.dims, pf.ends);
    pr.in.x = pr.xk.data_ptr();
    pr.in.y = pr.yk.data_ptr();
    pr.in.d = pr.in.ldx = pr.in.ldy = pf.ends.back();
  }
  if (row_scale.has_value()) {
    for (auto [t, len, name] : {std::tuple{&*row_scale, pr.in.m, "row_scale"}, {&*col_scale, pr.in.n, "col_scale"}}) {
      check_on(*t, x, name);
      TORCH_CHECK(t->dim() == 2 && t->size(0) == k && t->size(1) == len, "fastcl: ", name, " must be a [", k, ", ",
                  len, "] tensor, got ", t->sizes());
      TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fastcl: ", name, " must be floating point, got ",
                  t->scalar_type());
    }
    pf.row_scale = row_scale->detach().to(at::kFloat).contiguous();
    pf.col_scale = col_scale->detach().to(at::kFloat).contiguous();
    pf.in.row_scale = pf.row_scale.data_ptr<float>();
    pf.in.col_scale = pf.col_scale.data_ptr<float>();
  }
  pf.in.prefixes = k;
  pf.in.ends = pf.ends.data();
  return pf;
}

std::tuple<Tensor, Tensor> lse_forward_prefixes_cuda(const Tensor& x, const Tensor& y, const Tensor& scale,
                                                     at::IntArrayRef dims, const std::optional<Tensor>& row_scale,
                                                     const std::optional<Tensor>& col_scale, bool rows, bool cols) {
  const c10::DeviceGuard guard(x.device());
  Problem pr = problem(x, y, scale, std::nullopt, std::nullopt);
  const Prefixes pf = prefixes(pr, dims, row_scale, col_scale);
  const int64_t k = pf.in.prefixes;
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor row_lse = at::empty({k, rows ? pr.in.m : 0}, f32), col_lse = at::empty({k, cols ? pr.in.n : 0}, f32);
  if (!rows && !cols) return {row_lse, col_lse};
  const int64_t budget = workspace_budget();
  Tensor ws = workspace(cuda::lse_forward_prefixes_workspace_bytes(pr.in, k, rows, cols, budget), x);
  check_launch(cuda::lse_forward_prefixes(pr.in, pf.in, rows, cols, row_lse.data_ptr<float>(),
                                          col_lse.data_ptr<float>(), ws.data_ptr(), budget,
                                          current_stream(x.device())),
               "lse_forward_prefixes");
  return {row_lse, col_lse};
}

// A [K, len] float32 statistic or upstream gradient, contiguous, beside x.
Tensor prefix_terms(const Tensor& t, const Tensor& x, int64_t k, int64_t len, const char* name) {
  check_on(t, x, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == k && t.size(1) == len, "fastcl: ", name, " must be a [", k, ", ", len,
              "] tensor, got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fastcl: ", name, " must be floating point, got ", t.scalar_type());
  return t.detach().to(at::kFloat).contiguous();
}

// dst (a view) = a @ b (first) or += a @ b, the product into tmp's first rows x cols (contiguous) first.
void accumulate_into(Tensor dst, const Tensor& a, const Tensor& b, bool first, const Tensor& tmp) {
  Tensor part = tmp.narrow(0, 0, dst.size(0) * dst.size(1)).view({dst.size(0), dst.size(1)});
  product(part, a, b);
  if (first) {
    dst.copy_(part);
  } else {
    dst.add_(part);
  }
}

// What one prefix gradient pass produces (undefined: not wanted).
struct PrefixOutputs {
  Tensor gy, gx;              // [m, D], [n, D] float32: segment s of the features sum_{k >= s} H^k @ y, H^k.T @ x
  Tensor row_gs, col_gs;      // [K, m], [K, n]: row and column sums of G^k T^k
  Tensor row_loss, dsum;      // pointwise: [K, m] row sums of the loss, [m] row sums of sum_k G^k
};

// Every block of S in a fixed order, and in it each group of at most kMaxPrefixes prefixes: the tile
// kernel writes the group's suffix-summed H blocks and its partials; then per prefix q of the group,
// segment q's two GEMMs (its features of the caller's x and y: the group's first segment starts at
// feature 0) add slot q @ y into gy's rows and slot q^T @ x into gx's. The segments of one group
// partition [0, d_q1): the GEMM work of one loss at d_K when K <= kMaxPrefixes. `bound` [K] bounds
// |G^k| (float16's scale: every suffix sum of a^k b^k G^k stays below 2^kGradScaleLog2 after it).
void prefix_gradient_pass(const Problem& pr, const Prefixes& pf, cuda::PrefixTerms terms, Tensor bound,
                          PrefixOutputs& out, cudaStream_t stream) {
  const cuda::PairInputs& in = pr.in;
  const int64_t k = pf.in.prefixes, m = in.m, n = in.n;
  const bool grads = out.gy.defined(), pointwise = terms.kind != cuda::GradKind::kLse;
  const auto f32 = pr.x.options().dtype(at::kFloat);
  const int64_t group = cuda::plan::prefix_group(k);
  const cuda::plan::Block block = cuda::plan::gradient_block(m, n, static_cast<int64_t>(pr.x.element_size()),
                                                             workspace_budget(), group);
  const int64_t slot = block.rows * block.cols;
  Tensor g, tmp, scales;
  if (grads) {
    g = at::empty({group * slot}, pr.x.options());  // the group's H blocks in the input type
    tmp = at::empty({std::max(block.rows, block.cols) * pr.x.size(1)}, f32);
    if (in.dtype == cuda::DType::kFloat16) {
      if (pf.row_scale.defined()) bound = bound * pf.row_scale.abs().amax(1) * pf.col_scale.abs().amax(1);
      Tensor gmax = bound.sum().reshape({1}).contiguous();
      scales = at::empty({2}, f32);
      check_launch(cuda::grad_scale(gmax.data_ptr<float>(), 1, nullptr, 0, 0.0f, scales.data_ptr<float>(), stream),
                   "gradient scale");
      terms.g_scale = scales.data_ptr<float>();
    }
  }
  const int64_t row_tiles = cuda::cdiv(block.rows, cuda::kBlockA), col_tiles = cuda::cdiv(block.cols, cuda::kBlockB);
  // [group][rows][column tiles] partials: G T, and pointwise the loss and G; [group][row tiles][cols]: G T
  Tensor row_parts = at::empty({pointwise ? 3 : 1, group * block.rows * col_tiles}, f32);
  Tensor col_parts = at::empty({group * row_tiles * block.cols}, f32);
  for (int64_t r0 = 0; r0 < m; r0 += block.rows) {
    for (int64_t c0 = 0; c0 < n; c0 += block.cols) {
      const int64_t r = std::min(block.rows, m - r0), c = std::min(block.cols, n - c0);
      const int64_t rt = cuda::cdiv(r, cuda::kBlockA), ct = cuda::cdiv(c, cuda::kBlockB);
      for (int64_t q0 = 0; q0 < k; q0 += group) {
        const int64_t q1 = std::min(k, q0 + group), gk = q1 - q0;
        check_launch(cuda::grad_block_prefixes(in, pf.in, q0, q1, terms, {r0, r0 + r, c0, c0 + c},
                                               grads ? g.data_ptr() : nullptr, c, slot, row_parts[0].data_ptr<float>(),
                                               col_parts.data_ptr<float>(),
                                               pointwise ? row_parts[1].data_ptr<float>() : nullptr,
                                               pointwise && out.dsum.defined() ? row_parts[2].data_ptr<float>() : nullptr,
                                               stream),
                     "prefix gradient tile");
        // the partials, summed in a fixed order (one writer each in the kernel)
        const auto row_sums = [&](int i) { return row_parts[i].narrow(0, 0, gk * r * ct).view({gk, r, ct}).sum(2); };
        const auto add_rows = [&](Tensor dst, const Tensor& sums) {
          if (c0 == 0) dst.copy_(sums); else dst.add_(sums);
        };
        if (out.row_gs.defined()) {
          add_rows(out.row_gs.narrow(0, q0, gk).narrow(1, r0, r), row_sums(0));
          Tensor col_sums = col_parts.narrow(0, 0, gk * rt * c).view({gk, rt, c}).sum(1);
          Tensor col_dst = out.col_gs.narrow(0, q0, gk).narrow(1, c0, c);
          if (r0 == 0) col_dst.copy_(col_sums); else col_dst.add_(col_sums);
        }
        if (pointwise) add_rows(out.row_loss.narrow(0, q0, gk).narrow(1, r0, r), row_sums(1));
        if (out.dsum.defined()) {  // sum over the group's prefixes too: groups after the first add
          Tensor sums = row_sums(2).sum(0);
          Tensor dst = out.dsum.narrow(0, r0, r);
          if (c0 == 0 && q0 == 0) dst.copy_(sums); else dst.add_(sums);
        }
        if (!grads) continue;
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t start = q == q0 ? 0 : pf.dims[q - 1], width = pf.dims[q] - start;
          const Tensor h = g.narrow(0, (q - q0) * slot, r * c).view({r, c});
          accumulate_into(out.gy.narrow(0, r0, r).narrow(1, start, width), h,
                          pr.y.narrow(0, c0, c).narrow(1, start, width), c0 == 0 && q0 == 0, tmp);
          accumulate_into(out.gx.narrow(0, c0, c).narrow(1, start, width), h.t(),
                          pr.x.narrow(0, r0, r).narrow(1, start, width), r0 == 0 && q0 == 0, tmp);
        }
      }
    }
  }
  if (scales.defined()) {
    const Tensor inverse = scales[1];
    out.gy.mul_(inverse);
    out.gx.mul_(inverse);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lse_backward_prefixes_cuda(
    const Tensor& x, const Tensor& y, const Tensor& scale, at::IntArrayRef dims,
    const std::optional<Tensor>& row_scale, const std::optional<Tensor>& col_scale, const Tensor& row_shift,
    const Tensor& col_shift, const Tensor& g_row, const Tensor& g_col, bool rows, bool cols) {
  const c10::DeviceGuard guard(x.device());
  Problem pr = problem(x, y, scale, std::nullopt, std::nullopt);
  const Prefixes pf = prefixes(pr, dims, row_scale, col_scale);
  const int64_t k = pf.in.prefixes, m = pr.in.m, n = pr.in.n;
  const auto f32 = x.options().dtype(at::kFloat);
  PrefixOutputs out;
  out.gy = at::zeros({m, x.size(1)}, f32);  // zeros: features past d_K, and an empty side
  out.gx = at::zeros({n, x.size(1)}, f32);
  out.row_gs = at::zeros({k, m}, f32);
  out.col_gs = at::zeros({k, n}, f32);
  Tensor rs, cs, gr, gc;
  if (rows) {
    rs = prefix_terms(row_shift, x, k, m, "row_shift");
    gr = prefix_terms(g_row, x, k, m, "g_row");
  }
  if (cols) {
    cs = prefix_terms(col_shift, x, k, n, "col_shift");
    gc = prefix_terms(g_col, x, k, n, "g_col");
  }
  if ((!rows && !cols) || m == 0 || n == 0) return {out.gy, out.gx, out.row_gs, out.col_gs};
  cuda::PrefixTerms terms{};
  terms.kind = cuda::GradKind::kLse;
  terms.row_shift = rows ? rs.data_ptr<float>() : nullptr;
  terms.g_row = rows ? gr.data_ptr<float>() : nullptr;
  terms.col_shift = cols ? cs.data_ptr<float>() : nullptr;
  terms.g_col = cols ? gc.data_ptr<float>() : nullptr;
  // |G^k| <= max|g_row^k| + max|g_col^k| (exp(S - lse) <= 1)
  Tensor bound = at::zeros({k}, f32);
  if (rows) bound = bound + gr.abs().amax(1);
  if (cols) bound = bound + gc.abs().amax(1);
  prefix_gradient_pass(pr, pf, terms, bound, out, current_stream(x.device()));
  return {out.gy, out.gx, out.row_gs, out.col_gs};
}

// ---- op pointwise_prefixes ---------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> pointwise_prefixes_cuda(
    const Tensor& x, const Tensor& y, const Tensor& scale, const std::optional<Tensor>& row_bias,
    at::IntArrayRef dims, const std::optional<Tensor>& row_scale, const std::optional<Tensor>& col_scale,
    const std::optional<Tensor>& row_keys, const std::optional<Tensor>& col_keys, int64_t kind,
    const std::optional<Tensor>& g_row, bool want_grads) {
  TORCH_CHECK(kind == 0 || kind == 1, "fastcl: pointwise kind must be 0 (siglip) or 1 (mw), got ", kind);
  const c10::DeviceGuard guard(x.device());
  Problem pr = problem(x, y, scale, row_keys, col_keys);
  const Prefixes pf = prefixes(pr, dims, row_scale, col_scale);
  const int64_t k = pf.in.prefixes, m = pr.in.m, n = pr.in.n;
  const auto f32 = x.options().dtype(at::kFloat);
  cuda::PrefixTerms terms{};
  terms.kind = kind == 0 ? cuda::GradKind::kSigLip : cuda::GradKind::kMW;
  Tensor bias, weight;
  if (row_bias.has_value()) {
    check_vector(*row_bias, x, m, at::kFloat, "row_bias");
    bias = *row_bias;
    terms.row_bias = bias.data_ptr<float>();
  }
  if (g_row.has_value()) {
    weight = prefix_terms(*g_row, x, k, m, "g_row");
    terms.g_row = weight.data_ptr<float>();
  }
  PrefixOutputs out;
  out.row_loss = at::zeros({k, m}, f32);  // zeros: an empty side (n = 0) sums to 0
  if (want_grads) {
    out.gy = at::zeros({m, x.size(1)}, f32);
    out.gx = at::zeros({n, x.size(1)}, f32);
    out.dsum = at::zeros({m}, f32);
    out.row_gs = at::zeros({k, m}, f32);
    out.col_gs = at::zeros({k, n}, f32);
  }
  if (m > 0 && n > 0) {
    // |G^k| <= |w^k| (sigmoid <= 1), and 1 when no weight is given
    Tensor bound = weight.defined() ? weight.abs().amax(1) : at::ones({k}, f32);
    prefix_gradient_pass(pr, pf, terms, bound, out, current_stream(x.device()));
  }
  const Tensor none = at::empty({0}, f32);
  if (!want_grads) return {out.row_loss, none, none, none, none, none};
  return {out.row_loss, out.gy, out.gx, out.dsum, out.row_gs, out.col_gs};
}

}  // namespace

#ifndef FASTCL_HOST_EXEC
TORCH_LIBRARY_IMPL(fastcl, CUDA, m) {
  m.impl("lse_forward", &lse_forward_cuda);
  m.impl("lse_backward", &lse_backward_cuda);
  m.impl("lse_forward_excluding", &lse_forward_excluding_cuda);
  m.impl("lse_backward_excluding", &lse_backward_excluding_cuda);
  m.impl("pointwise", &pointwise_cuda);
  m.impl("lse_forward_prefixes", &lse_forward_prefixes_cuda);
  m.impl("lse_backward_prefixes", &lse_backward_prefixes_cuda);
  m.impl("pointwise_prefixes", &pointwise_prefixes_cuda);
}
#endif

}  // namespace fastcl
