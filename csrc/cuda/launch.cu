// Host launchers (launch.h): cut S into blocks (plan.h), launch the tile kernels on the caller's
// stream, and merge partials in a fixed order.
#include <algorithm>
#include <cmath>

#include "kernels.h"
#include "launch.h"
#include "plan.h"
#include "static_switch.h"
#include "tile.cuh"

namespace fastcl::cuda {

namespace {

constexpr int kReduceThreads = 256;

size_t elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Whole 16-byte chunks: what every tile load assumes (mma.cuh TileLoader).
bool aligned(const PairInputs& in) {
  const size_t elem = elem_size(in.dtype);
  const auto chunked = [&](const void* p, int64_t ld) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (static_cast<size_t>(ld) * elem) % 16 == 0;
  };
  return chunked(in.x, in.ldx) && chunked(in.y, in.ldy) && (static_cast<size_t>(in.d) * elem) % 16 == 0;
}

// (A, B) = rows [r0, r1) of x and [c0, c1) of y.
PairParams pair_params(const PairInputs& in, const BlockRange& b, int64_t tiles_per_split) {
  const size_t elem = elem_size(in.dtype);
  PairParams p{};
  p.a = static_cast<const char*>(in.x) + static_cast<size_t>(b.r0 * in.ldx) * elem;
  p.b = static_cast<const char*>(in.y) + static_cast<size_t>(b.c0 * in.ldy) * elem;
  p.rows_a = b.r1 - b.r0;
  p.rows_b = b.c1 - b.c0;
  p.lda = in.ldx;
  p.ldb = in.ldy;
  p.d = in.d;
  p.scale_ptr = in.scale_ptr;
  p.scale = in.scale;
  const bool keyed = in.row_keys != nullptr && in.col_keys != nullptr;
  p.keys_a = keyed ? in.row_keys + b.r0 : nullptr;
  p.keys_b = keyed ? in.col_keys + b.c0 : nullptr;
  if (in.exclude != nullptr && in.exclude_width > 0) {  // rows from r0; the list's columns are y's, B starts at c0
    p.listed = in.exclude + b.r0 * in.exclude_width;
    p.listed_width = in.exclude_width;
    p.listed_col0 = b.c0;
  }
  p.tiles_per_split = tiles_per_split;
  return p;
}

unsigned reduce_blocks(int64_t count) {
  return static_cast<unsigned>(std::clamp<int64_t>(cdiv(count, kReduceThreads), 1, 4096));
}

// Fold parts partials (shift, sum) [parts, len] into the running (shift, sum) [len], in part order.
__global__ void fold_lse_kernel(float* run_shift, float* run_sum, const float* shift, const float* sum, int64_t parts,
                                int64_t len) {
  for (int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; l < len;
       l += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float m = run_shift[l], s = run_sum[l];
    for (int64_t q = 0; q < parts; ++q) lse_merge(m, s, shift[q * len + l], sum[q * len + l]);
    run_shift[l] = m;
    run_sum[l] = s;
  }
}

// out[l] = (shift + log2(sum)) ln 2, the natural log-sum-exp of base-2 partials (tile.cuh): -inf
// for a line that saw no pair (sum 0).
__global__ void finish_lse_kernel(const float* shift, const float* sum, int64_t len, float* out) {
  for (int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; l < len;
       l += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[l] = (shift[l] + log2f(sum[l])) * kLn2;
  }
}

// One CTA: max |v| over a vector, reduced in shared memory (max is exact in any order).
__device__ float block_abs_max(const float* v, int64_t len, float* red) {
  float mx = 0.0f;
  if (v != nullptr) {
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) mx = fmaxf(mx, fabsf(v[i]));
  }
  red[threadIdx.x] = mx;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + stride]);
    __syncthreads();
  }
  const float out = red[0];
  __syncthreads();
  return out;
}

__global__ void grad_scale_kernel(const float* g_row, int64_t m, const float* g_col, int64_t n, float extra,
                                  float* out) {
  __shared__ float red[kReduceThreads];
  const float gmax = extra + block_abs_max(g_row, m, red) + block_abs_max(g_col, n, red);
  if (threadIdx.x == 0) {
    const int k = plan::grad_scale_exponent(gmax);
    out[0] = ldexpf(1.0f, k);
    out[1] = ldexpf(1.0f, -k);
  }
}

