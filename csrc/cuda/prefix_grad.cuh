// The prefix gradient tile (ops lse_prefixes and pointwise_prefixes; prefixes.cuh says how the
// features are walked): per prefix, G^k in registers (lse: from the statistics; pointwise: pair_grad.cuh's
// SigLIP / MW of S^k + bias, the loss's row sums beside it), the row and column sums of G^k T^k, and
// H^k = a^k b^k G^k stored into slot k of the G blocks, turned into suffix sums before the CTA ends.
#pragma once

#include "pair_grad.cuh"  // store_pair, softplus_sigmoid
#include "prefixes.cuh"

namespace fastcl::cuda {

// Op pointwise_prefixes, keyed: a bit per pair of the tile (a0, b0) in shared memory, set when the two
// keys are equal (tile.cuh's layout for listed pairs), built once per CTA by one thread per row (each
// row's words have one writer), so that the epilogue of every prefix tests a bit instead of comparing
// 64-bit keys (held per column they made the 16-bit kernels spill). Rows and columns past the ends: 0.
template <int kThreads>
__device__ __forceinline__ void mark_keyed(ListedBits& bits, const PairParams& p, int64_t a0, int64_t b0) {
  static_assert(kBlockB == 128, "a row's bits are two 64-bit halves");
  for (int r = threadIdx.x; r < kBlockA; r += kThreads) {
    uint64_t lo = 0, hi = 0;  // columns [0, 64) and [64, 128)
    if (a0 + r < p.rows_a) {
      const int64_t key = p.keys_a[a0 + r];
      for (int j = 0; j < kBlockB && b0 + j < p.rows_b; ++j) {
        if (p.keys_b[b0 + j] != key) continue;
        if (j < 64) {
          lo |= uint64_t{1} << j;
        } else {
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

__device__ __forceinline__ bool keyed_pair(const ListedBits& bits, int row, int col) {
  return (bits[row][col / 32] >> (col % 32)) & 1u;
}

// Two neighbouring stored G values of one row, as float (the suffix sums' reads).
__device__ __forceinline__ float stored_value(float v) { return v; }
__device__ __forceinline__ float stored_value(__half v) { return __half2float(v); }
__device__ __forceinline__ float stored_value(__nv_bfloat16 v) { return __bfloat162float(v); }

// The 16-bit pointwise gradient tile runs its epilogue over the warp's rows in parts (below): its
// loss and sigmoid beside the 128 accumulators, which stay live for the next segment, spilled with
// the rows' constants and sums all live at once. ptxas finds room with two parts on sm_80 and four on
// sm_90a (each spills 16 bytes with the other's count): tests/test_cuda_host.py runs both.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kPointwiseParts16 = 4;
#else
constexpr int kPointwiseParts16 = 2;
#endif

template <typename T, GradKind kKind>
__global__ void __launch_bounds__(Warps<T>::kThreads, Warps<T>::kMinCtas)
    prefix_grad_kernel(const PrefixGradParams p) {
  using W = Warps<T>;
  constexpr int kMT = W::kMT, kNT = W::kNT;
  constexpr bool kPointwise = kKind != GradKind::kLse;
  constexpr int kRowSums = kPointwise ? 3 : 1;  // G T; pointwise also the loss and G
  constexpr int kParts = kPointwise && sizeof(T) == 2 ? kPointwiseParts16 : 1;  // the epilogue's row parts (below)
  constexpr int kPartMT = kMT / kParts;
  T* smem = dynamic_smem<T>();
  __shared__ float red_row[kRowSums][W::kN][kBlockA];  // per prefix: row sums per warp column
  __shared__ float red_col[W::kM][kBlockB];             // column sums of G T per warp row
  __shared__ uint32_t keyed_bits[kPointwise ? kBlockA : 1][kListedWords];  // pointwise: the tile's keyed pairs

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / W::kN, warp_n = warp % W::kN;
  const int g = lane >> 2, t = lane & 3;
  const int r0 = warp_m * W::kRows + g, c0 = warp_n * W::kCols + 2 * t;
  const int64_t b_tiles = cdiv(p.rows_b, kBlockB);
  const int64_t b_tile = static_cast<int64_t>(blockIdx.x) % b_tiles;
  const int64_t a_tile = static_cast<int64_t>(blockIdx.x) / b_tiles;
  const int64_t a0 = a_tile * kBlockA, b0 = b_tile * kBlockB;
  const int64_t rows_left = p.rows_a - a0;
  const int prefixes = p.prefixes;
  const bool factors = p.row_scale != nullptr;
  T* g_blocks = static_cast<T*>(p.g);
  const bool vector = (p.ldg & 1) == 0;

  const bool keyed = kPointwise && p.keys_a != nullptr;
  if constexpr (kPointwise) {
    if (keyed) mark_keyed<W::kThreads>(keyed_bits, p, a0, b0);  // read after sgemm_tile_add's barriers
  }
  float acc[kMT][kNT][4];
  zero_acc<T>(acc);

  for (int q = 0; q < prefixes; ++q) {
    sgemm_tile_add<T>(acc, p, a0, b0, segment_begin(p, q), p.seg_end[q], smem, warp_m, warp_n, lane);
    // read here, not held through the main loop beside its registers (the 16-bit pointwise kernels spilled)
    const float scale = load_scale(p);
    const float g_scale = p.g_scale != nullptr ? *p.g_scale : 1.0f;
    bool row_ok[kMT][2];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) row_ok[mt][h] = r0 + 16 * mt + 8 * h < rows_left;
    }
    T* g_q = g_blocks != nullptr ? g_blocks + q * p.g_stride : nullptr;
    // The warp's rows in kParts parts, one after another (16-bit pointwise: kPointwiseParts16, so that
    // only a part of the rows' constants and sums is live beside the 128 accumulators); each part's
    // columns read their constants again (L1) and add their sums into red_col.
#pragma unroll
    for (int part = 0; part < kParts; ++part) {
      // prefix q's row constants: the logit factor; kLse: the row term of G in base 2; pointwise: the
      // row's weight (ga, 1 when null) and bias (sa's registers)
      float rf[kPartMT][2], ga[kPartMT][2], sa[kPartMT][2], row_gs[kPartMT][2];
      float row_loss[kPointwise ? kPartMT : 1][2], row_dsum[kPointwise ? kPartMT : 1][2];
#pragma unroll
      for (int i = 0; i < kPartMT; ++i) {
        const int mt = part * kPartMT + i;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t r = row_ok[mt][h] ? a0 + r0 + 16 * mt + 8 * h : 0;
          rf[i][h] = factors ? p.row_scale[q * p.ld_row_scale + r] : 1.0f;
          if constexpr (kPointwise) {
            ga[i][h] = p.ga != nullptr ? p.ga[q * p.ld_a_terms + r] : 1.0f;
            sa[i][h] = p.bias != nullptr ? p.bias[r] : 0.0f;
            row_loss[i][h] = row_dsum[i][h] = 0.0f;
          } else {
            ga[i][h] = p.ga != nullptr ? p.ga[q * p.ld_a_terms + r] : 0.0f;
            sa[i][h] = p.ga != nullptr ? p.sa[q * p.ld_a_terms + r] * kLog2e : 0.0f;
          }
          row_gs[i][h] = 0.0f;
        }
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const int64_t col = b0 + c0 + 8 * nt;  // the thread's columns col, col + 1
        float cf[2], gb[2], sb[2], col_gs[2] = {0.0f, 0.0f};
        bool col_ok[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          col_ok[c] = col + c < p.rows_b;
          const int64_t k = col_ok[c] ? col + c : 0;
          cf[c] = factors ? p.col_scale[q * p.ld_col_scale + k] : 1.0f;
          gb[c] = !kPointwise && p.gb != nullptr ? p.gb[q * p.ld_b_terms + k] : 0.0f;
          sb[c] = !kPointwise && p.gb != nullptr ? p.sb[q * p.ld_b_terms + k] * kLog2e : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < kPartMT; ++i) {
          const int mt = part * kPartMT + i;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float out[2];
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const float ab = rf[i][h] * cf[c];
              const float s = acc[mt][nt][2 * h + c] * scale * ab;  // T^q (S^q for kLse)
              float grad = 0.0f;
              if (row_ok[mt][h] && col_ok[c]) {
                if constexpr (kPointwise) {  // pair_grad.cuh's pointwise G, of f = T^q + bias
                  const bool key = keyed && keyed_pair(keyed_bits, r0 + 16 * mt + 8 * h, c0 + 8 * nt + c);
                  const bool flip = kKind == GradKind::kSigLip && key;
                  if (!(kKind == GradKind::kMW && key)) {
                    const float f = flip ? -(s + sa[i][h]) : s + sa[i][h];
                    float loss, sigmoid;
                    softplus_sigmoid(f, loss, sigmoid);
                    grad = ga[i][h] * (flip ? -sigmoid : sigmoid);
                    row_loss[i][h] += loss;
                    row_dsum[i][h] += grad;
                  }
                } else {
                  const float s2 = s * kLog2e;
                  if (p.ga != nullptr) grad = ga[i][h] * exp2f(s2 - sa[i][h]);
                  if (p.gb != nullptr) grad += gb[c] * exp2f(s2 - sb[c]);
                }
                const float gs = grad * s;
                row_gs[i][h] += gs;
                col_gs[c] += gs;
              }
              out[c] = grad * ab * g_scale;  // H^q as stored
            }
            if (g_q != nullptr && row_ok[mt][h] && col_ok[0]) {
              const int64_t row = a0 + r0 + 16 * mt + 8 * h;
              store_pair<T>(g_q + row * p.ldg + col, out[0], out[1], col_ok[1], vector);
            }
          }
        }
#pragma unroll
        for (int c = 0; c < 2; ++c) {  // the column's sum over the part's rows: the warp's 8 groups
          float v = col_gs[c];
          v += __shfl_xor_sync(0xffffffffu, v, 4);
          v += __shfl_xor_sync(0xffffffffu, v, 8);
          v += __shfl_xor_sync(0xffffffffu, v, 16);
          if (g == 0) {  // one writer per (warp row, column) for every part
            float& slot = red_col[warp_m][c0 + 8 * nt + c];
            slot = part == 0 ? v : slot + v;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kPartMT; ++i) {
        const int mt = part * kPartMT + i;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float sums[kRowSums];
          sums[0] = row_gs[i][h];
          if constexpr (kPointwise) {
            sums[1] = row_loss[i][h];
            sums[2] = row_dsum[i][h];
          }
#pragma unroll
          for (int j = 0; j < kRowSums; ++j) {
            float v = sums[j];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            if (t == 0) red_row[j][warp_n][r0 + 16 * mt + 8 * h] = v;
          }
        }
      }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < kBlockA; r += W::kThreads) {
      if (r >= rows_left) continue;
      const int64_t at = (q * p.rows_a + a0 + r) * b_tiles + b_tile;
#pragma unroll
      for (int i = 0; i < kRowSums; ++i) {
        float v = red_row[i][0][r];
#pragma unroll
        for (int w = 1; w < W::kN; ++w) v += red_row[i][w][r];
        float* out = i == 0 ? p.row_gs : (i == 1 ? p.row_loss : p.row_dsum);
        if (out != nullptr) out[at] = v;
      }
    }
    for (int c = threadIdx.x; c < kBlockB; c += W::kThreads) {
      if (b0 + c >= p.rows_b) continue;
      float v = red_col[0][c];
#pragma unroll
      for (int w = 1; w < W::kM; ++w) v += red_col[w][c];
      p.col_gs[(q * cdiv(p.rows_a, kBlockA) + a_tile) * p.rows_b + b0 + c] = v;
    }
    __syncthreads();  // red_* are rewritten by the next prefix
  }

  // The suffix sums, descending, over the thread's own elements (its own stores: no barrier needed):
  // slot q becomes sum_{k >= q} H^k, summed in float32 from the stored values.
  if (g_blocks != nullptr && prefixes > 1) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (r0 + 16 * mt + 8 * h >= rows_left) continue;
        const int64_t row = a0 + r0 + 16 * mt + 8 * h;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          const int64_t col = b0 + c0 + 8 * nt;
          if (col >= p.rows_b) continue;
          const bool both = col + 1 < p.rows_b;
          const T* last = g_blocks + (prefixes - 1) * p.g_stride + row * p.ldg + col;
          float lo = stored_value(last[0]), hi = both ? stored_value(last[1]) : 0.0f;
          for (int q = prefixes - 2; q >= 0; --q) {
            T* at = g_blocks + q * p.g_stride + row * p.ldg + col;
            lo += stored_value(at[0]);
            if (both) hi += stored_value(at[1]);
            store_pair<T>(at, lo, hi, both, vector);
          }
        }
      }
    }
  }
}

template <typename T, GradKind kKind>
cudaError_t run_prefix_grad(const PrefixGradParams& p, dim3 grid, cudaStream_t stream) {
  const cudaError_t err = allow_tile_smem<T>(prefix_grad_kernel<T, kKind>);
  if (err != cudaSuccess) return err;
  FASTCL_LAUNCH(grid, Warps<T>::kThreads, Smem<T>::kTileBytes, stream, prefix_grad_kernel<T, kKind>)(p);
  return cudaGetLastError();
}

}  // namespace fastcl::cuda
