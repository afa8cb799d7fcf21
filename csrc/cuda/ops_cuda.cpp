// CUDA implementations of the fastcl::* operators (schemas in csrc/ops.cpp): boundary checks, then
// the torch-free launchers of kernels/launch.h on the current stream. Compiled only when the
// extension is built with FASTCL_CUDA_ARCHS.
//
// No c10_cuda: the device guard and the current stream come through c10's device-generic
// interfaces (c10::DeviceGuard, DeviceGuardImplInterface::getStream, Stream::native_handle), which
// the CUDA build of torch implements at run time. So this file compiles against any torch (a CPU
// wheel included) with only the CUDA toolkit's cuda_runtime.h, and links no CUDA library of torch.
//
// Inputs: float32, float16 or bfloat16 features (16-bit ones run on 16-bit tensor cores); every
// statistic, gradient and loss comes back in float32. The symmetric ops have no CUDA kernels yet.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "kernels/launch.h"

namespace fastcl {

namespace {

using at::Tensor;

// torch's current CUDA stream on `device` (what c10::cuda::getCurrentCUDAStream(index) returns).
cudaStream_t current_stream(const at::Device& device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

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
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "fastcl: ", name, " must be on ", like.device(),
              ", got ", t.device());
}

void check_vector(const Tensor& t, const Tensor& like, int64_t length, at::ScalarType dtype, const char* name) {
  check_on(t, like, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length && t.is_contiguous(), "fastcl: ", name,
              " must be a contiguous vector of length ", length, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fastcl: ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// The launcher arguments for S = scale * x @ y.T. `scale_holder` keeps a device float32 copy of a
// CUDA scale alive (read by the kernels: no host sync); a CPU scale is read here.
cuda::PairInputs pair_inputs(const Tensor& x, const Tensor& y, const Tensor& scale,
                             const std::optional<Tensor>& row_keys, const std::optional<Tensor>& col_keys,
                             Tensor& scale_holder) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, "fastcl: x and y must be 2-D, got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.size(1) == y.size(1), "fastcl: x and y must have the same feature width, got ", x.size(1),
              " and ", y.size(1));
  TORCH_CHECK(x.is_cuda(), "fastcl: the CUDA kernels take CUDA tensors, got x on ", x.device());
  check_on(y, x, "y");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "fastcl: x and y must share a dtype");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "fastcl: x and y must be contiguous");
  TORCH_CHECK(scale.numel() == 1, "fastcl: scale must hold one value");
  TORCH_CHECK(row_keys.has_value() == col_keys.has_value(), "fastcl: pass both row_keys and col_keys, or neither");

  cuda::PairInputs in{};
  in.dtype = kernel_dtype(x);
  in.x = x.data_ptr();
  in.y = y.data_ptr();
  in.m = x.size(0);
  in.n = y.size(0);
  in.d = x.size(1);
  in.ldx = in.d;
  in.ldy = in.d;
  if (scale.is_cuda()) {
    check_on(scale, x, "scale");
    scale_holder = scale.detach().reshape({}).to(at::kFloat).contiguous();
    in.scale_ptr = scale_holder.data_ptr<float>();
  } else {
    in.scale = static_cast<float>(scale.item<double>());
  }
  if (row_keys.has_value()) {
    check_vector(*row_keys, x, in.m, at::kLong, "row_keys");
    check_vector(*col_keys, x, in.n, at::kLong, "col_keys");
    in.row_keys = row_keys->data_ptr<int64_t>();
    in.col_keys = col_keys->data_ptr<int64_t>();
  }
  return in;
}

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<Tensor, Tensor> lse_forward_cuda(const Tensor& x, const Tensor& y, const Tensor& scale,
                                            const std::optional<Tensor>& row_keys,
                                            const std::optional<Tensor>& col_keys, bool rows, bool cols) {
  const c10::DeviceGuard guard(x.device());
  Tensor scale_holder;
  const cuda::PairInputs in = pair_inputs(x, y, scale, row_keys, col_keys, scale_holder);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor row_lse = at::empty({rows ? in.m : 0}, f32), col_lse = at::empty({cols ? in.n : 0}, f32);
  Tensor ws = workspace(cuda::lse_forward_workspace_bytes(in), x);
  check_launch(cuda::lse_forward(in, rows, cols, row_lse.data_ptr<float>(), col_lse.data_ptr<float>(),
                                 ws.data_ptr(), current_stream(x.device())),
               "lse_forward");
  return {row_lse, col_lse};
}