cudaError_t fold_lse(float* run_shift, float* run_sum, const float* shift, const float* sum, int64_t parts,
                     int64_t len, cudaStream_t stream) {
  if (len == 0) return cudaSuccess;
  FASTCL_LAUNCH(reduce_blocks(len), kReduceThreads, 0, stream, fold_lse_kernel)
  (run_shift, run_sum, shift, sum, parts, len);
  return cudaGetLastError();
}

cudaError_t finish_lse(const float* shift, const float* sum, int64_t len, float* out, cudaStream_t stream) {
  if (len == 0) return cudaSuccess;
  FASTCL_LAUNCH(reduce_blocks(len), kReduceThreads, 0, stream, finish_lse_kernel)(shift, sum, len, out);
  return cudaGetLastError();
}

cudaError_t zero(float* p, int64_t count, cudaStream_t stream) {
  if (p == nullptr || count == 0) return cudaSuccess;
  return cudaMemsetAsync(p, 0, static_cast<size_t>(count) * sizeof(float), stream);
}

}  // namespace

size_t lse_forward_workspace_bytes(const PairInputs& in, bool rows, bool cols, int64_t budget) {
  return plan::forward_layout(in.m, in.n, rows, cols, budget, nullptr).bytes;
}

cudaError_t lse_forward(const PairInputs& in, bool rows, bool cols, float* row_lse, float* col_lse, void* workspace,
                        int64_t budget, cudaStream_t stream) {
  if (!rows && !cols) return cudaSuccess;
  if (!aligned(in)) return cudaErrorInvalidValue;
  const plan::ForwardLayout l = plan::forward_layout(in.m, in.n, rows, cols, budget, workspace);
  cudaError_t err = cudaSuccess;
  // Running state (shift 0, sum 0): the first block's partials replace it (tile.cuh lse_merge).
  for (float* p : {l.run_row_shift, l.run_row_sum}) {
    if (rows && (err = zero(p, in.m, stream)) != cudaSuccess) return err;
  }
  for (float* p : {l.run_col_shift, l.run_col_sum}) {
    if (cols && (err = zero(p, in.n, stream)) != cudaSuccess) return err;
  }
  for (int64_t r0 = 0; r0 < in.m; r0 += l.block.rows) {
    for (int64_t c0 = 0; c0 < in.n; c0 += l.block.cols) {
      const BlockRange b{r0, std::min(r0 + l.block.rows, in.m), c0, std::min(c0 + l.block.cols, in.n)};
      const int64_t a_tiles = cdiv(b.r1 - b.r0, kBlockA);
      const plan::Split split = plan::split_b(a_tiles, cdiv(b.c1 - b.c0, kBlockB));
      LseForwardParams p{};
      static_cast<PairParams&>(p) = pair_params(in, b, split.per);
      p.rows = rows;
      p.cols = cols;
      p.row_shift = l.row_shift;
      p.row_sum = l.row_sum;
      p.col_shift = l.col_shift;
      p.col_sum = l.col_sum;
      const dim3 grid(static_cast<unsigned>(a_tiles), static_cast<unsigned>(split.count));
      err = FASTCL_DTYPE_SWITCH(in.dtype, T, [&] { return run_lse_forward<T>(p, grid, stream); });
      if (err != cudaSuccess) return err;
      if (rows && (err = fold_lse(l.run_row_shift + b.r0, l.run_row_sum + b.r0, l.row_shift, l.row_sum,
                                  split.count, b.r1 - b.r0, stream)) != cudaSuccess)
        return err;
      if (cols && (err = fold_lse(l.run_col_shift + b.c0, l.run_col_sum + b.c0, l.col_shift, l.col_sum, a_tiles,
                                  b.c1 - b.c0, stream)) != cudaSuccess)
        return err;
    }
  }
  if (rows && (err = finish_lse(l.run_row_shift, l.run_row_sum, in.m, row_lse, stream)) != cudaSuccess) return err;
  if (cols) err = finish_lse(l.run_col_shift, l.run_col_sum, in.n, col_lse, stream);
  return err;
}

