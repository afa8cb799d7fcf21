// Tensor-core building blocks of the fastcl kernels: cp.async tile loads and the two warp-level
// GEMM steps, specialised per input type.
//
//   float:          3xTF32 mma.sync.m16n8k8 (a = big + small, a*b ~ big*big + big*small + small*big):
//                   about fp32 accuracy (~2^-21 relative per product, fp32 accumulation), 3 MMAs.
//   half, bfloat16: mma.sync.m16n8k16 with fp32 accumulation.
//
// Fragment layouts are the PTX ISA's (lane = 4 * g + t, g = groupID, t = thread in group):
//   C/D m16n8 (f32): c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
//   A m16k16 (16-bit pairs): a01 (g, 2t..), a23 (g+8, 2t..), a45 (g, 2t+8..), a67 (g+8, 2t+8..)
//   B k16n8 (16-bit pairs): b01 (k 2t.., n g), b23 (k 2t+8.., n g)
//   A m16k8 (tf32): a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4);  B k8n8: b0 (t, g), b1 (t+4, g)
// A warp owns 16 rows of the 64 x 64 tile: acc[nt][.] is the m16n8 block of columns 8 nt .. 8 nt + 7.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "params.h"

namespace fastcl::cuda {

// ---- cp.async -------------------------------------------------------------------------------

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: zero-fill the 16 bytes, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

template <typename T>
__device__ __forceinline__ T zero_value() { return T(0.0f); }

// Load rows [row0, row0 + kRows) x features [k0, k0 + kCols) of a row-major [rows, d] matrix
// (row stride ld) into smem [kRows][kLds]; out-of-range elements become 0. With vec16 the rows
// are 16-byte aligned and d is a multiple of 16 / sizeof(T): whole 16-byte chunks are in or out,
// and the copy is asynchronous (cp.async); otherwise elements are copied one by one.
template <typename T, int kRows, int kCols, int kLds>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t rows, int64_t d, int64_t ld, int64_t row0,
                                          int64_t k0, bool vec16) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunksPerRow = kCols / kVec;
  static_assert(kCols % kVec == 0 && kLds % kVec == 0, "tile rows must be whole 16-byte chunks");
  for (int c = threadIdx.x; c < kRows * kChunksPerRow; c += kThreads) {
    const int r = c / kChunksPerRow;
    const int kc = (c % kChunksPerRow) * kVec;
    const int64_t gr = row0 + r;
    const int64_t gk = k0 + kc;
    T* dst = smem + r * kLds + kc;
    if (vec16) {
      const bool valid = gr < rows && gk < d;
      cp_async_16(dst, valid ? g + gr * ld + gk : g, valid);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        dst[e] = (gr < rows && gk + e < d) ? g[gr * ld + gk + e] : zero_value<T>();
      }
    }
  }
}

// ---- MMA wrappers ---------------------------------------------------------------------------

__device__ __forceinline__ void mma_tf32(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename T>
__device__ __forceinline__ void mma_16bit(float c[4], const uint32_t a[4], const uint32_t b[2]);

template <>
__device__ __forceinline__ void mma_16bit<__half>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16bit<__nv_bfloat16>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// x = big + small with big, small tf32 (round to nearest): the 3xTF32 split.
__device__ __forceinline__ void split_tf32(float x, uint32_t& big, uint32_t& small) {
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(big) : "f"(x));
  const float rest = x - __uint_as_float(big);
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(small) : "f"(rest));
}

__device__ __forceinline__ void mma_3xtf32(float c[4], const uint32_t a_big[4], const uint32_t a_small[4],
                                           const uint32_t b_big[2], const uint32_t b_small[2]) {
  mma_tf32(c, a_small, b_big);  // small terms first: they are added before the large one
  mma_tf32(c, a_big, b_small);
  mma_tf32(c, a_big, b_big);
}

