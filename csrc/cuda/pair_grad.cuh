// The gradient tile kernel: compute one kBlockA x kBlockB tile of S = scale * A . B^T (once: no per-slice
// recompute), turn it into G = dLoss/dS in registers and store it into the caller's G block, in the
// input type (float for float inputs) times the power-of-two g_scale. The products G @ y and
// G.T @ x are library GEMMs on that block (csrc/cuda/ops_cuda.cpp; DESIGN.md says why).
//
//   kLse:    G_ab = ga_a exp(S_ab - sa_a) + gb_b exp(S_ab - sb_b); keyed and listed pairs 0 (computed in base 2:
//            2^(S log2(e) - sa log2(e)), log2(e) folded into the scale, one exp2f per term).
//   kSigLip: f = S + bias_a, negated on keyed pairs (positives); loss softplus(f),
//            G = w_a * (keyed ? -sigmoid(f) : sigmoid(f)).
//   kMW:     keyed pairs excluded (loss 0, G 0); otherwise loss softplus(f), G = w_a sigmoid(f).
// Pointwise kinds also write each row's loss and G sums over the tile's kBlockB columns (partials
// [rows_a, column tiles], summed by the host in a fixed order).
//
// Grid: one CTA per tile of one block of S (launch.cu offsets A and B to the block),
// blockIdx.x = row tile * column tiles + column tile: a 1-D grid has no 65535 limit, and neighbouring
// CTAs share their A rows in L2.
#pragma once

#include "kernels.h"
#include "tile.cuh"

namespace fastcl::cuda {

// With e = exp(-|f|): softplus(f) = max(f, 0) + log1p(e) and sigmoid(f) = 1 / (1 + e) for f >= 0,
// e / (1 + e) otherwise: one exp for both (as the CPU kernel).
__device__ __forceinline__ void softplus_sigmoid(float f, float& loss, float& sigmoid) {
  const float e = expf(-fabsf(f));
  loss = (f > 0.0f ? f : 0.0f) + log1pf(e);  // NaN f: log1pf(NaN) makes the loss NaN
  const float r = 1.0f / (1.0f + e);
  sigmoid = f >= 0.0f ? r : e * r;
}

// Two neighbouring G values of one row, (col, col + 1), into the block.
template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float lo, float hi, bool both, bool vector);

template <>
__device__ __forceinline__ void store_pair<float>(float* dst, float lo, float hi, bool both, bool vector) {
  if (both && vector) {
    *reinterpret_cast<float2*>(dst) = make_float2(lo, hi);
    return;
  }
  dst[0] = lo;
  if (both) dst[1] = hi;
}

template <>
__device__ __forceinline__ void store_pair<__half>(__half* dst, float lo, float hi, bool both, bool vector) {
  if (both && vector) {
    *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(lo, hi);
    return;
  }
  dst[0] = __float2half_rn(lo);
  if (both) dst[1] = __float2half_rn(hi);
}

template <>
__device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* dst, float lo, float hi, bool both,
                                                          bool vector) {
  if (both && vector) {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(lo, hi);
    return;
  }
  dst[0] = __float2bfloat16_rn(lo);
  if (both) dst[1] = __float2bfloat16_rn(hi);
}

