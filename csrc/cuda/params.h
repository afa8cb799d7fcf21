// Parameters of the fastcl CUDA kernels: tile constants and plain structs of pointers, sizes and
// strides (no torch). python/fastcl/backend/cuda/plan.py mirrors the constants for the performance
// model; tests/test_cuda_plan.py parses this file to keep the two equal.
//
// Every kernel works on S = scale * A @ B.T for a row-major A [rows_a, d] (the "A side", whose
// rows a CTA owns) and B [rows_b, d]: the engine's (x, y), or one block of them (launch.cu offsets
// the pointers).
#pragma once

#include <cstdint>

namespace fastcl::cuda {

// Tile shape shared by every kernel: a CTA computes a 128 x 128 tile of S, its warps one block of
// it each (tile.cuh Warps): 16-bit inputs 2 x 2 warps of 64 x 64, 8 ldmatrix.x4 per 32 mma.sync per
// 16 features, which keeps shared memory below the tensor cores' rate; float32 (3xTF32 holds a
// correction accumulator beside each: 64 x 64 would take 256 registers for the two) 4 x 2 warps of
// 32 x 64.
constexpr int kBlockA = 128;     // rows of A per CTA (tile rows)
constexpr int kBlockB = 128;     // rows of B per tile (tile columns)
constexpr int kBlockK = 32;      // features per pipeline stage
constexpr int kWarps16 = 4;      // warps per CTA, half and bfloat16
constexpr int kWarps32 = 8;      // warps per CTA, float

// Blocks of S (plan.h): edges are multiples of this, so only the matrix's ends cut tiles.
constexpr int64_t kBlockQuantum = 128;
// Splitting B's tiles over more CTAs fills the GPU when a block has few row tiles, and fills the
// last wave when it has many (plan.h split_b). The split depends on the shape only (never on the
// device), so results are the same bits on every GPU.
constexpr int64_t kTargetCtas = 264;  // a wave: 2 CTAs (the 16-bit tiles' occupancy) x 132 SMs (H100 / H200 SXM)
constexpr int64_t kMaxSplits = 32;
// float16 G is stored times 2^k, k chosen so that max |G| * 2^k <= 2^kGradScaleLog2 (plan.h):
// G of a mean loss is ~1 / N^2, far below float16's smallest subnormal (6e-8) unscaled; 2^14
// leaves 4x headroom below float16's largest finite value for rounding in exp(S - lse).
constexpr int kGradScaleLog2 = 14;
constexpr int kDefaultWorkspaceMb = 256;  // FASTCL_WORKSPACE_MB when unset (as the Triton engine)
// Op lse_prefixes: prefixes one launch reads off its tiles (their row statistics and factors live
// in dynamic shared memory, 3 KiB per prefix); the launchers run larger K in groups of this many.
constexpr int kMaxPrefixes = 16;

struct PairParams {
  const void* a;                 // [rows_a, lda] of T; row stride lda (elements), features contiguous
  const void* b;                 // [rows_b, ldb] of T
  int64_t rows_a, rows_b, d, lda, ldb;
  const float* scale_ptr;        // device scalar, or nullptr: use scale
  float scale;
  const int64_t* keys_a;         // [rows_a] or nullptr (then keys_b is ignored)
  const int64_t* keys_b;         // [rows_b]
  // Op lse_exclude (kLse kernels only): A row r's listed columns listed[r * listed_width + e], -1
  // padded, in the list's numbering, where B's row 0 is column listed_col0 (launch.cu's block offset);
  // those pairs leave every statistic and gradient, as keyed ones do. nullptr: no list.
  const int64_t* listed;         // [rows_a, listed_width] or nullptr
  int64_t listed_width, listed_col0;
  // a, b, lda, ldb and d are whole 16-byte chunks (the launchers check it; plan.h aligned_features)
  int64_t tiles_per_split;       // B tiles visited by one CTA (forward: blockIdx.y = split)
};

// Forward log-sum-exp of one block. Online (shift, sum) partials in base 2 (tile.cuh), merged later
// in a fixed order: row partials [splits, rows_a] (one per B range), column partials
// [cdiv(rows_a, kBlockA), rows_b].
struct LseForwardParams : PairParams {
  bool rows, cols;
  float* row_shift;  // partial shifts (finite: an infinite maximum shifts by 0)
  float* row_sum;    // partial sums of 2^(S log2(e) - shift)
  float* col_shift;
  float* col_sum;
};

enum class GradKind : int { kLse = 0, kSigLip = 1, kMW = 2 };

// The gradient tile kernel: G = dLoss/dS of one block, one kBlockA x kBlockB tile per CTA, where
//   kLse:     G_ab = ga_a exp(S_ab - sa_a) + gb_b exp(S_ab - sb_b)  (either term absent if its g is null)
//   kSigLip / kMW: G = w_a * d loss(S + bias_a) / dS (see pair_grad.cuh).
struct GradParams : PairParams {
  const float* ga;  const float* sa;   // [rows_a] or nullptr
  const float* gb;  const float* sb;   // [rows_b] or nullptr
  const float* bias;                   // [rows_a] or nullptr (pointwise)
  const float* weight;                 // [rows_a] or nullptr = 1 (pointwise)
  const float* g_scale;                // device scalar multiplying G as stored (a power of two), or nullptr = 1
  void* g;                             // [rows_a, ldg] of T (float for float inputs), or nullptr
  int64_t ldg;
  float* row_loss;                     // [rows_a, column tiles] pointwise loss sums per tile, or nullptr
  float* row_dsum;                     // [rows_a, column tiles] row sums of G (unscaled) per tile, or nullptr
};

// Op lse_prefixes (prefixes.cuh): K nested feature prefixes of one block, read off one pass over the
// features. Segment q is features [q ? seg_end[q - 1] : 0, seg_end[q]) of A and B (launch.cu lays the
// segments out on 16-byte chunks, so every segment starts on one); S^q = scale a^q_i b^q_j P^q with
// P^q the dot product over segments 0..q. The factors are float32 [K, rows] (row_scale: A's rows,
// col_scale: B's, both or neither), already offset to the block, with row strides.
struct PrefixParams : PairParams {
  int prefixes;                    // K of this launch, 1..kMaxPrefixes
  int32_t seg_end[kMaxPrefixes];   // ends of the segments, in elements, increasing; seg_end[K - 1] <= d
  const float* row_scale;          // [K, ld_row_scale] or nullptr (no factors)
  const float* col_scale;          // [K, ld_col_scale]
  int64_t ld_row_scale, ld_col_scale;
};

// Forward: per prefix q, row partials [K][splits][rows_a] and column partials
// [K][cdiv(rows_a, kBlockA)][rows_b] (prefix q's at q * row_stride, q * col_stride).
struct LsePrefixForwardParams : PrefixParams {
  bool rows, cols;
  float *row_shift, *row_sum, *col_shift, *col_sum;
  int64_t row_stride, col_stride;
};

// Gradient tiles (one CTA per tile of one block), per prefix q with T^q = scale a^q b^q P^q:
//   kLse:     G^q = ga^q_a exp(T^q - sa^q_a) + gb^q_b exp(T^q - sb^q_b) (ga, sa, gb, sb [K, ld] with their
//             strides, a term absent if its g is null);
//   kSigLip / kMW (op pointwise_prefixes): f = T^q + bias_a as pair_grad.cuh's, loss softplus(f),
//             G^q = ga^q_a d loss / dS (ga: the per-prefix row weight, nullptr = 1); keys as there.
// Row sums of G^q T^q per column tile into row_gs [K][rows_a][column tiles], column sums per row tile
// into col_gs [K][row tiles][rows_b] (pointwise: also the loss and G^q row sums into row_loss and
// row_dsum, laid out as row_gs); H^q = a^q b^q G^q times g_scale into g + q g_stride ([rows_a, ldg] of
// T), turned into the suffix sums sum_{k >= q} H^k before the CTA ends (g nullptr: no H at all).
struct PrefixGradParams : PrefixParams {
  const float *ga, *sa, *gb, *sb;
  int64_t ld_a_terms, ld_b_terms;      // row strides of [K, .] ga / sa and gb / sb
  const float* bias;                   // [rows_a] or nullptr (pointwise)
  float* row_loss;                     // [K][rows_a][column tiles] (pointwise)
  float* row_dsum;                     // [K][rows_a][column tiles] (pointwise) or nullptr
  const float* g_scale;                // device scalar (a power of two) or nullptr = 1
  void* g;                             // K blocks [rows_a, ldg] of T (float for float inputs), g_stride apart
  int64_t ldg, g_stride;
  float* row_gs;                       // [K][rows_a][column tiles]
  float* col_gs;                       // [K][row tiles][rows_b]
};

}  // namespace fastcl::cuda
