// The gradient tile kernel: compute one 64 x 64 tile of S = scale * A . B^T (once: no per-slice
// recompute), turn it into G = dLoss/dS in registers and store it into the caller's G block, in the
// input type (float for float inputs) times the power-of-two g_scale. The products G @ y and
// G.T @ x are library GEMMs on that block (csrc/cuda/ops_cuda.cpp; DESIGN.md says why).
//
//   kLse:    G_ab = ga_a exp(S_ab - sa_a) + gb_b exp(S_ab - sb_b); keyed pairs 0 (computed in base 2:
//            2^(S log2(e) - sa log2(e)), log2(e) folded into the scale, one exp2f per term).
//   kSigLip: f = S + bias_a, negated on keyed pairs (positives); loss softplus(f),
//            G = w_a * (keyed ? -sigmoid(f) : sigmoid(f)).
//   kMW:     keyed pairs excluded (loss 0, G 0); otherwise loss softplus(f), G = w_a sigmoid(f).
// Pointwise kinds also write each row's loss and G sums over the tile's 64 columns (partials
// [rows_a, column tiles], summed by the host in a fixed order).
//
// Grid: one CTA per 64 x 64 tile of one block of S (launch.cu offsets A and B to the block),
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
__global__ void __launch_bounds__(kThreads, 2) pair_grad_kernel(const GradParams p) {
  T* smem = dynamic_smem<T>();
  constexpr bool kPointwise = kKind != GradKind::kLse;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;
  const int64_t b_tiles = cdiv(p.rows_b, kBlockB);
  const int64_t b_tile = static_cast<int64_t>(blockIdx.x) % b_tiles;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) / b_tiles * kBlockA;
  const int64_t b0 = b_tile * kBlockB;
  const float scale = load_scale(p);
  const float scale2 = scale * kLog2e;  // base-2 logits for kLse
  const float g_scale = p.g_scale != nullptr ? *p.g_scale : 1.0f;

  float acc[8][4];
  sgemm_tile<T>(acc, p, a0, b0, smem, warp, lane);

  // Per-row constants of the A side.
  int64_t row[2];
  bool row_ok[2];
  int64_t row_key[2];
  float ga[2], sa[2], bias[2], weight[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = a0 + warp * 16 + g + 8 * h;
    row_ok[h] = row[h] < p.rows_a;
    const int64_t r = row_ok[h] ? row[h] : 0;
    row_key[h] = p.keys_a != nullptr ? p.keys_a[r] : 0;
    ga[h] = p.ga != nullptr ? p.ga[r] : 0.0f;
    sa[h] = p.ga != nullptr ? p.sa[r] * kLog2e : 0.0f;
    bias[h] = p.bias != nullptr ? p.bias[r] : 0.0f;
    weight[h] = p.weight != nullptr ? p.weight[r] : 1.0f;
  }
  float loss_sum[2] = {0.0f, 0.0f};
  float grad_sum[2] = {0.0f, 0.0f};

#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e >> 1;
      const int64_t col = b0 + nt * 8 + 2 * t + (e & 1);
      const bool ok = row_ok[h] && col < p.rows_b;
      const bool keyed = ok && p.keys_a != nullptr && p.keys_b[col] == row_key[h];
      float grad = 0.0f;
      if constexpr (kKind == GradKind::kLse) {
        const float s2 = acc[nt][e] * scale2;
        if (ok && !keyed) {
          if (p.ga != nullptr) grad = ga[h] * exp2f(s2 - sa[h]);
          if (p.gb != nullptr) grad += p.gb[col] * exp2f(s2 - p.sb[col] * kLog2e);
        }
      } else {
        const float s = acc[nt][e] * scale;
        const bool excluded = kKind == GradKind::kMW && keyed;
        const bool flip = kKind == GradKind::kSigLip && keyed;
        if (ok && !excluded) {
          const float f = flip ? -(s + bias[h]) : s + bias[h];
          float loss, sigmoid;
          softplus_sigmoid(f, loss, sigmoid);
          grad = weight[h] * (flip ? -sigmoid : sigmoid);
          loss_sum[h] += loss;
          grad_sum[h] += grad;
        }
      }
      acc[nt][e] = grad;
    }
  }

  if (p.g != nullptr) {
    T* g_block = static_cast<T*>(p.g);
    const bool vector = (p.ldg & 1) == 0;  // even rows keep (row, even col) pairs aligned
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const int64_t col = b0 + nt * 8 + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (row_ok[h] && col < p.rows_b) {
          store_pair<T>(g_block + row[h] * p.ldg + col, acc[nt][2 * h] * g_scale, acc[nt][2 * h + 1] * g_scale,
                        col + 1 < p.rows_b, vector);
        }
      }
    }
  }
  if constexpr (kPointwise) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = loss_sum[h], gs = grad_sum[h];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      gs += __shfl_xor_sync(0xffffffffu, gs, 1);
      gs += __shfl_xor_sync(0xffffffffu, gs, 2);
      if (t == 0 && row_ok[h]) {
        const int64_t at = row[h] * b_tiles + b_tile;
        if (p.row_loss != nullptr) p.row_loss[at] = l;
        if (p.row_dsum != nullptr) p.row_dsum[at] = gs;
      }
    }
  }
}

template <typename T, GradKind kKind>
cudaError_t run_pair_grad(const GradParams& p, dim3 grid, cudaStream_t stream) {
  FASTCL_LAUNCH(grid, kThreads, Smem<T>::kTileBytes, stream, pair_grad_kernel<T, kKind>)(p);
  return cudaGetLastError();
}

}  // namespace fastcl::cuda