cudaError_t grad_block(const PairInputs& in, const GradTerms& terms, const BlockRange& block, void* g, int64_t ldg,
                       float* row_loss, float* row_dsum, cudaStream_t stream) {
  if (!aligned(in) || block.r0 < 0 || block.r1 > in.m || block.c0 < 0 || block.c1 > in.n ||
      (g != nullptr && ldg < block.c1 - block.c0))
    return cudaErrorInvalidValue;
  if (block.r1 <= block.r0 || block.c1 <= block.c0) return cudaSuccess;
  GradParams p{};
  static_cast<PairParams&>(p) = pair_params(in, block, 1);
  const auto at = [](const float* v, int64_t offset) { return v != nullptr ? v + offset : nullptr; };
  p.ga = at(terms.g_row, block.r0);
  p.sa = at(terms.row_shift, block.r0);
  p.gb = at(terms.g_col, block.c0);
  p.sb = at(terms.col_shift, block.c0);
  p.bias = at(terms.row_bias, block.r0);
  p.weight = at(terms.row_weight, block.r0);
  p.g_scale = terms.g_scale;
  p.g = g;
  p.ldg = ldg;
  p.row_loss = row_loss;
  p.row_dsum = row_dsum;
  const int64_t tiles = cdiv(p.rows_a, kBlockA) * cdiv(p.rows_b, kBlockB);
  if (tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles));
  return FASTCL_DTYPE_SWITCH(in.dtype, T, [&] {
    return FASTCL_KIND_SWITCH(terms.kind, K, [&] { return run_pair_grad<T, K>(p, grid, stream); });
  });
}

size_t lse_forward_prefixes_workspace_bytes(const PairInputs& in, int64_t prefixes, bool rows, bool cols,
                                            int64_t budget) {
  return plan::forward_layout(in.m, in.n, rows, cols, budget, nullptr, prefixes).bytes;
}

namespace {

// The prefix fields of a launch for the prefixes [q0, q1): segment ends, factors from the block's offsets.
bool prefix_params(PrefixParams& p, const PairInputs& in, const PrefixInputs& pre, int64_t q0, int64_t q1,
                   const BlockRange& b) {
  if (q1 <= q0 || q1 - q0 > kMaxPrefixes || q1 > pre.prefixes || (pre.row_scale == nullptr) != (pre.col_scale == nullptr))
    return false;
  p.prefixes = static_cast<int>(q1 - q0);
  for (int64_t q = q0; q < q1; ++q) {
    if (pre.ends[q] > in.d || pre.ends[q] <= (q > 0 ? pre.ends[q - 1] : 0) || pre.ends[q] > 0x7fffffff) return false;
    if ((static_cast<size_t>(pre.ends[q]) * elem_size(in.dtype)) % 16 != 0) return false;  // segments start on chunks
    p.seg_end[q - q0] = static_cast<int32_t>(pre.ends[q]);
  }
  if (pre.row_scale != nullptr) {
    p.row_scale = pre.row_scale + q0 * in.m + b.r0;
    p.col_scale = pre.col_scale + q0 * in.n + b.c0;
    p.ld_row_scale = in.m;
    p.ld_col_scale = in.n;
  }
  return true;
}

}  // namespace

cudaError_t lse_forward_prefixes(const PairInputs& in, const PrefixInputs& pre, bool rows, bool cols, float* row_lse,
                                 float* col_lse, void* workspace, int64_t budget, cudaStream_t stream) {
  if (!rows && !cols) return cudaSuccess;
  if (!aligned(in) || pre.prefixes < 1) return cudaErrorInvalidValue;
  const int64_t k = pre.prefixes;
  const plan::ForwardLayout l = plan::forward_layout(in.m, in.n, rows, cols, budget, workspace, k);
  cudaError_t err = cudaSuccess;
  if (rows) {
    for (float* p : {l.run_row_shift, l.run_row_sum}) {
      if ((err = zero(p, k * in.m, stream)) != cudaSuccess) return err;
    }
  }
  if (cols) {
    for (float* p : {l.run_col_shift, l.run_col_sum}) {
      if ((err = zero(p, k * in.n, stream)) != cudaSuccess) return err;
    }
  }
  for (int64_t q0 = 0; q0 < k; q0 += kMaxPrefixes) {
    const int64_t q1 = std::min(k, q0 + kMaxPrefixes);
    for (int64_t r0 = 0; r0 < in.m; r0 += l.block.rows) {
      for (int64_t c0 = 0; c0 < in.n; c0 += l.block.cols) {
        const BlockRange b{r0, std::min(r0 + l.block.rows, in.m), c0, std::min(c0 + l.block.cols, in.n)};
        const int64_t a_tiles = cdiv(b.r1 - b.r0, kBlockA);
        const plan::Split split = plan::split_b(a_tiles, cdiv(b.c1 - b.c0, kBlockB));
        LsePrefixForwardParams p{};
        static_cast<PairParams&>(p) = pair_params(in, b, split.per);
        if (!prefix_params(p, in, pre, q0, q1, b)) return cudaErrorInvalidValue;
        p.rows = rows;
        p.cols = cols;
        p.row_shift = l.row_shift;
        p.row_sum = l.row_sum;
        p.col_shift = l.col_shift;
        p.col_sum = l.col_sum;
        p.row_stride = l.row_parts;
        p.col_stride = l.col_parts;
        const dim3 grid(static_cast<unsigned>(a_tiles), static_cast<unsigned>(split.count));
        err = FASTCL_DTYPE_SWITCH(in.dtype, T, [&] { return run_lse_prefixes_forward<T>(p, grid, stream); });
        if (err != cudaSuccess) return err;
        for (int64_t q = q0; q < q1; ++q) {  // each prefix's partials into its running state, in part order
          const int64_t i = q - q0;
          if (rows && (err = fold_lse(l.run_row_shift + q * in.m + b.r0, l.run_row_sum + q * in.m + b.r0,
                                      l.row_shift + i * l.row_parts, l.row_sum + i * l.row_parts, split.count,
                                      b.r1 - b.r0, stream)) != cudaSuccess)
            return err;
          if (cols && (err = fold_lse(l.run_col_shift + q * in.n + b.c0, l.run_col_sum + q * in.n + b.c0,
                                      l.col_shift + i * l.col_parts, l.col_sum + i * l.col_parts, a_tiles,
                                      b.c1 - b.c0, stream)) != cudaSuccess)
            return err;
        }
      }
    }
  }
  if (rows && (err = finish_lse(l.run_row_shift, l.run_row_sum, k * in.m, row_lse, stream)) != cudaSuccess)
    return err;
  if (cols) err = finish_lse(l.run_col_shift, l.run_col_sum, k * in.n, col_lse, stream);
  return err;
}

