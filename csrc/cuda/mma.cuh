// Tensor-core building blocks of the fastcl kernels: cp.async tile loads and the warp-level step of
// the S tile, specialised per input type.
//
//   float:          3xTF32 mma.sync.m16n8k8 (a = big + small, a*b ~ big*big + big*small + small*big):
//                   about fp32 accuracy (~2^-21 relative per product, fp32 accumulation), 3 MMAs.
//                   big*big accumulates apart from the two correction products, which are added
//                   only where it is finite: an infinite input makes small = inf - inf = NaN, and
//                   S must then be what float32 gives (+-inf, or NaN for inf * 0), as on the CPU.
//   half, bfloat16: mma.sync.m16n8k16 with fp32 accumulation.
//
// Fragment layouts are the PTX ISA's (lane = 4 * g + t, g = groupID, t = thread in group):
//   C/D m16n8 (f32): c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
//   A m16k16 (16-bit pairs): a01 (g, 2t..), a23 (g+8, 2t..), a45 (g, 2t+8..), a67 (g+8, 2t+8..)
//   B k16n8 (16-bit pairs): b01 (k 2t.., n g), b23 (k 2t+8.., n g)
//   A m16k8 (tf32): a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4);  B k8n8: b0 (t, g), b1 (t+4, g)
// A warp owns a kMT * 16 x kNT * 8 block of the CTA's tile (Warps below): acc[mt][nt][.] is its
// m16n8 block of rows 16 mt .., columns 8 nt ...
// (The gradient products G @ y and G.T @ x are not here: they are library GEMMs on a G block,
// see csrc/cuda/DESIGN.md.)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "params.h"

// FASTCL_HOST_EXEC: the host execution (csrc/cuda/host, DESIGN.md "Executed on the CPU") compiles this
// file with a host compiler; each inline PTX instruction then has a host branch that runs the
// ISA's semantics for the whole warp (host/ptx.cpp).

