// The part every fastcl kernel shares: the 64 x 64 tile of A . B^T computed with tensor cores from a
// double-buffered cp.async pipeline over the features, and the log-sum-exp merge rule.
#pragma once

#include <cmath>
#include <cstdint>

#include "mma.cuh"
#include "params.h"

namespace fastcl::cuda {

__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Dynamic shared memory of the kernels, in elements of T: two stages of A and B tiles, then (for
// the gradient kernels) the Bd tile [kBlockB, kBlockD] that G multiplies.
template <typename T>
struct Smem {
  static constexpr int kStage = kBlockA * WarpMma<T>::kLds;
  static constexpr int kBd = kBlockB * WarpMma<T>::kLdd;
  static constexpr size_t kTileBytes = 4 * kStage * sizeof(T);
  static constexpr size_t kGradBytes = kTileBytes + kBd * sizeof(T);
  static_assert(kBlockA == kBlockB, "A and B stages share one layout");
};

// An infinite maximum shifts by 0: an all -inf line then sums to 0 (lse -inf), a +inf entry to +inf
// (lse +inf); NaN stays NaN (as csrc/cpu/tile_math.h).
__device__ __forceinline__ float finite_shift(float max) { return isinf(max) ? 0.0f : max; }

// Online log-sum-exp state (shift m, sum s = sum exp(v - m)); merge a block's (shift, sum). Same rule
// as the CPU kernels: a NaN sum propagates, an empty block (sum 0) changes nothing.
__device__ __forceinline__ void lse_merge(float& m, float& s, float block_shift, float block_sum) {
  if (block_sum == 0.0f) return;
  if (s == 0.0f) {
    m = block_shift;
    s = block_sum;
    return;
  }
  const float top = fmaxf(m, block_shift);
  s = s * expf(m - top) + block_sum * expf(block_shift - top);
  m = top;
}

// acc = A[a0 : a0 + 64] . B[b0 : b0 + 64]^T over all features (unscaled; rows past the ends read as
// 0). The caller may have committed cp.async groups before (they are waited for here too). Ends
// with a __syncthreads: the stages are free to be refilled.
template <typename T>
__device__ __forceinline__ void sgemm_tile(float acc[8][4], const PairParams& p, int64_t a0, int64_t b0, T* smem,
                                           int warp, int lane) {
  constexpr int kLds = WarpMma<T>::kLds;
  constexpr int kStage = Smem<T>::kStage;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
  }
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const int64_t k_tiles = cdiv(p.d, kBlockK);
  if (k_tiles == 0) return;
  load_tile<T, kBlockA, kBlockK, kLds>(smem, a, p.rows_a, p.d, p.lda, a0, 0, p.vec16);
  load_tile<T, kBlockB, kBlockK, kLds>(smem + 2 * kStage, b, p.rows_b, p.d, p.ldb, b0, 0, p.vec16);
  cp_async_commit();
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    const int stage = static_cast<int>(kt & 1);
    if (kt + 1 < k_tiles) {
      const int next = stage ^ 1;
      const int64_t k0 = (kt + 1) * kBlockK;
      load_tile<T, kBlockA, kBlockK, kLds>(smem + next * kStage, a, p.rows_a, p.d, p.lda, a0, k0, p.vec16);
      load_tile<T, kBlockB, kBlockK, kLds>(smem + (2 + next) * kStage, b, p.rows_b, p.d, p.ldb, b0, k0, p.vec16);
      cp_async_commit();
      cp_async_wait<1>();  // everything but the stage just issued has landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    WarpMma<T>::sgemm_stage(acc, smem + stage * kStage, smem + (2 + stage) * kStage, warp, lane);
    __syncthreads();  // the stage read here is refilled in the next iteration
  }
}

// The B tiles of one split: [begin, end) of cdiv(rows_b, kBlockB).
struct TileRange {
  int64_t begin, end;
};

__device__ __forceinline__ TileRange split_tiles(const PairParams& p, unsigned split) {
  const int64_t tiles = cdiv(p.rows_b, kBlockB);
  const int64_t begin = static_cast<int64_t>(split) * p.tiles_per_split;
  const int64_t end = begin + p.tiles_per_split < tiles ? begin + p.tiles_per_split : tiles;
  return {begin, end};
}

__device__ __forceinline__ float load_scale(const PairParams& p) {
  return p.scale_ptr != nullptr ? *p.scale_ptr : p.scale;
}

}  // namespace fastcl::cuda