cudaError_t grad_block_prefixes(const PairInputs& in, const PrefixInputs& pre, int64_t q0, int64_t q1,
                                const PrefixTerms& terms, const BlockRange& block, void* g, int64_t ldg,
                                int64_t g_stride, float* row_gs, float* col_gs, float* row_loss, float* row_dsum,
                                cudaStream_t stream) {
  const bool pointwise = terms.kind != GradKind::kLse;
  if (!aligned(in) || block.r0 < 0 || block.r1 > in.m || block.c0 < 0 || block.c1 > in.n ||
      (g != nullptr && (ldg < block.c1 - block.c0 || g_stride < (block.r1 - block.r0) * ldg)) || row_gs == nullptr ||
      col_gs == nullptr || (pointwise && row_loss == nullptr))
    return cudaErrorInvalidValue;
  if (block.r1 <= block.r0 || block.c1 <= block.c0) return cudaSuccess;
  PrefixGradParams p{};
  static_cast<PairParams&>(p) = pair_params(in, block, 1);
  if (!prefix_params(p, in, pre, q0, q1, block)) return cudaErrorInvalidValue;
  const auto at = [&](const float* v, int64_t len, int64_t offset) {
    return v != nullptr ? v + q0 * len + offset : nullptr;
  };
  p.ga = at(terms.g_row, in.m, block.r0);
  p.sa = at(terms.row_shift, in.m, block.r0);
  p.gb = at(terms.g_col, in.n, block.c0);
  p.sb = at(terms.col_shift, in.n, block.c0);
  p.ld_a_terms = in.m;
  p.ld_b_terms = in.n;
  p.g_scale = terms.g_scale;
  p.g = g;
  p.ldg = ldg;
  p.g_stride = g_stride;
  p.row_gs = row_gs;
  p.col_gs = col_gs;
  if (pointwise) {
    p.bias = terms.row_bias != nullptr ? terms.row_bias + block.r0 : nullptr;
    p.row_loss = row_loss;
    p.row_dsum = row_dsum;
  } else {  // keys are pointwise's only (pair_params set them from `in`)
    p.keys_a = p.keys_b = nullptr;
  }
  const int64_t tiles = cdiv(p.rows_a, kBlockA) * cdiv(p.rows_b, kBlockB);
  if (tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles));
  return FASTCL_DTYPE_SWITCH(in.dtype, T, [&] {
    return FASTCL_KIND_SWITCH(terms.kind, K, [&] { return run_prefix_grad<T, K>(p, grid, stream); });
  });
}

cudaError_t grad_scale(const float* g_row, int64_t m, const float* g_col, int64_t n, float extra, float* out,
                       cudaStream_t stream) {
  FASTCL_LAUNCH(1, kReduceThreads, 0, stream, grad_scale_kernel)(g_row, m, g_col, n, extra, out);
  return cudaGetLastError();
}

}  // namespace fastcl::cuda