__device__ __forceinline__ uint32_t pack_bits(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

template <typename T>
__device__ __forceinline__ uint32_t pack_floats(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack_floats<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack_floats<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// ---- the two warp GEMM steps ----------------------------------------------------------------
// sgemm_stage: acc[8][4] += A[16 warp rows, kBlockK] . B[64, kBlockK]^T from one smem stage.
// ggemm:       acc[kBlockD / 8][4] += G[16 warp rows, 64] . Bd[64, kBlockD], with G the warp's
//              fp32 accumulators of the S tile (already turned into gradients) and Bd in smem.

template <typename T>
struct WarpMma {  // half and bfloat16
  static constexpr int kLds = kBlockK + 8;   // smem row stride (elements): 80 bytes, conflict-free
  static constexpr int kLdd = kBlockD + 8;   // Bd row stride

  __device__ __forceinline__ static void sgemm_stage(float acc[8][4], const T* sA, const T* sB, int warp, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const T* a_lo = sA + (warp * 16 + g) * kLds + 2 * t;
    const T* a_hi = a_lo + 8 * kLds;
#pragma unroll
    for (int k0 = 0; k0 < kBlockK; k0 += 16) {
      uint32_t a[4];
      a[0] = *reinterpret_cast<const uint32_t*>(a_lo + k0);
      a[1] = *reinterpret_cast<const uint32_t*>(a_hi + k0);
      a[2] = *reinterpret_cast<const uint32_t*>(a_lo + k0 + 8);
      a[3] = *reinterpret_cast<const uint32_t*>(a_hi + k0 + 8);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const T* bp = sB + (nt * 8 + g) * kLds + k0 + 2 * t;
        uint32_t b[2];
        b[0] = *reinterpret_cast<const uint32_t*>(bp);
        b[1] = *reinterpret_cast<const uint32_t*>(bp + 8);
        mma_16bit<T>(acc[nt], a, b);
      }
    }
  }

  // The m16n8 accumulators of two neighbouring column blocks are exactly an m16k16 A fragment.
  __device__ __forceinline__ static void ggemm(float acc[kBlockD / 8][4], const float grad[8][4], const T* sBd,
                                               int lane) {
    const int g = lane >> 2, t = lane & 3;
    const uint16_t* bd = reinterpret_cast<const uint16_t*>(sBd);
#pragma unroll
    for (int kb = 0; kb < kBlockB / 16; ++kb) {
      uint32_t a[4];
      a[0] = pack_floats<T>(grad[2 * kb][0], grad[2 * kb][1]);
      a[1] = pack_floats<T>(grad[2 * kb][2], grad[2 * kb][3]);
      a[2] = pack_floats<T>(grad[2 * kb + 1][0], grad[2 * kb + 1][1]);
      a[3] = pack_floats<T>(grad[2 * kb + 1][2], grad[2 * kb + 1][3]);
      const uint16_t* row = bd + (kb * 16 + 2 * t) * kLdd + g;
#pragma unroll
      for (int n = 0; n < kBlockD / 8; ++n) {
        uint32_t b[2];
        b[0] = pack_bits(row[n * 8], row[kLdd + n * 8]);
        b[1] = pack_bits(row[8 * kLdd + n * 8], row[9 * kLdd + n * 8]);
        mma_16bit<T>(acc[n], a, b);
      }
    }
  }
};

template <>
struct WarpMma<float> {
  static constexpr int kLds = kBlockK + 4;   // 144 bytes: conflict-free fragment loads
  static constexpr int kLdd = kBlockD + 4;

  __device__ __forceinline__ static void sgemm_stage(float acc[8][4], const float* sA, const float* sB, int warp,
                                                     int lane) {
    const int g = lane >> 2, t = lane & 3;
    const float* a_lo = sA + (warp * 16 + g) * kLds + t;
    const float* a_hi = a_lo + 8 * kLds;
#pragma unroll
    for (int k0 = 0; k0 < kBlockK; k0 += 8) {
      uint32_t a_big[4], a_small[4];
      split_tf32(a_lo[k0], a_big[0], a_small[0]);
      split_tf32(a_hi[k0], a_big[1], a_small[1]);
      split_tf32(a_lo[k0 + 4], a_big[2], a_small[2]);
      split_tf32(a_hi[k0 + 4], a_big[3], a_small[3]);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const float* bp = sB + (nt * 8 + g) * kLds + k0 + t;
        uint32_t b_big[2], b_small[2];
        split_tf32(bp[0], b_big[0], b_small[0]);
        split_tf32(bp[4], b_big[1], b_small[1]);
        mma_3xtf32(acc[nt], a_big, a_small, b_big, b_small);
      }
    }
  }

  // The k order inside each 8-column block is permuted (slot t <- column 2t, slot t+4 <- column
  // 2t+1) so that the m16n8 accumulators serve as the m16k8 A fragment; B's rows follow it.
  __device__ __forceinline__ static void ggemm(float acc[kBlockD / 8][4], const float grad[8][4], const float* sBd,
                                               int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kb = 0; kb < kBlockB / 8; ++kb) {
      uint32_t a_big[4], a_small[4];
      split_tf32(grad[kb][0], a_big[0], a_small[0]);  // (g, 2t)     -> slot (g, t)
      split_tf32(grad[kb][2], a_big[1], a_small[1]);  // (g+8, 2t)   -> slot (g+8, t)
      split_tf32(grad[kb][1], a_big[2], a_small[2]);  // (g, 2t+1)   -> slot (g, t+4)
      split_tf32(grad[kb][3], a_big[3], a_small[3]);  // (g+8, 2t+1) -> slot (g+8, t+4)
      const float* row = sBd + (kb * 8 + 2 * t) * kLdd + g;
#pragma unroll
      for (int n = 0; n < kBlockD / 8; ++n) {
        uint32_t b_big[2], b_small[2];
        split_tf32(row[n * 8], b_big[0], b_small[0]);         // k = 2t   (slot t)
        split_tf32(row[kLdd + n * 8], b_big[1], b_small[1]);  // k = 2t+1 (slot t+4)
        mma_3xtf32(acc[n], a_big, a_small, b_big, b_small);
      }
    }
  }
};

}  // namespace fastcl::cuda
