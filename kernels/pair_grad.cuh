// Gradient kernels: recompute a tile of S = scale * A . B^T, turn it into G = dLoss/dS in registers,
// and accumulate G . B into the CTA's own rows of the output (no atomics). Launched once with
// (A, B) = (x, y) for G @ y and once with (A, B) = (y, x) for G^T @ x.
//
//   kLse:    G_ab = ga_a exp(S_ab - sa_a) + gb_b exp(S_ab - sb_b); keyed pairs 0.
//   kSigLip: f = S + bias_row, negated on keyed pairs (positives); loss softplus(f),
//            G = w_row * (keyed ? -sigmoid(f) : sigmoid(f)).
//   kMW:     keyed pairs excluded (loss 0, G 0); otherwise loss softplus(f), G = w_row sigmoid(f).
// "row" is the engine's row side: the A side when a_is_row, else the B side.
//
// Grid: x = 64-row tile of A, y = 128-feature chunk of the output (S is recomputed per chunk),
// z = split of B's tiles (partial outputs [splits, rows_a, d], summed in order by launch.cu).
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

template <typename T, GradKind kKind>
__global__ void __launch_bounds__(kThreads, 2) pair_grad_kernel(const GradParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  T* smem_bd = smem + 4 * Smem<T>::kStage;
  constexpr int kOutTiles = kBlockD / 8;
  constexpr bool kPointwise = kKind != GradKind::kLse;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kBlockA;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kBlockD;
  const TileRange range = split_tiles(p, blockIdx.z);
  const float scale = load_scale(p);
  const T* b_mat = static_cast<const T*>(p.b);

  // Per-row constants of the A side.
  int64_t row[2];
  bool row_ok[2];
  int64_t row_key[2];
  float ga[2], sa[2], bias_a[2], weight_a[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = a0 + warp * 16 + g + 8 * h;
    row_ok[h] = row[h] < p.rows_a;
    const int64_t r = row_ok[h] ? row[h] : 0;
    row_key[h] = p.keys_a != nullptr ? p.keys_a[r] : 0;
    ga[h] = p.ga != nullptr ? p.ga[r] : 0.0f;
    sa[h] = p.ga != nullptr ? p.sa[r] : 0.0f;
    bias_a[h] = (p.a_is_row && p.bias != nullptr) ? p.bias[r] : 0.0f;
    weight_a[h] = (p.a_is_row && p.weight != nullptr) ? p.weight[r] : 1.0f;
  }

  float out[kOutTiles][4];
#pragma unroll
  for (int n = 0; n < kOutTiles; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) out[n][e] = 0.0f;
  }
  float loss_sum[2] = {0.0f, 0.0f};
  float grad_sum[2] = {0.0f, 0.0f};
  float acc[8][4];

  for (int64_t bt = range.begin; bt < range.end; ++bt) {
    const int64_t b0 = bt * kBlockB;
    if (p.accumulate) {  // Bd = B[b0 : b0 + 64, d0 : d0 + 128], in flight while S is computed
      load_tile<T, kBlockB, kBlockD, WarpMma<T>::kLdd>(smem_bd, b_mat, p.rows_b, p.d, p.ldb, b0, d0, p.vec16);
      cp_async_commit();
    }
    sgemm_tile<T>(acc, p, a0, b0, smem, warp, lane);
    cp_async_wait<0>();
    __syncthreads();  // Bd visible to every warp (also when d == 0 and the S loop waited for nothing)

#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const int64_t col = b0 + nt * 8 + 2 * t + (e & 1);
        const bool ok = row_ok[h] && col < p.rows_b;
        const bool keyed = ok && p.keys_a != nullptr && p.keys_b[col] == row_key[h];
        const float s = acc[nt][e] * scale;
        float grad = 0.0f;
        if constexpr (kKind == GradKind::kLse) {
          if (ok && !keyed) {
            if (p.ga != nullptr) grad = ga[h] * expf(s - sa[h]);
            if (p.gb != nullptr) grad += p.gb[col] * expf(s - p.sb[col]);
          }
        } else {
          const float bias = p.a_is_row ? bias_a[h] : (ok && p.bias != nullptr ? p.bias[col] : 0.0f);
          const float weight = p.a_is_row ? weight_a[h] : (ok && p.weight != nullptr ? p.weight[col] : 1.0f);
          const bool excluded = kKind == GradKind::kMW && keyed;
          const bool flip = kKind == GradKind::kSigLip && keyed;
          if (ok && !excluded) {
            const float f = flip ? -(s + bias) : s + bias;
            float loss, sigmoid;
            softplus_sigmoid(f, loss, sigmoid);
            grad = weight * (flip ? -sigmoid : sigmoid);
            loss_sum[h] += loss;
            grad_sum[h] += grad;
          }
        }
        acc[nt][e] = grad;
      }
    }
    if (p.accumulate) WarpMma<T>::ggemm(out, acc, smem_bd, lane);
    __syncthreads();  // Bd and the stages are refilled by the next tile
  }

  if (p.accumulate) {
    float* dst = p.out + static_cast<int64_t>(blockIdx.z) * p.rows_a * p.d;
#pragma unroll
    for (int n = 0; n < kOutTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const int64_t col = d0 + n * 8 + 2 * t + (e & 1);
        if (row_ok[h] && col < p.d) dst[row[h] * p.d + col] = out[n][e];
      }
    }
  }
  if constexpr (kPointwise) {
    if (p.a_is_row && blockIdx.y == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float l = loss_sum[h], gs = grad_sum[h];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        gs += __shfl_xor_sync(0xffffffffu, gs, 1);
        gs += __shfl_xor_sync(0xffffffffu, gs, 2);
        if (t == 0 && row_ok[h]) {
          const int64_t at = static_cast<int64_t>(blockIdx.z) * p.rows_a + row[h];
          if (p.row_loss != nullptr) p.row_loss[at] = l;
          if (p.row_dsum != nullptr) p.row_dsum[at] = gs;
        }
      }
    }
  }
}

template <typename T, GradKind kKind>
cudaError_t run_pair_grad(const GradParams& p, dim3 grid, cudaStream_t stream) {
  constexpr size_t kSmem = Smem<T>::kGradBytes;
  auto kernel = pair_grad_kernel<T, kKind>;
  if (kSmem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fastcl::cuda
