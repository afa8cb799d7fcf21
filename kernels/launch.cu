// Host launchers (launch.h): split the work, carve the workspace, launch the kernels on the
// caller's stream, and merge the partials in a fixed order.
#include <algorithm>
#include <cmath>

#include "kernels.h"
#include "launch.h"
#include "static_switch.h"
#include "tile.cuh"

namespace fastcl::cuda {

namespace {

// Splitting B's tiles over more CTAs fills the GPU when A has few row tiles. The split depends on
// the shape only (never on the device), so results are the same bits on every GPU model.
constexpr int64_t kTargetCtas = 264;  // 2 x 132 multiprocessors (H100 / H200 SXM)
constexpr int64_t kMaxSplits = 32;    // bounds the partial buffers: splits x rows x d floats
constexpr int kReduceThreads = 256;

struct Split {
  int64_t per, count;  // B tiles per split, number of splits
};

Split split_b(int64_t ctas, int64_t b_tiles) {
  if (b_tiles <= 0) return {1, 1};
  const int64_t want = std::clamp<int64_t>(cdiv(kTargetCtas, std::max<int64_t>(ctas, 1)), 1,
                                           std::min(b_tiles, kMaxSplits));
  const int64_t per = cdiv(b_tiles, want);
  return {per, cdiv(b_tiles, per)};
}

// Bump allocator over the workspace; with a null base it only counts bytes.
class Carve {
 public:
  explicit Carve(void* base) : base_(static_cast<char*>(base)) {}
  float* take(int64_t count) {
    char* at = base_ == nullptr ? nullptr : base_ + used_;
    used_ += (static_cast<size_t>(std::max<int64_t>(count, 0)) * sizeof(float) + 255) / 256 * 256;
    return reinterpret_cast<float*>(at);
  }
  size_t bytes() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

size_t elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

bool rows_aligned16(const void* p, int64_t ld, int64_t d, size_t elem) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (static_cast<size_t>(ld) * elem) % 16 == 0 &&
         (static_cast<size_t>(d) * elem) % 16 == 0;
}

// (A, B) = (x, y), or (y, x) when swap.
PairParams pair_params(const PairInputs& in, bool swap, int64_t tiles_per_split) {
  PairParams p{};
  p.a = swap ? in.y : in.x;
  p.b = swap ? in.x : in.y;
  p.rows_a = swap ? in.n : in.m;
  p.rows_b = swap ? in.m : in.n;
  p.lda = swap ? in.ldy : in.ldx;
  p.ldb = swap ? in.ldx : in.ldy;
  p.d = in.d;
  p.scale_ptr = in.scale_ptr;
  p.scale = in.scale;
  const bool keyed = in.row_keys != nullptr && in.col_keys != nullptr;
  p.keys_a = keyed ? (swap ? in.col_keys : in.row_keys) : nullptr;
  p.keys_b = keyed ? (swap ? in.row_keys : in.col_keys) : nullptr;
  const size_t elem = elem_size(in.dtype);
  p.vec16 = rows_aligned16(in.x, in.ldx, in.d, elem) && rows_aligned16(in.y, in.ldy, in.d, elem);
  p.tiles_per_split = tiles_per_split;
  return p;
}

unsigned reduce_blocks(int64_t count) {
  return static_cast<unsigned>(std::clamp<int64_t>(cdiv(count, kReduceThreads), 1, 4096));
}

// out[l] = log-sum-exp of parts partials (shift, sum) [parts, len], merged in part order.
__global__ void merge_lse_kernel(const float* shift, const float* sum, int64_t parts, int64_t len, float* out) {
  for (int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; l < len;
       l += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float m = -INFINITY, s = 0.0f;
    for (int64_t q = 0; q < parts; ++q) lse_merge(m, s, shift[q * len + l], sum[q * len + l]);
    out[l] = m + logf(s);
  }
}

// out[i] = sum over splits of parts[split, i], in split order.
__global__ void sum_splits_kernel(const float* parts, int64_t splits, int64_t count, float* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float total = parts[i];
    for (int64_t q = 1; q < splits; ++q) total += parts[q * count + i];
    out[i] = total;
  }
}

cudaError_t merge_lse(const float* shift, const float* sum, int64_t parts, int64_t len, float* out,
                      cudaStream_t stream) {
  if (len == 0) return cudaSuccess;
  merge_lse_kernel<<<reduce_blocks(len), kReduceThreads, 0, stream>>>(shift, sum, parts, len, out);
  return cudaGetLastError();
}

cudaError_t sum_splits(const float* parts, int64_t splits, int64_t count, float* out, cudaStream_t stream) {
  if (count == 0 || out == nullptr) return cudaSuccess;
  sum_splits_kernel<<<reduce_blocks(count), kReduceThreads, 0, stream>>>(parts, splits, count, out);
  return cudaGetLastError();
}

cudaError_t zero(float* p, int64_t count, cudaStream_t stream) {
  if (p == nullptr || count == 0) return cudaSuccess;
  return cudaMemsetAsync(p, 0, static_cast<size_t>(count) * sizeof(float), stream);
}

// ---- lse forward ----------------------------------------------------------------------------

struct LseLayout {
  Split split;
  int64_t a_tiles;
  float *row_shift, *row_sum, *col_shift, *col_sum;
  size_t bytes;
};

LseLayout lse_layout(const PairInputs& in, void* workspace) {
  LseLayout l{};
  l.a_tiles = cdiv(in.m, kBlockA);
  l.split = split_b(l.a_tiles, cdiv(in.n, kBlockB));
  Carve carve(workspace);
  l.row_shift = carve.take(l.split.count * in.m);
  l.row_sum = carve.take(l.split.count * in.m);
  l.col_shift = carve.take(l.a_tiles * in.n);
  l.col_sum = carve.take(l.a_tiles * in.n);
  l.bytes = carve.bytes();
  return l;
}

// ---- gradient passes ------------------------------------------------------------------------

struct GradPass {
  bool swap;
  GradKind kind;
  const float *ga, *sa, *gb, *sb, *bias, *weight;
  bool a_is_row, accumulate;
  float* out;       // [rows_a, d] or nullptr
  float* row_loss;  // [rows_a] or nullptr
  float* row_dsum;  // [rows_a] or nullptr
};

struct GradLayout {
  int64_t rows_a, rows_b, a_tiles, d_chunks;
  Split split;
  float *out, *row_loss, *row_dsum;  // partials (or the outputs themselves when one split)
  size_t bytes;
};

GradLayout grad_layout(const PairInputs& in, const GradPass& pass, void* workspace) {
  GradLayout l{};
  l.rows_a = pass.swap ? in.n : in.m;
  l.rows_b = pass.swap ? in.m : in.n;
  l.a_tiles = cdiv(l.rows_a, kBlockA);
  l.d_chunks = pass.accumulate ? std::max<int64_t>(1, cdiv(in.d, kBlockD)) : 1;
  l.split = split_b(l.a_tiles * l.d_chunks, cdiv(l.rows_b, kBlockB));
  Carve carve(workspace);
  const bool partial = l.split.count > 1;
  l.out = partial && pass.out != nullptr ? carve.take(l.split.count * l.rows_a * in.d) : pass.out;
  l.row_loss = partial && pass.row_loss != nullptr ? carve.take(l.split.count * l.rows_a) : pass.row_loss;
  l.row_dsum = partial && pass.row_dsum != nullptr ? carve.take(l.split.count * l.rows_a) : pass.row_dsum;
  l.bytes = carve.bytes();
  return l;
}

cudaError_t run_grad_pass(const PairInputs& in, const GradPass& pass, void* workspace, cudaStream_t stream) {
  const GradLayout l = grad_layout(in, pass, workspace);
  if (l.rows_a == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  if (l.rows_b == 0) {  // empty sums
    if ((err = zero(pass.out, l.rows_a * in.d, stream)) != cudaSuccess) return err;
    if ((err = zero(pass.row_loss, l.rows_a, stream)) != cudaSuccess) return err;
    return zero(pass.row_dsum, l.rows_a, stream);
  }
  GradParams p{};
  static_cast<PairParams&>(p) = pair_params(in, pass.swap, l.split.per);
  p.ga = pass.ga;
  p.sa = pass.sa;
  p.gb = pass.gb;
  p.sb = pass.sb;
  p.bias = pass.bias;
  p.weight = pass.weight;
  p.a_is_row = pass.a_is_row;
  p.accumulate = pass.accumulate && pass.out != nullptr;
  p.out = l.out;
  p.row_loss = l.row_loss;
  p.row_dsum = l.row_dsum;
  const dim3 grid(static_cast<unsigned>(l.a_tiles), static_cast<unsigned>(l.d_chunks),
                  static_cast<unsigned>(l.split.count));
  err = FASTCL_DTYPE_SWITCH(in.dtype, T, [&] {
    return FASTCL_KIND_SWITCH(pass.kind, K, [&] { return run_pair_grad<T, K>(p, grid, stream); });
  });
  if (err != cudaSuccess || l.split.count == 1) return err;
  if ((err = sum_splits(l.out, l.split.count, l.rows_a * in.d, pass.out, stream)) != cudaSuccess) return err;
  if ((err = sum_splits(l.row_loss, l.split.count, l.rows_a, pass.row_loss, stream)) != cudaSuccess) return err;
  return sum_splits(l.row_dsum, l.split.count, l.rows_a, pass.row_dsum, stream);
}

GradPass lse_pass(bool swap, const float* row_shift, const float* g_row, const float* col_shift, const float* g_col,
                  float* out) {
  GradPass pass{};
  pass.swap = swap;
  pass.kind = GradKind::kLse;
  pass.ga = swap ? g_col : g_row;
  pass.sa = swap ? col_shift : row_shift;
  pass.gb = swap ? g_row : g_col;
  pass.sb = swap ? row_shift : col_shift;
  pass.accumulate = true;
  pass.out = out;
  return pass;
}

GradPass pointwise_pass(bool swap, int kind, const float* row_bias, const float* g_row, bool want_grads, float* out,
                        float* row_loss, float* d_bias) {
  GradPass pass{};
  pass.swap = swap;
  pass.kind = kind == 0 ? GradKind::kSigLip : GradKind::kMW;
  pass.bias = row_bias;
  pass.weight = g_row;
  pass.a_is_row = !swap;
  pass.accumulate = want_grads;
  pass.out = want_grads ? out : nullptr;
  pass.row_loss = swap ? nullptr : row_loss;
  pass.row_dsum = swap || !want_grads ? nullptr : d_bias;
  return pass;
}

}  // namespace

size_t lse_forward_workspace_bytes(const PairInputs& in) { return lse_layout(in, nullptr).bytes; }

cudaError_t lse_forward(const PairInputs& in, bool rows, bool cols, float* row_lse, float* col_lse, void* workspace,
                        cudaStream_t stream) {
  if (!rows && !cols) return cudaSuccess;
  const LseLayout l = lse_layout(in, workspace);
  const bool any = in.m > 0 && in.n > 0;
  cudaError_t err = cudaSuccess;
  if (any) {
    LseForwardParams p{};
    static_cast<PairParams&>(p) = pair_params(in, false, l.split.per);
    p.rows = rows;
    p.cols = cols;
    p.row_shift = l.row_shift;
    p.row_sum = l.row_sum;
    p.col_shift = l.col_shift;
    p.col_sum = l.col_sum;
    const dim3 grid(static_cast<unsigned>(l.a_tiles), static_cast<unsigned>(l.split.count));
    err = FASTCL_DTYPE_SWITCH(in.dtype, T, [&] { return run_lse_forward<T>(p, grid, stream); });
    if (err != cudaSuccess) return err;
  }
  if (rows && (err = merge_lse(l.row_shift, l.row_sum, any ? l.split.count : 0, in.m, row_lse, stream)) != cudaSuccess)
    return err;
  if (cols) err = merge_lse(l.col_shift, l.col_sum, any ? l.a_tiles : 0, in.n, col_lse, stream);
  return err;
}

size_t lse_backward_workspace_bytes(const PairInputs& in) {
  float* dummy = reinterpret_cast<float*>(alignof(float));  // non-null: the passes have outputs
  return std::max(grad_layout(in, lse_pass(false, nullptr, nullptr, nullptr, nullptr, dummy), nullptr).bytes,
                  grad_layout(in, lse_pass(true, nullptr, nullptr, nullptr, nullptr, dummy), nullptr).bytes);
}

cudaError_t lse_backward(const PairInputs& in, const float* row_shift, const float* g_row, const float* col_shift,
                         const float* g_col, float* gy, float* gx, void* workspace, cudaStream_t stream) {
  if (in.d == 0) return cudaSuccess;  // the gradients are empty
  cudaError_t err = run_grad_pass(in, lse_pass(false, row_shift, g_row, col_shift, g_col, gy), workspace, stream);
  if (err != cudaSuccess) return err;
  return run_grad_pass(in, lse_pass(true, row_shift, g_row, col_shift, g_col, gx), workspace, stream);
}

size_t pointwise_workspace_bytes(const PairInputs& in, bool want_grads) {
  float* dummy = reinterpret_cast<float*>(alignof(float));
  size_t bytes = grad_layout(in, pointwise_pass(false, 0, nullptr, nullptr, want_grads, dummy, dummy, dummy), nullptr).bytes;
  if (want_grads) {
    bytes = std::max(bytes, grad_layout(in, pointwise_pass(true, 0, nullptr, nullptr, true, dummy, dummy, dummy),
                                        nullptr).bytes);
  }
  return bytes;
}

cudaError_t pointwise(const PairInputs& in, int kind, const float* row_bias, const float* g_row, bool want_grads,
                      float* row_loss, float* gy, float* gx, float* d_bias, void* workspace, cudaStream_t stream) {
  if (kind != 0 && kind != 1) return cudaErrorInvalidValue;
  cudaError_t err = run_grad_pass(
      in, pointwise_pass(false, kind, row_bias, g_row, want_grads, gy, row_loss, d_bias), workspace, stream);
  if (err != cudaSuccess || !want_grads || in.d == 0) return err;
  return run_grad_pass(in, pointwise_pass(true, kind, row_bias, g_row, true, gx, nullptr, nullptr), workspace,
                       stream);
}

}  // namespace fastcl::cuda
