// The part every fastcl kernel shares: the kBlockA x kBlockB tile of A . B^T computed with tensor
// cores from a multi-stage cp.async pipeline over the features, and the log-sum-exp merge rule.
#pragma once

#include <cmath>
#include <cstdint>

#include "mma.cuh"
#include "params.h"
#include "plan.h"

namespace fastcl::cuda {

// Dynamic shared memory of the kernels, in elements of T: kStages stages of A tiles, then of B
// tiles. 16-bit: 3 stages (60 KiB), so that two CTAs and their static shared memory fit an A100's
// 164 KiB (4 stages would not); float: 2 (72 KiB, one CTA of 8 warps per SM). Above the 48 KiB a
// launch gets by default: the launchers opt in (cudaFuncSetAttribute), up to kOptInLimit.
// backend/cuda/plan.py `smem_bytes` mirrors this (tests/test_cuda_plan.py checks it).
template <typename T>
struct Smem {
  static constexpr int kStages = sizeof(T) == 2 ? 3 : 2;
  static constexpr int kStage = kBlockA * WarpMma<T>::kLds;
  static constexpr size_t kTileBytes = 2 * kStages * kStage * sizeof(T);
  static constexpr size_t kOptInLimit = 163 * 1024;  // sm_80's per-block maximum (sm_90: 227 KiB)
  static_assert(kBlockA == kBlockB, "A and B stages share one layout");
  static_assert(kTileBytes + 8 * 1024 <= kOptInLimit, "a tile kernel's shared memory fits one sm_80 block");
};

// Launch `kernel` with Smem<T>'s dynamic shared memory, opting in above the default 48 KiB (per
// launch: the attribute belongs to the current device, and setting it costs about a microsecond).
template <typename T, typename Kernel>
cudaError_t allow_tile_smem(Kernel* kernel) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(Smem<T>::kTileBytes));
}

// The block's dynamic shared memory (its launch's smem bytes), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef FASTCL_HOST_EXEC
  return static_cast<T*>(::fastcl::host::dynamic_shared());
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return reinterpret_cast<T*>(smem_raw);
#endif
}

// Log-sum-exp statistics are kept in base 2: log2(e) is folded into the logit scale, so each
// exponential is one exp2f (MUFU ex2) instead of expf's range reduction around it; launch.cu turns
// the merged (shift, sum) back into natural units once per row and column.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// An infinite maximum shifts by 0: an all -inf line then sums to 0 (lse -inf), a +inf entry to +inf
// (lse +inf); NaN stays NaN (as csrc/cpu/tile_math.h).
__device__ __forceinline__ float finite_shift(float max) { return isinf(max) ? 0.0f : max; }

// Online log-sum-exp state in base 2 (shift m, sum s = sum 2^(v - m)); merge a block's (shift, sum).
// Same rule as the CPU kernels: a NaN sum propagates, an empty block (sum 0) changes nothing.
__device__ __forceinline__ void lse_merge(float& m, float& s, float block_shift, float block_sum) {
  if (block_sum == 0.0f) return;
  if (s == 0.0f) {
    m = block_shift;
    s = block_sum;
    return;
  }
  const float top = fmaxf(m, block_shift);
  s = s * exp2f(m - top) + block_sum * exp2f(block_shift - top);
  m = top;
}

