// Ops lse_prefixes and pointwise_prefixes (Matryoshka): the log-sum-exps of K similarity matrices, one
// per nested feature prefix d_1 < ... < d_K, and their gradient tiles (pointwise: the loss and its
// gradient tiles, pair_grad.cuh's SigLIP / MW of each prefix's S^q + bias), from one pass over the features:
//
//   S^q_ij = scale * a^q_i * b^q_j * P^q_ij,   P^q_ij = <x_i[:d_q], y_j[:d_q]>
//
// A prefix dot product is a partial sum of the next: a tile's accumulators grow segment
// [d_{q-1}, d_q) by segment (tile.cuh sgemm_tile_add) and, at each segment's end, prefix q's epilogue
// reads S^q off them without changing them (logits are formed on the fly, in both the max and the
// exp-sum passes). The GEMM work is one loss's at d_K whatever K; only the exponentials grow with K.
// The algorithm is backend/chunked/prefixes.py's; its blocks, partials and merges are lse_forward.cuh's
// and pair_grad.cuh's.
//
// Forward: prefix q's (shift, sum) partials go to slot q (LsePrefixForwardParams); a row's running
// state per prefix and warp column lives in dynamic shared memory past the tile stages (one writer:
// the lane t = 0 of the row's group), as do the factors of the CTA's rows and of the tile's columns.
// Backward (prefix_grad.cuh): one CTA per tile; per prefix, G^q in registers, the row and column sums of G^q S^q
// (partials with one writer each, summed by the host in a fixed order) and H^q = a^q b^q G^q stored
// into slot q of the G blocks; at the end each thread turns its own elements of the K slots into the
// suffix sums sum_{k >= q} H^k, descending, the running sum in float32 (no rounding of a partial sum
// to the storage type before the next is added). Segment q's gradient GEMMs then read slot q.
#pragma once

#include "kernels.h"
#include "tile.cuh"

namespace fastcl::cuda {

// The forward's dynamic shared memory past the tile stages, in floats: row state [K][kN][kBlockA] x
// (shift, sum), then the factors: rows [K][kBlockA], columns [K][kBlockB].
template <typename T>
struct PrefixSmem {
  static constexpr int kRowState = Warps<T>::kN * kBlockA;  // floats per prefix, each of shift and sum
  static constexpr size_t forward_bytes(int prefixes) {
    return Smem<T>::kTileBytes + static_cast<size_t>(prefixes) * (2 * kRowState + kBlockA + kBlockB) * sizeof(float);
  }
  static_assert(forward_bytes(kMaxPrefixes) + 8 * 1024 <= Smem<T>::kOptInLimit,
                "kMaxPrefixes prefixes' forward fits one sm_80 block");
};

template <typename T>
__device__ __forceinline__ void zero_acc(typename WarpMma<T>::Acc& acc) {
#pragma unroll
  for (int mt = 0; mt < Warps<T>::kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < Warps<T>::kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
    }
  }
}

__device__ __forceinline__ int segment_begin(const PrefixParams& p, int q) { return q > 0 ? p.seg_end[q - 1] : 0; }