std::tuple<Tensor, Tensor> lse_backward_cuda(const Tensor& x, const Tensor& y, const Tensor& scale,
                                             const std::optional<Tensor>& row_keys,
                                             const std::optional<Tensor>& col_keys, const Tensor& row_shift,
                                             const Tensor& col_shift, const Tensor& g_row, const Tensor& g_col,
                                             bool rows, bool cols) {
  const c10::DeviceGuard guard(x.device());
  Tensor scale_holder;
  const cuda::PairInputs in = pair_inputs(x, y, scale, row_keys, col_keys, scale_holder);
  if (rows) {
    check_vector(row_shift, x, in.m, at::kFloat, "row_shift");
    check_vector(g_row, x, in.m, at::kFloat, "g_row");
  }
  if (cols) {
    check_vector(col_shift, x, in.n, at::kFloat, "col_shift");
    check_vector(g_col, x, in.n, at::kFloat, "g_col");
  }
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor gy = at::empty({in.m, in.d}, f32), gx = at::empty({in.n, in.d}, f32);
  Tensor ws = workspace(cuda::lse_backward_workspace_bytes(in), x);
  check_launch(cuda::lse_backward(in, rows ? row_shift.data_ptr<float>() : nullptr,
                                  rows ? g_row.data_ptr<float>() : nullptr,
                                  cols ? col_shift.data_ptr<float>() : nullptr,
                                  cols ? g_col.data_ptr<float>() : nullptr, gy.data_ptr<float>(),
                                  gx.data_ptr<float>(), ws.data_ptr(), current_stream(x.device())),
               "lse_backward");
  return {gy, gx};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pointwise_cuda(const Tensor& x, const Tensor& y, const Tensor& scale,
                                                          const std::optional<Tensor>& row_bias,
                                                          const std::optional<Tensor>& row_keys,
                                                          const std::optional<Tensor>& col_keys, int64_t kind,
                                                          const std::optional<Tensor>& g_row, bool want_grads) {
  TORCH_CHECK(kind == 0 || kind == 1, "fastcl: pointwise kind must be 0 (siglip) or 1 (mw), got ", kind);
  const c10::DeviceGuard guard(x.device());
  Tensor scale_holder;
  const cuda::PairInputs in = pair_inputs(x, y, scale, row_keys, col_keys, scale_holder);
  const float* bias = nullptr;
  const float* weight = nullptr;
  if (row_bias.has_value()) {
    check_vector(*row_bias, x, in.m, at::kFloat, "row_bias");
    bias = row_bias->data_ptr<float>();
  }
  if (g_row.has_value()) {
    check_vector(*g_row, x, in.m, at::kFloat, "g_row");
    weight = g_row->data_ptr<float>();
  }
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor row_loss = at::empty({in.m}, f32);
  Tensor gy = want_grads ? at::empty({in.m, in.d}, f32) : at::empty({0}, f32);
  Tensor gx = want_grads ? at::empty({in.n, in.d}, f32) : at::empty({0}, f32);
  Tensor d_bias = want_grads ? at::empty({in.m}, f32) : at::empty({0}, f32);
  Tensor ws = workspace(cuda::pointwise_workspace_bytes(in, want_grads), x);
  check_launch(cuda::pointwise(in, static_cast<int>(kind), bias, weight, want_grads, row_loss.data_ptr<float>(),
                               want_grads ? gy.data_ptr<float>() : nullptr,
                               want_grads ? gx.data_ptr<float>() : nullptr,
                               want_grads ? d_bias.data_ptr<float>() : nullptr, ws.data_ptr(),
                               current_stream(x.device())),
               "pointwise");
  return {row_loss, gy, gx, d_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcl, CUDA, m) {
  m.impl("lse_forward", &lse_forward_cuda);
  m.impl("lse_backward", &lse_backward_cuda);
  m.impl("pointwise", &pointwise_cuda);
}

}  // namespace fastcl
