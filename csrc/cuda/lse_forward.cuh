// Forward log-sum-exp of S = scale * A . B^T over the pairs neither keyed nor listed (op lse_exclude), as
// (shift, sum) partials.
//
// A CTA owns kBlockA rows of A and visits the B tiles of its split. Row statistics stay in
// registers (online merge, one (shift, sum) per row and warp column for the whole split, merged
// across the warps at the end); the column statistics of each tile are reduced across the CTA's
// rows and written as that row tile's partial. Both kinds of partials are merged later in a fixed
// order (launch.cu), so results are deterministic. Logits and partials are in base 2 (tile.cuh
// kLog2e): S log2(e) = acc (scale log2(e)).
#pragma once

#include "kernels.h"
#include "tile.cuh"

namespace fastcl::cuda {

template <typename T>
__global__ void __launch_bounds__(Warps<T>::kThreads, Warps<T>::kMinCtas) lse_forward_kernel(const LseForwardParams p) {
  using W = Warps<T>;
  constexpr int kMT = W::kMT, kNT = W::kNT;
  T* smem = dynamic_smem<T>();
  __shared__ float red_max[W::kM][kBlockB];  // per tile: each column's statistics per warp row
  __shared__ float red_sum[W::kM][kBlockB];
  __shared__ float end_shift[W::kN][kBlockA];  // at the end: each row's statistics per warp column
  __shared__ float end_sum[W::kN][kBlockA];
  __shared__ int64_t row_keys[kBlockA];  // keyed losses: A's keys (in registers they cost 16 and spill)
  __shared__ ListedBits listed_bits;      // op lse_exclude: the tile's listed pairs (tile.cuh)

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / W::kN, warp_n = warp % W::kN;
  const int g = lane >> 2, t = lane & 3;
  // the thread's tile rows are r0 + 16 mt + 8 h, its tile columns c0 + 8 nt + (0, 1)
  const int r0 = warp_m * W::kRows + g, c0 = warp_n * W::kCols + 2 * t;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kBlockA;
  const TileRange range = split_tiles(p, blockIdx.y);
  const float scale = load_scale(p) * kLog2e;  // base-2 logits
  const float kNegInf = -INFINITY;

  const int64_t rows_left = p.rows_a - a0;  // tile row r exists when r < rows_left
  if (p.keys_a != nullptr) {
    for (int r = threadIdx.x; r < kBlockA; r += W::kThreads) row_keys[r] = r < rows_left ? p.keys_a[a0 + r] : 0;
    __syncthreads();
  }
  float run_shift[kMT][2], run_sum[kMT][2];  // the warp's columns only: merged across warps at the end
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      run_shift[mt][h] = kNegInf;
      run_sum[mt][h] = 0.0f;
    }
  }
  float acc[kMT][kNT][4];

  for (int64_t bt = range.begin; bt < range.end; ++bt) {
    const int64_t b0 = bt * kBlockB;
    if (p.listed != nullptr) {
      __syncthreads();  // every warp is done with the previous tile's bits
      mark_listed<W::kThreads>(listed_bits, p, a0, b0);
    }
    sgemm_tile<T>(acc, p, a0, b0, smem, warp_m, warp_n, lane);
    if (p.listed != nullptr) __syncthreads();  // this tile's bits are in place (sgemm_tile has none when D = 0)

    // logits; pairs outside the matrix, keyed or listed are -inf
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int64_t col = b0 + c0 + 8 * nt + c;
        const bool col_ok = col < p.rows_b;
        const int64_t col_key = (p.keys_a != nullptr && col_ok) ? p.keys_b[col] : 0;
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = r0 + 16 * mt + 8 * h;
            bool ok = r < rows_left && col_ok;
            if (p.keys_a != nullptr) ok = ok && col_key != row_keys[r];
            float& v = acc[mt][nt][2 * h + c];
            v = ok ? v * scale : kNegInf;
          }
        }
      }
    }
    if (p.listed != nullptr) drop_listed<T>(acc, listed_bits, r0, warp_n, t, kNegInf);  // and listed pairs

    if (p.rows) {  // each row: the 4 lanes of its group, the warp's kNT blocks
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float mx = kNegInf;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float shift = finite_shift(mx);
          float sum = 0.0f;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            sum += exp2f(acc[mt][nt][2 * h] - shift) + exp2f(acc[mt][nt][2 * h + 1] - shift);
          }
          sum += __shfl_xor_sync(0xffffffffu, sum, 1);
          sum += __shfl_xor_sync(0xffffffffu, sum, 2);
          lse_merge(run_shift[mt][h], run_sum[mt][h], shift, sum);
        }
      }
    }

    if (p.cols) {  // each column: 2 kMT values per lane, 8 groups per warp, kM warps
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float mx = kNegInf;
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) mx = fmaxf(mx, fmaxf(acc[mt][nt][c], acc[mt][nt][2 + c]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
          if (g == 0) red_max[warp_m][c0 + 8 * nt + c] = mx;
        }
      }
      __syncthreads();
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = c0 + 8 * nt + c;
          float mx = red_max[0][col];
#pragma unroll
          for (int w = 1; w < W::kM; ++w) mx = fmaxf(mx, red_max[w][col]);
          const float shift = finite_shift(mx);
          float sum = 0.0f;
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) sum += exp2f(acc[mt][nt][c] - shift) + exp2f(acc[mt][nt][2 + c] - shift);
          sum += __shfl_xor_sync(0xffffffffu, sum, 4);
          sum += __shfl_xor_sync(0xffffffffu, sum, 8);
          sum += __shfl_xor_sync(0xffffffffu, sum, 16);
          if (g == 0) red_sum[warp_m][col] = sum;
        }
      }
      __syncthreads();
      for (int c = threadIdx.x; c < kBlockB; c += W::kThreads) {
        const int64_t col = b0 + c;
        float mx = red_max[0][c], sum = red_sum[0][c];
#pragma unroll
        for (int w = 1; w < W::kM; ++w) {
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

  if (p.rows) {  // merge the kN warps' statistics of each row, in warp order (deterministic)
    if (t == 0) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          end_shift[warp_n][r0 + 16 * mt + 8 * h] = run_shift[mt][h];
          end_sum[warp_n][r0 + 16 * mt + 8 * h] = run_sum[mt][h];
        }
      }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < kBlockA; r += W::kThreads) {
      const int64_t row = a0 + r;
      if (row >= p.rows_a) continue;
      float shift = end_shift[0][r], sum = end_sum[0][r];
#pragma unroll
      for (int w = 1; w < W::kN; ++w) lse_merge(shift, sum, end_shift[w][r], end_sum[w][r]);
      const int64_t at = static_cast<int64_t>(blockIdx.y) * p.rows_a + row;
      p.row_shift[at] = shift;
      p.row_sum[at] = sum;
    }
  }
}

template <typename T>
cudaError_t run_lse_forward(const LseForwardParams& p, dim3 grid, cudaStream_t stream) {
  const cudaError_t err = allow_tile_smem<T>(lse_forward_kernel<T>);
  if (err != cudaSuccess) return err;
  FASTCL_LAUNCH(grid, Warps<T>::kThreads, Smem<T>::kTileBytes, stream, lse_forward_kernel<T>)(p);
  return cudaGetLastError();
}

}  // namespace fastcl::cuda
