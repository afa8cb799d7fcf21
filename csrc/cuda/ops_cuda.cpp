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
// workspace FASTCL_WORKSPACE_MB bounds (plan.h, the Triton engine's rule). The Matryoshka prefix
// ops' glue is ops_cuda_prefixes.inc, included below. The symmetric ops have no CUDA kernels yet.
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

// ---- ops lse_prefixes, pointwise_prefixes (ops_cuda_prefixes.inc says why it is included) ---------
#include "ops_cuda_prefixes.inc"

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