// acc = the warp's block of A[a0 : a0 + kBlockA] . B[b0 : b0 + kBlockB]^T over all features
// (unscaled; rows past the ends read as 0). A kStages-deep pipeline: stage kt is computed while the next kStages - 1 are in flight; one
// cp.async group is committed per step (empty past the end) so that wait_group counts stay exact.
// Ends with a __syncthreads: the stages are free to be refilled.
template <typename T>
__device__ __forceinline__ void sgemm_tile(typename WarpMma<T>::Acc& acc, const PairParams& p, int64_t a0,
                                           int64_t b0, T* smem, int warp_m, int warp_n, int lane) {
  using W = Warps<T>;
  constexpr int kLds = WarpMma<T>::kLds;
  constexpr int kStage = Smem<T>::kStage;
  constexpr int kStages = Smem<T>::kStages;
  typename WarpMma<T>::Acc corr;  // float: the 3xTF32 correction products (mma.cuh); unused (and dropped) for 16-bit
#pragma unroll
  for (int mt = 0; mt < W::kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < W::kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = corr[mt][nt][e] = 0.0f;
    }
  }
  T* a_stages = smem;
  T* b_stages = smem + kStages * kStage;
  const int k_tiles = static_cast<int>(cdiv(p.d, kBlockK));  // D < 2^31 features
  if (k_tiles == 0) return;
  TileLoader<T, kBlockA, kBlockK, kLds, W::kThreads> a_load(static_cast<const T*>(p.a), p.rows_a, p.d, p.lda, a0);
  TileLoader<T, kBlockB, kBlockK, kLds, W::kThreads> b_load(static_cast<const T*>(p.b), p.rows_b, p.d, p.ldb, b0);
  const int a_warp = warp_m * W::kRows * kLds, b_warp = warp_n * W::kCols * kLds;
  const auto load = [&](int kt) {  // stages are loaded in order: kt = 0, 1, 2, ...
    if (kt < k_tiles) {
      const int stage = kt % kStages;
      a_load.next(a_stages + stage * kStage);
      b_load.next(b_stages + stage * kStage);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) load(s);
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // groups 0 .. kt have landed: stage kt is in shared memory
    __syncthreads();               // ... for every thread, and every warp is done with step kt - 1
    load(kt + kStages - 1);        // refills the stage step kt - 1 read
    const int stage = kt % kStages;
    WarpMma<T>::sgemm_stage(acc, corr, a_stages + stage * kStage + a_warp, b_stages + stage * kStage + b_warp,
                            lane);
  }
  __syncthreads();  // the next call's prologue refills the stages
#pragma unroll
  for (int mt = 0; mt < W::kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < W::kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = WarpMma<T>::finish(acc[mt][nt][e], corr[mt][nt][e]);
    }
  }
}

// Op lse_prefixes: acc += the warp's block of A[a0 :, k0 : k1] . B[b0 :, k0 : k1]^T, a segment of the
// features (k0 a whole number of 16-byte chunks: launch.cu lays segments out so). sgemm_tile's
// pipeline over the segment's stages, restarted per segment; float: the 3xTF32 corrections are
// summed apart and folded into acc at the segment's end (finish), so acc is a plain sum between
// segments and a prefix's epilogue reads it as sgemm_tile's result. A separate function so that
// sgemm_tile's code (the plain kernels', which tests/test_sass.py and the model read) is unchanged.
template <typename T>
__device__ __forceinline__ void sgemm_tile_add(typename WarpMma<T>::Acc& acc, const PairParams& p, int64_t a0,
                                               int64_t b0, int k0, int k1, T* smem, int warp_m, int warp_n,
                                               int lane) {
  using W = Warps<T>;
  constexpr int kLds = WarpMma<T>::kLds;
  constexpr int kStage = Smem<T>::kStage;
  constexpr int kStages = Smem<T>::kStages;
  typename WarpMma<T>::Acc corr;
#pragma unroll
  for (int mt = 0; mt < W::kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < W::kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) corr[mt][nt][e] = 0.0f;
    }
  }
  T* a_stages = smem;
  T* b_stages = a_stages + kStages * kStage;
  const int k_tiles = static_cast<int>(cdiv(k1 - k0, kBlockK));
  if (k_tiles <= 0) return;
  TileLoader<T, kBlockA, kBlockK, kLds, W::kThreads> a_load(static_cast<const T*>(p.a) + k0, p.rows_a, k1 - k0,
                                                            p.lda, a0);
  TileLoader<T, kBlockB, kBlockK, kLds, W::kThreads> b_load(static_cast<const T*>(p.b) + k0, p.rows_b, k1 - k0,
                                                            p.ldb, b0);
  const int a_warp = warp_m * W::kRows * kLds, b_warp = warp_n * W::kCols * kLds;
  const auto load = [&](int kt) {
    if (kt < k_tiles) {
      const int stage = kt % kStages;
      a_load.next(a_stages + stage * kStage);
      b_load.next(b_stages + stage * kStage);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) load(s);
  constexpr int kInFlight = kStages - 2;  // groups still in flight when stage kt is read
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kInFlight>();
    __syncthreads();
    load(kt + kStages - 1);
    const int stage = kt % kStages;
    WarpMma<T>::sgemm_stage(acc, corr, a_stages + stage * kStage + a_warp, b_stages + stage * kStage + b_warp,
                            lane);
  }
  cp_async_wait<0>();  // the empty groups past the end too: the next segment's wait counts start afresh
  __syncthreads();     // the next segment's prologue refills the stages
