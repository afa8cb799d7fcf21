// Forward log-sum-exp of S = scale * A . B^T over the non-keyed pairs, as (shift, sum) partials.
//
// A CTA owns 64 rows of A and visits the B tiles of its split. Row statistics stay in registers
// (online merge, one (shift, sum) per row for the whole split); the column statistics of each
// 64 x 64 tile are reduced across the CTA's rows and written as that row tile's partial. Both kinds
// of partials are merged later in a fixed order (launch.cu), so results are deterministic. Logits
// and partials are in base 2 (tile.cuh kLog2e): S log2(e) = acc (scale log2(e)).
#pragma once

#include "kernels.h"
#include "tile.cuh"

namespace fastcl::cuda {

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) lse_forward_kernel(const LseForwardParams p) {
  T* smem = dynamic_smem<T>();
  __shared__ float red_max[kThreads / 32][kBlockB];
  __shared__ float red_sum[kThreads / 32][kBlockB];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kBlockA;
  const TileRange range = split_tiles(p, blockIdx.y);
  const float scale = load_scale(p) * kLog2e;  // base-2 logits
  const float kNegInf = -INFINITY;

  int64_t row[2];
  bool row_ok[2];
  int64_t row_key[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = a0 + warp * 16 + g + 8 * h;
    row_ok[h] = row[h] < p.rows_a;
    row_key[h] = (p.keys_a != nullptr && row_ok[h]) ? p.keys_a[row[h]] : 0;
  }
  float run_shift[2] = {kNegInf, kNegInf};
  float run_sum[2] = {0.0f, 0.0f};
  float acc[8][4];

  for (int64_t bt = range.begin; bt < range.end; ++bt) {
    const int64_t b0 = bt * kBlockB;
    sgemm_tile<T>(acc, p, a0, b0, smem, warp, lane);

    // logits; pairs outside the matrix or keyed are -inf
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const int64_t col = b0 + nt * 8 + 2 * t + (e & 1);
        bool ok = row_ok[h] && col < p.rows_b;
        if (ok && p.keys_a != nullptr) ok = p.keys_b[col] != row_key[h];
        acc[nt][e] = ok ? acc[nt][e] * scale : kNegInf;
      }
    }

    if (p.rows) {  // each row is spread over the 4 lanes of its group
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = kNegInf;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(acc[nt][2 * h], acc[nt][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float shift = finite_shift(mx);
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) sum += exp2f(acc[nt][2 * h] - shift) + exp2f(acc[nt][2 * h + 1] - shift);
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        lse_merge(run_shift[h], run_sum[h], shift, sum);
      }
    }

    if (p.cols) {  // each column: 2 values per lane, 8 groups per warp, 4 warps
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float mx = fmaxf(acc[nt][e], acc[nt][2 + e]);
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
          if (g == 0) red_max[warp][nt * 8 + 2 * t + e] = mx;
        }
      }
      __syncthreads();
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = nt * 8 + 2 * t + e;
          float mx = red_max[0][c];
#pragma unroll
          for (int w = 1; w < kThreads / 32; ++w) mx = fmaxf(mx, red_max[w][c]);
          const float shift = finite_shift(mx);
          float sum = exp2f(acc[nt][e] - shift) + exp2f(acc[nt][2 + e] - shift);
          sum += __shfl_xor_sync(0xffffffffu, sum, 4);
          sum += __shfl_xor_sync(0xffffffffu, sum, 8);
          sum += __shfl_xor_sync(0xffffffffu, sum, 16);
          if (g == 0) red_sum[warp][c] = sum;
        }
      }
      __syncthreads();
      if (threadIdx.x < kBlockB) {
        const int c = threadIdx.x;
        const int64_t col = b0 + c;
        float mx = red_max[0][c], sum = red_sum[0][c];
#pragma unroll
        for (int w = 1; w < kThreads / 32; ++w) {
          mx = fmaxf(mx, red_max[w][c]);
          sum += red_sum[w][c];
        }
        if (col < p.rows_b) {
          const int64_t at = static_cast<int64_t>(blockIdx.x) * p.rows_b + col;
          p.col_shift[at] = finite_shift(mx);
          p.col_sum[at] = sum;
        }
      }
      __syncthreads();  // red_* are rewritten by the next tile
    }
  }

  if (p.rows && t == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (row_ok[h]) {
        const int64_t at = static_cast<int64_t>(blockIdx.y) * p.rows_a + row[h];
        p.row_shift[at] = run_shift[h];
        p.row_sum[at] = run_sum[h];
      }
    }
  }
}

template <typename T>
cudaError_t run_lse_forward(const LseForwardParams& p, dim3 grid, cudaStream_t stream) {
  constexpr size_t kSmem = Smem<T>::kTileBytes;
  static_assert(kSmem <= 48 * 1024, "lse_forward fits the default dynamic shared memory limit");
  FASTCL_LAUNCH(grid, kThreads, kSmem, stream, lse_forward_kernel<T>)(p);
  return cudaGetLastError();
}

}  // namespace fastcl::cuda