template <typename T, GradKind kKind>
__global__ void __launch_bounds__(Warps<T>::kThreads, Warps<T>::kMinCtas) pair_grad_kernel(const GradParams p) {
  using W = Warps<T>;
  constexpr int kMT = W::kMT, kNT = W::kNT;
  constexpr bool kPointwise = kKind != GradKind::kLse;
  T* smem = dynamic_smem<T>();
  __shared__ float red_loss[kPointwise ? W::kN : 1][kBlockA];  // pointwise: row sums per warp column
  __shared__ float red_dsum[kPointwise ? W::kN : 1][kBlockA];
  __shared__ int64_t row_keys[kBlockA];  // keyed losses: A's keys (registers are short)
  __shared__ uint32_t listed_bits[kPointwise ? 1 : kBlockA][kListedWords];  // kLse: op lse_exclude's pairs

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / W::kN, warp_n = warp % W::kN;
  const int g = lane >> 2, t = lane & 3;
  // the thread's tile rows are r0 + 16 mt + 8 h, its tile columns c0 + 8 nt + (0, 1)
  const int r0 = warp_m * W::kRows + g, c0 = warp_n * W::kCols + 2 * t;
  const int64_t b_tiles = cdiv(p.rows_b, kBlockB);
  const int64_t b_tile = static_cast<int64_t>(blockIdx.x) % b_tiles;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) / b_tiles * kBlockA;
  const int64_t b0 = b_tile * kBlockB;
  const float scale = load_scale(p);
  const float scale2 = scale * kLog2e;  // base-2 logits for kLse
  const float g_scale = p.g_scale != nullptr ? *p.g_scale : 1.0f;

  const int64_t rows_left = p.rows_a - a0;  // tile row r exists when r < rows_left
  const bool listed = !kPointwise && p.listed != nullptr;
  if (p.keys_a != nullptr) {
    for (int r = threadIdx.x; r < kBlockA; r += W::kThreads) row_keys[r] = r < rows_left ? p.keys_a[a0 + r] : 0;
  }
  if constexpr (!kPointwise) {
    if (listed) mark_listed<W::kThreads>(listed_bits, p, a0, b0);
  }
  if (p.keys_a != nullptr || listed) __syncthreads();
  float acc[kMT][kNT][4];
  sgemm_tile<T>(acc, p, a0, b0, smem, warp_m, warp_n, lane);

  // Per-row constants of the A side.
  bool row_ok[kMT][2];
  float ga[kMT][2], sa[kMT][2], bias[kMT][2], weight[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_ok[mt][h] = r0 + 16 * mt + 8 * h < rows_left;
      const int64_t r = row_ok[mt][h] ? a0 + r0 + 16 * mt + 8 * h : 0;
      ga[mt][h] = p.ga != nullptr ? p.ga[r] : 0.0f;
      sa[mt][h] = p.ga != nullptr ? p.sa[r] * kLog2e : 0.0f;
      bias[mt][h] = p.bias != nullptr ? p.bias[r] : 0.0f;
      weight[mt][h] = p.weight != nullptr ? p.weight[r] : 1.0f;
    }
  }
  float loss_sum[kMT][2] = {};
  float grad_sum[kMT][2] = {};

  // G in place of the logits, a column at a time: its constants are loaded once for all its rows
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int64_t col = b0 + c0 + 8 * nt + c;
      const bool col_ok = col < p.rows_b;
      const int64_t k = col_ok ? col : 0;
      const int64_t col_key = p.keys_a != nullptr ? p.keys_b[k] : 0;
      const float gb = kKind == GradKind::kLse && p.gb != nullptr ? p.gb[k] : 0.0f;
      const float sb = kKind == GradKind::kLse && p.gb != nullptr ? p.sb[k] * kLog2e : 0.0f;
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const bool ok = row_ok[mt][h] && col_ok;
          const bool keyed = ok && p.keys_a != nullptr && col_key == row_keys[r0 + 16 * mt + 8 * h];
          float& v = acc[mt][nt][2 * h + c];
          float grad = 0.0f;
          if constexpr (kKind == GradKind::kLse) {
            const float s2 = v * scale2;
            if (ok && !keyed) {
              if (p.ga != nullptr) grad = ga[mt][h] * exp2f(s2 - sa[mt][h]);
              if (p.gb != nullptr) grad += gb * exp2f(s2 - sb);
            }
          } else {
            const float s = v * scale;
            const bool excluded = kKind == GradKind::kMW && keyed;
            const bool flip = kKind == GradKind::kSigLip && keyed;
            if (ok && !excluded) {
              const float f = flip ? -(s + bias[mt][h]) : s + bias[mt][h];
              float loss, sigmoid;
              softplus_sigmoid(f, loss, sigmoid);
              grad = weight[mt][h] * (flip ? -sigmoid : sigmoid);
              loss_sum[mt][h] += loss;
              grad_sum[mt][h] += grad;
            }
          }
          v = grad;
        }
      }
    }
  }

  if constexpr (!kPointwise) {
    if (listed) drop_listed<T>(acc, listed_bits, r0, warp_n, t, 0.0f);  // listed pairs: G 0, whatever was computed
  }

  if (p.g != nullptr) {
    T* g_block = static_cast<T*>(p.g);
    const bool vector = (p.ldg & 1) == 0;  // even rows keep (row, even col) pairs aligned
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = a0 + r0 + 16 * mt + 8 * h;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          const int64_t col = b0 + c0 + 8 * nt;
          if (row_ok[mt][h] && col < p.rows_b) {
            store_pair<T>(g_block + row * p.ldg + col, acc[mt][nt][2 * h] * g_scale,
                          acc[mt][nt][2 * h + 1] * g_scale, col + 1 < p.rows_b, vector);
          }
        }
      }
    }
  }
  if constexpr (kPointwise) {  // each row's sums: its group's 4 lanes, then the kN warps in order
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float l = loss_sum[mt][h], gs = grad_sum[mt][h];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        gs += __shfl_xor_sync(0xffffffffu, gs, 1);
        gs += __shfl_xor_sync(0xffffffffu, gs, 2);
        if (t == 0) {
          red_loss[warp_n][r0 + 16 * mt + 8 * h] = l;
          red_dsum[warp_n][r0 + 16 * mt + 8 * h] = gs;
        }
      }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < kBlockA; r += W::kThreads) {
      const int64_t row = a0 + r;
      if (row >= p.rows_a) continue;
      float l = red_loss[0][r], gs = red_dsum[0][r];
#pragma unroll
      for (int w = 1; w < W::kN; ++w) {
        l += red_loss[w][r];
        gs += red_dsum[w][r];
      }
      const int64_t at = row * b_tiles + b_tile;
      if (p.row_loss != nullptr) p.row_loss[at] = l;
      if (p.row_dsum != nullptr) p.row_dsum[at] = gs;
    }
  }
}

template <typename T, GradKind kKind>
cudaError_t run_pair_grad(const GradParams& p, dim3 grid, cudaStream_t stream) {
  const cudaError_t err = allow_tile_smem<T>(pair_grad_kernel<T, kKind>);
  if (err != cudaSuccess) return err;
  FASTCL_LAUNCH(grid, Warps<T>::kThreads, Smem<T>::kTileBytes, stream, pair_grad_kernel<T, kKind>)(p);
  return cudaGetLastError();
}

}  // namespace fastcl::cuda