#pragma unroll
  for (int mt = 0; mt < W::kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < W::kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = WarpMma<T>::finish(acc[mt][nt][e], corr[mt][nt][e]);
    }
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

// ---- op lse_exclude: the pairs of a tile that its rows list --------------------------------------
// A bit per pair in shared memory (2 KiB): bit j % 32 of word j / 32 of row r is set when A row a0 + r
// lists B column b0 + j. Built per tile by one thread per row, so each row's words have one writer
// (repeats and -1 padding need no care: a bit is set or not); read by every warp in the epilogue,
// after the tile's logits, so the main loop is the plain one. In registers beside the accumulators a
// list costs at least a word per row (the 16-bit forward already spilled with 16 registers of keys).
constexpr int kListedWords = kBlockB / 32;
using ListedBits = uint32_t[kBlockA][kListedWords];

// bits = the tile (a0, b0)'s listed pairs; rows past A's end list nothing. No barrier: the caller
// orders these writes after the previous tile's reads and before this tile's.
template <int kThreads>
__device__ __forceinline__ void mark_listed(ListedBits& bits, const PairParams& p, int64_t a0, int64_t b0) {
  static_assert(kBlockB == 128, "a row's bits are two 64-bit halves");
  // In unsigned arithmetic, -1 padding and every other tile's columns land at j >= kBlockB.
  const uint64_t base = static_cast<uint64_t>(p.listed_col0) + static_cast<uint64_t>(b0);
  for (int r = threadIdx.x; r < kBlockA; r += kThreads) {
    uint64_t lo = 0, hi = 0;  // columns [0, 64) and [64, 128)
    if (a0 + r < p.rows_a) {
      const int64_t* listed = p.listed + (a0 + r) * p.listed_width;
      for (int64_t e = 0; e < p.listed_width; ++e) {
        const uint64_t j = static_cast<uint64_t>(listed[e]) - base;
        if (j < 64) {
          lo |= uint64_t{1} << j;
        } else if (j < 128) {
          hi |= uint64_t{1} << (j - 64);
        }
      }
    }
    bits[r][0] = static_cast<uint32_t>(lo);
    bits[r][1] = static_cast<uint32_t>(lo >> 32);
    bits[r][2] = static_cast<uint32_t>(hi);
    bits[r][3] = static_cast<uint32_t>(hi >> 32);
  }
}

// acc = value at the thread's listed pairs: its tile rows r0 + 16 mt + 8 h, columns
// warp_n kCols + 8 nt + 2 t + c (acc[mt][nt][2 h + c], the mma accumulator layout). A warp's 64
// columns are two words of each row: its 8 row groups read 8 rows 16 bytes apart (distinct banks),
// the 4 lanes of a group the same words (a broadcast).
template <typename T>
__device__ __forceinline__ void drop_listed(typename WarpMma<T>::Acc& acc, const ListedBits& bits, int r0,
                                            int warp_n, int t, float value) {
  using W = Warps<T>;
  static_assert(W::kCols == 64, "a warp's columns are two words of a row's bits");
#pragma unroll
  for (int mt = 0; mt < W::kMT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t* words = bits[r0 + 16 * mt + 8 * h] + 2 * warp_n;
      const uint64_t mine = (static_cast<uint64_t>(words[1]) << 32 | words[0]) >> (2 * t);
#pragma unroll
      for (int nt = 0; nt < W::kNT; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          if ((mine >> (8 * nt + c)) & 1) acc[mt][nt][2 * h + c] = value;
        }
      }
    }
  }
}

__device__ __forceinline__ float load_scale(const PairParams& p) {
  return p.scale_ptr != nullptr ? *p.scale_ptr : p.scale;
}

}  // namespace fastcl::cuda