namespace fastcl::cuda {

// How a CTA's warps cover its kBlockA x kBlockB tile: kM x kN warps (warp = kN * warp_m + warp_n),
// each a block of kMT m16 and kNT n8 MMA tiles; params.h says why each type has its shape.
template <typename T>
struct Warps {
  static constexpr int kCount = sizeof(T) == 2 ? kWarps16 : kWarps32;
  static constexpr int kN = 2;
  static constexpr int kM = kCount / kN;
  static constexpr int kThreads = 32 * kCount;
  static constexpr int kRows = kBlockA / kM;  // rows of a warp's block
  static constexpr int kCols = kBlockB / kN;
  static constexpr int kMT = kRows / 16;
  static constexpr int kNT = kCols / 8;
  // __launch_bounds__' CTAs per SM: two of 4 warps (up to 255 registers each), one of 8
  static constexpr int kMinCtas = kCount == 4 ? 2 : 1;
  static_assert(kRows % 16 == 0 && kCols % 16 == 0, "whole m16 and (pairs of) n8 tiles per warp");
};

// ---- cp.async -------------------------------------------------------------------------------

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int bytes = valid ? 16 : 0;  // 0: zero-fill the 16 bytes, read nothing
#ifdef FASTCL_HOST_EXEC
  ::fastcl::host::ptx::cp_async_cg_16(smem, gmem, bytes);
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef FASTCL_HOST_EXEC
  ::fastcl::host::ptx::cp_async_commit_group();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef FASTCL_HOST_EXEC
  ::fastcl::host::ptx::cp_async_wait_group(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// The cp.async loads of one operand's tile, stage after stage: rows [row0, row0 + kRows) of a
// row-major [rows, d] matrix (row stride ld), kCols features per stage, into smem [kRows][kLds].
// Chunk c = threadIdx.x + i kThreads of a stage is row c / kChunksPerRow, features
// (c % kChunksPerRow) kVec ..: since kThreads is a multiple of kChunksPerRow, a thread keeps one
// column and kPerThread rows, kThreads / kChunksPerRow apart. Everything that does not change
// between stages (row pointers, which rows exist, shared offsets) is computed once per tile; a
// stage is then kPerThread cp.async with a compile-time trip count and the pointers advance by
// kCols. Out-of-range chunks become 0. The launchers require 16-byte aligned rows and d a multiple
// of 16 / sizeof(T) (the host pads a copy otherwise: plan.h aligned_features), so whole 16-byte
// chunks are in or out.
template <typename T, int kRows, int kCols, int kLds, int kThreads>
struct TileLoader {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static constexpr int kChunksPerRow = kCols / kVec;
  static constexpr int kPerThread = kRows * kChunksPerRow / kThreads;
  static constexpr int kRowStep = kThreads / kChunksPerRow;  // rows between a thread's chunks
  static_assert(kCols % kVec == 0 && kLds % kVec == 0, "tile rows must be whole 16-byte chunks");
  static_assert(kThreads % kChunksPerRow == 0 && kRows * kChunksPerRow % kThreads == 0,
                "every thread copies the same number of chunks of one column");

  const T* src;            // the tile's first row at the thread's column, at the next stage
  int offset[kPerThread];  // elements from it to chunk i (0 for a row past the end: it names an existing row)
  unsigned rows_ok;        // bit i: the row of chunk i exists
  int left;                // features from the thread's column to the end of a row, at the next stage
  int dst;                 // shared offset (elements) of chunk 0 within a stage

  // row0 < rows (a tile with no row is never launched); d and kRows * ld below 2^31.
  __device__ __forceinline__ TileLoader(const T* g, int64_t rows, int64_t d, int64_t ld, int64_t row0) : rows_ok(0) {
    const int r = static_cast<int>(threadIdx.x) / kChunksPerRow;
    const int col = static_cast<int>(threadIdx.x) % kChunksPerRow * kVec;
    dst = r * kLds + col;
    left = static_cast<int>(d) - col;
    src = g + row0 * ld + col;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int row = r + i * kRowStep;
      const bool ok = row0 + row < rows;
      rows_ok |= static_cast<unsigned>(ok) << i;
      offset[i] = ok ? static_cast<int>(row * ld) : 0;
    }
  }

  // Issue the next stage's copies into `stage` (not committed). A chunk whose row is past the end
  // names chunk 0's row (it reads nothing, but its address stays inside the matrix).
  __device__ __forceinline__ void next(T* stage) {
    const bool col_ok = left > 0;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      cp_async_16(stage + dst + i * kRowStep * kLds, src + offset[i], col_ok && (rows_ok >> i & 1u));
    }
    src += kCols;
    left -= kCols;
  }
};

// ---- MMA wrappers ---------------------------------------------------------------------------