template <typename T>
__global__ void __launch_bounds__(Warps<T>::kThreads, Warps<T>::kMinCtas)
    lse_prefixes_forward_kernel(const LsePrefixForwardParams p) {
  using W = Warps<T>;
  constexpr int kMT = W::kMT, kNT = W::kNT;
  constexpr int kRowState = PrefixSmem<T>::kRowState;
  T* smem = dynamic_smem<T>();
  const int prefixes = p.prefixes;
  float* run_shift = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + Smem<T>::kTileBytes);
  float* run_sum = run_shift + prefixes * kRowState;
  float* row_f = run_sum + prefixes * kRowState;  // [K][kBlockA]
  float* col_f = row_f + prefixes * kBlockA;      // [K][kBlockB]
  __shared__ float red_max[W::kM][kBlockB];       // per tile and prefix: each column's statistics per warp row
  __shared__ float red_sum[W::kM][kBlockB];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / W::kN, warp_n = warp % W::kN;
  const int g = lane >> 2, t = lane & 3;
  const int r0 = warp_m * W::kRows + g, c0 = warp_n * W::kCols + 2 * t;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kBlockA;
  const TileRange range = split_tiles(p, blockIdx.y);
  const float scale = load_scale(p) * kLog2e;  // base-2 logits
  const float kNegInf = -INFINITY;
  const bool factors = p.row_scale != nullptr;
  const int64_t rows_left = p.rows_a - a0;

  // The row state starts empty; each slot has one writer (its group's lane t = 0), which reads it back.
  if (p.rows && t == 0) {
    for (int q = 0; q < prefixes; ++q) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          run_shift[q * kRowState + warp_n * kBlockA + r0 + 16 * mt + 8 * h] = kNegInf;
          run_sum[q * kRowState + warp_n * kBlockA + r0 + 16 * mt + 8 * h] = 0.0f;
        }
      }
    }
  }
  if (factors) {  // the CTA's rows' factors, base-2 scale folded in (read after the first tile's barriers)
    for (int i = threadIdx.x; i < prefixes * kBlockA; i += W::kThreads) {
      const int q = i / kBlockA, r = i % kBlockA;
      row_f[i] = r < rows_left ? scale * p.row_scale[q * p.ld_row_scale + a0 + r] : 0.0f;
    }
  }
  float acc[kMT][kNT][4];

  for (int64_t bt = range.begin; bt < range.end; ++bt) {
    const int64_t b0 = bt * kBlockB;
    if (factors) {
      __syncthreads();  // every warp is done with the previous tile's column factors
      for (int i = threadIdx.x; i < prefixes * kBlockB; i += W::kThreads) {
        const int q = i / kBlockB, c = i % kBlockB;
        col_f[i] = b0 + c < p.rows_b ? p.col_scale[q * p.ld_col_scale + b0 + c] : 0.0f;
      }
    }
    zero_acc<T>(acc);
    for (int q = 0; q < prefixes; ++q) {
      // acc grows by segment q; its barriers order the factors above (and the last prefix's reads of red_*)
      sgemm_tile_add<T>(acc, p, a0, b0, segment_begin(p, q), p.seg_end[q], smem, warp_m, warp_n, lane);
      const float* rf = factors ? row_f + q * kBlockA : nullptr;
      const float* cf = factors ? col_f + q * kBlockB : nullptr;
      // S^q log2(e) of the thread's element (mt, nt, 2 h + c); -inf outside the matrix
      const auto logit = [&](int mt, int nt, int h, int c) {
        const int r = r0 + 16 * mt + 8 * h, col = c0 + 8 * nt + c;
        if (!(r < rows_left && b0 + col < p.rows_b)) return kNegInf;
        const float v = acc[mt][nt][2 * h + c];
        return factors ? v * rf[r] * cf[col] : v * scale;
      };

      if (p.rows) {  // column-outer, each column's factor read once per pass: kMT x 2 running values per row pass
        float mx[kMT][2], sum[kMT][2];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            mx[mt][h] = kNegInf;
            sum[mt][h] = 0.0f;
          }
        }
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
              for (int h = 0; h < 2; ++h) mx[mt][h] = fmaxf(mx[mt][h], logit(mt, nt, h, c));
            }
          }
        }
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            mx[mt][h] = fmaxf(mx[mt][h], __shfl_xor_sync(0xffffffffu, mx[mt][h], 1));
            mx[mt][h] = finite_shift(fmaxf(mx[mt][h], __shfl_xor_sync(0xffffffffu, mx[mt][h], 2)));  // the shift
          }
        }
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
              for (int h = 0; h < 2; ++h) sum[mt][h] += exp2f(logit(mt, nt, h, c) - mx[mt][h]);
            }
          }
        }
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float v = sum[mt][h];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            if (t == 0) {
              const int at = q * kRowState + warp_n * kBlockA + r0 + 16 * mt + 8 * h;
              lse_merge(run_shift[at], run_sum[at], mx[mt][h], v);
            }
          }
        }
      }

      if (p.cols) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float mx = kNegInf;
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) mx = fmaxf(mx, fmaxf(logit(mt, nt, 0, c), logit(mt, nt, 1, c)));
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
            for (int mt = 0; mt < kMT; ++mt) sum += exp2f(logit(mt, nt, 0, c) - shift) + exp2f(logit(mt, nt, 1, c) - shift);
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
            const int64_t at = q * p.col_stride + static_cast<int64_t>(blockIdx.x) * p.rows_b + col;
            p.col_shift[at] = finite_shift(mx);
            p.col_sum[at] = sum;
          }
        }
        __syncthreads();  // red_* are rewritten by the next prefix
      }
    }
  }

  if (p.rows) {  // merge each row's kN warp columns, per prefix, in warp order (deterministic)
    __syncthreads();
    for (int i = threadIdx.x; i < prefixes * kBlockA; i += W::kThreads) {
      const int q = i / kBlockA, r = i % kBlockA;
      const int64_t row = a0 + r;
      if (row >= p.rows_a) continue;
      const float* shifts = run_shift + q * kRowState + r;
      const float* sums = run_sum + q * kRowState + r;
      float shift = shifts[0], sum = sums[0];
#pragma unroll
      for (int w = 1; w < W::kN; ++w) lse_merge(shift, sum, shifts[w * kBlockA], sums[w * kBlockA]);
      const int64_t at = q * p.row_stride + static_cast<int64_t>(blockIdx.y) * p.rows_a + row;
      p.row_shift[at] = shift;
      p.row_sum[at] = sum;
    }
  }
}

template <typename T>
cudaError_t run_lse_prefixes_forward(const LsePrefixForwardParams& p, dim3 grid, cudaStream_t stream) {
  const size_t smem = PrefixSmem<T>::forward_bytes(p.prefixes);
  const cudaError_t err = cudaFuncSetAttribute(lse_prefixes_forward_kernel<T>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  FASTCL_LAUNCH(grid, Warps<T>::kThreads, smem, stream, lse_prefixes_forward_kernel<T>)(p);
  return cudaGetLastError();
}

}  // namespace fastcl::cuda