__device__ __forceinline__ void mma_tf32(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef FASTCL_HOST_EXEC
  ::fastcl::host::ptx::mma_m16n8k8_tf32(c, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <typename T>
__device__ __forceinline__ void mma_16bit(float c[4], const uint32_t a[4], const uint32_t b[2]);

template <>
__device__ __forceinline__ void mma_16bit<__half>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef FASTCL_HOST_EXEC
  ::fastcl::host::ptx::mma_m16n8k16(::fastcl::host::ptx::Half::kF16, c, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <>
__device__ __forceinline__ void mma_16bit<__nv_bfloat16>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef FASTCL_HOST_EXEC
  ::fastcl::host::ptx::mma_m16n8k16(::fastcl::host::ptx::Half::kBF16, c, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// x = big + small with big, small tf32 (round to nearest): the 3xTF32 split.
__device__ __forceinline__ void split_tf32(float x, uint32_t& big, uint32_t& small) {
#ifdef FASTCL_HOST_EXEC
  big = ::fastcl::host::ptx::cvt_rna_tf32_f32(x);
  small = ::fastcl::host::ptx::cvt_rna_tf32_f32(x - __uint_as_float(big));
#else
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(big) : "f"(x));
  const float rest = x - __uint_as_float(big);
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(small) : "f"(rest));
#endif
}

// ---- the warp step of the S tile -------------------------------------------------------------
// sgemm_stage: acc (+ corr, float only) += A[warp rows, kBlockK] . B[warp columns, kBlockK]^T from
// one smem stage; sA and sB point at the warp's first row of A and of B in the stage.

// Four 8 x 8 matrices of 16-bit elements from shared memory: lanes 8 i .. 8 i + 7 give the row
// addresses of matrix i; each lane receives, in r[i], the pair (row lane / 4, columns 2 (lane % 4), +1)
// of matrix i: exactly the (g, 2t) element pairs of the MMA fragments above. One instruction
// replaces four 32-bit shared loads.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem) {
#ifdef FASTCL_HOST_EXEC
  ::fastcl::host::ptx::ldmatrix_m8n8_x4_b16(r, smem);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

template <typename T>
struct WarpMma {  // half and bfloat16
  static constexpr int kMT = Warps<T>::kMT, kNT = Warps<T>::kNT;
  using Acc = float[kMT][kNT][4];
  // smem row stride (elements): 80 bytes, so the 8 rows of an ldmatrix phase hit 8 distinct 16-byte
  // bank groups (rows start at words 0, 20, 8, 28, 16, 4, 24, 12 mod 32): conflict-free.
  static constexpr int kLds = kBlockK + 8;

  // A fragment (m16k16) of block mt: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7,
  // k 8-15), (rows 8-15, k 8-15) = a[mt][0..3]. B fragments of two column blocks nt, nt + 1 (k16n8
  // each, B's rows are S's columns): (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15,
  // k 8-15) = b[0..1] of nt, then of nt + 1. Per 16 features: kMT + kNT / 2 ldmatrix.x4 for
  // kMT * kNT MMAs (8 for 32 with 64 x 64 warp blocks).
  __device__ __forceinline__ static void sgemm_stage(Acc& acc, Acc&, const T* sA, const T* sB, int lane) {
    const T* a_rows = sA + (lane & 15) * kLds + (lane >> 4) * 8;
    const T* b_rows = sB + ((lane >> 4) * 8 + (lane & 7)) * kLds + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int k0 = 0; k0 < kBlockK; k0 += 16) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) ldmatrix_x4(a[mt], a_rows + mt * 16 * kLds + k0);
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, b_rows + np * 16 * kLds + k0);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16bit<T>(acc[mt][2 * np], a[mt], b);
          mma_16bit<T>(acc[mt][2 * np + 1], a[mt], b + 2);
        }
      }
    }
  }

  // 16-bit products are exact in fp32: nothing to correct.
  __device__ __forceinline__ static float finish(float acc, float) { return acc; }
};

template <>
struct WarpMma<float> {
  static constexpr int kMT = Warps<float>::kMT, kNT = Warps<float>::kNT;
  using Acc = float[kMT][kNT][4];
  static constexpr int kLds = kBlockK + 4;   // 144 bytes: conflict-free fragment loads

  __device__ __forceinline__ static void sgemm_stage(Acc& acc, Acc& corr, const float* sA, const float* sB,
                                                     int lane) {
    const int g = lane >> 2, t = lane & 3;
    // One k8 step at a time: unrolled further, the splits of two steps are live together beside the
    // 128 accumulators, and the CLIP gradient kernel spills (84 bytes at 255 registers on sm_80).
#pragma unroll 1
    for (int k0 = 0; k0 < kBlockK; k0 += 8) {
      uint32_t a_big[kMT][4], a_small[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const float* a_lo = sA + (mt * 16 + g) * kLds + k0 + t;
        const float* a_hi = a_lo + 8 * kLds;
        split_tf32(a_lo[0], a_big[mt][0], a_small[mt][0]);
        split_tf32(a_hi[0], a_big[mt][1], a_small[mt][1]);
        split_tf32(a_lo[4], a_big[mt][2], a_small[mt][2]);
        split_tf32(a_hi[4], a_big[mt][3], a_small[mt][3]);
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const float* bp = sB + (nt * 8 + g) * kLds + k0 + t;
        uint32_t b_big[2], b_small[2];
        split_tf32(bp[0], b_big[0], b_small[0]);
        split_tf32(bp[4], b_big[1], b_small[1]);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_tf32(corr[mt][nt], a_small[mt], b_big);
          mma_tf32(corr[mt][nt], a_big[mt], b_small);
          mma_tf32(acc[mt][nt], a_big[mt], b_big);
        }
      }
    }
  }

  // A non-finite big*big sum means an infinite or NaN input: the corrections hold inf - inf there.
  __device__ __forceinline__ static float finish(float acc, float corr) {
    return isfinite(acc) ? acc + corr : acc;
  }
};

}  // namespace fastcl::cuda
