// Host-side arithmetic of the CUDA engine: the blocks S is cut into (the Triton engine's rule,
// fastcl/backend/triton/plan.py `blocks`), how many CTAs share a block's B tiles, the workspace that takes,
// feature padding and float16 G's power-of-two scale. Plain C++ (no CUDA runtime, no torch), so that
// tests/test_cuda_plan.py compiles it with the host compiler and checks every formula against the
// Python mirror (fastcl/backend/cuda/plan.py) that the performance model reads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "params.h"

#ifdef __CUDACC__
#define FASTCL_HD __host__ __device__
#else
#define FASTCL_HD
#endif

namespace fastcl::cuda {

FASTCL_HD constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

namespace plan {

struct Block {
  int64_t rows, cols;  // R x C pairs of S per block
};

// (R, C): about `elements` pairs at most (never below quantum x quantum), edges multiples of
// quantum, square unless a whole side fits (square minimises the gradients' read-modify-write).
inline Block blocks(int64_t m, int64_t n, int64_t elements, int64_t quantum = kBlockQuantum) {
  m = std::max<int64_t>(m, 1);
  n = std::max<int64_t>(n, 1);
  elements = std::max(elements, quantum * quantum);
  if (m * n <= elements) return {m, n};
  int64_t root = static_cast<int64_t>(std::sqrt(static_cast<double>(elements)));
  while (root * root > elements) --root;
  while ((root + 1) * (root + 1) <= elements) ++root;
  const int64_t side = std::max(quantum, root / quantum * quantum);
  if (n <= side) return {std::min(m, std::max(quantum, elements / n / quantum * quantum)), n};
  if (m <= side) return {m, std::min(n, std::max(quantum, elements / m / quantum * quantum))};
  return {side, side};
}

// FASTCL_WORKSPACE_MB's text -> bytes (nullptr or blank: the default); -1 when it is not a
// positive finite number of MiB (fastcl.backend.triton.plan.workspace_budget's rule).
inline int64_t workspace_budget(const char* raw) {
  if (raw == nullptr) return static_cast<int64_t>(kDefaultWorkspaceMb) << 20;
  const char* begin = raw;
  while (*begin == ' ' || *begin == '\t' || *begin == '\n') ++begin;
  const char* end = begin;
  while (*end != '\0') ++end;
  while (end > begin && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n')) --end;
  if (end == begin) return static_cast<int64_t>(kDefaultWorkspaceMb) << 20;
  char* stop = nullptr;
  const double mib = std::strtod(begin, &stop);
  if (stop != end || !(mib > 0.0) || std::isinf(mib)) return -1;
  return static_cast<int64_t>(mib * static_cast<double>(1 << 20));
}

// The forward's block: its partials, (shift, sum) floats for each row per kBlockB columns and each
// column per kBlockA rows, fit the budget: 2 directions x 8 bytes per kBlockA pairs.
// Op lse_prefixes: a launch's `prefixes` (at most kMaxPrefixes) partials each, so the budget is divided by them.
inline Block forward_block(int64_t m, int64_t n, int64_t budget, int64_t prefixes = 1) {
  return blocks(m, n, budget * kBlockA / (2 * 2 * static_cast<int64_t>(sizeof(float)) * prefixes));
}

// The backward's block: one G block of R x C elements of g_bytes fits the budget (op lse_prefixes:
// one per prefix of a launch).
inline Block gradient_block(int64_t m, int64_t n, int64_t g_bytes, int64_t budget, int64_t prefixes = 1) {
  return blocks(m, n, budget / (g_bytes * prefixes));
}

// Op lse_prefixes: the prefixes one launch reads off its tiles (the launchers run K in groups of this many).
inline int64_t prefix_group(int64_t prefixes) { return std::min<int64_t>(prefixes, kMaxPrefixes); }

struct Split {
  int64_t per, count;  // B tiles per split, number of splits
};

// Splits of a forward block's B tiles over ctas row tiles: the fewest whose waves of kTargetCtas
// CTAs (each visiting `per` tiles) are at least 90% full, else the fullest. A block of 362 row
// tiles by 362 column tiles (N = 65536 at the default budget) runs 2 splits: 724 CTAs in 3 waves,
// 91% full, where one split left 2 waves 69% full. Integer arithmetic only: the Python mirror
// decides alike. Depends on the shape only, never on the device.
inline Split split_b(int64_t ctas, int64_t b_tiles) {
  if (b_tiles <= 0) return {1, 1};
  ctas = std::max<int64_t>(ctas, 1);
  Split best{0, 0};
  int64_t best_cost = -1;
  for (int64_t want = 1; want <= std::min(b_tiles, kMaxSplits); ++want) {
    const int64_t per = cdiv(b_tiles, want);
    const int64_t count = cdiv(b_tiles, per);
    const int64_t cost = cdiv(ctas * count, kTargetCtas) * per;  // waves x each CTA's tile visits
    if (10 * ctas * b_tiles >= 9 * kTargetCtas * cost) return {per, count};
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = {per, count};
    }
  }
  return best;
}

// Features as the kernels see them: d rounded up to whole 16-byte chunks (the host pads a copy when
// it is not, or when the base pointer is not 16-byte aligned), so every tile load is a cp.async.
inline int64_t aligned_features(int64_t d, int64_t elem_bytes) {
  const int64_t chunk = 16 / elem_bytes;
  return cdiv(d, chunk) * chunk;
}

// Op lse_prefixes: where prefix q's features end in the kernels' copy, whose segments
// [d_{q-1}, d_q) each start on a 16-byte chunk (the last one's padding is zeros, never the next
// features): ends[q] = sum over k <= q of aligned_features(d_k - d_{k-1}). Equal to dims when every
// d_q is whole chunks (then the caller's rows serve as they are, if aligned).
inline void prefix_ends(const int64_t* dims, int64_t prefixes, int64_t elem_bytes, int64_t* ends) {
  int64_t at = 0, prev = 0;
  for (int64_t q = 0; q < prefixes; ++q) {
    at += aligned_features(dims[q] - prev, elem_bytes);
    prev = dims[q];
    ends[q] = at;
  }
}

// float16 G is stored times 2^k: the largest k with gmax * 2^k <= 2^kGradScaleLog2, where gmax
// bounds |G| (the upstream gradients' largest magnitudes: exp(S - lse) <= 1, sigmoid <= 1);
// k = 0 when gmax is 0 or not finite (G is then 0, or NaN anyway), clamped so 2^k and 2^-k are
// normal floats.
FASTCL_HD inline int grad_scale_exponent(float gmax) {
  if (!(gmax > 0.0f) || gmax - gmax != 0.0f) return 0;  // 0, negative, NaN or inf
  int e = 0;
  const float f = frexpf(gmax, &e);  // gmax = f 2^e, f in [0.5, 1)
  const int ceil_log2 = f == 0.5f ? e - 1 : e;
  const int k = kGradScaleLog2 - ceil_log2;
  return k < -126 ? -126 : (k > 126 ? 126 : k);
}

// Bump allocator over a workspace (256-byte aligned pieces); with a null base it only counts.
class Carve {
 public:
  explicit Carve(void* base) : base_(static_cast<char*>(base)) {}
  float* take(int64_t count) {
    char* at = base_ == nullptr ? nullptr : base_ + used_;
    used_ += (static_cast<size_t>(std::max<int64_t>(count, 0)) * sizeof(float) + 255) / 256 * 256;
    return reinterpret_cast<float*>(at);
  }
  size_t bytes() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

// The forward's workspace: running (shift, sum) per row and column [m], [n], and one block's
// partials, sized for the largest of the (at most four) block shapes the ends of S give.
// Op lse_prefixes (prefixes = K): a running state per prefix ([K][m], [K][n]) and partials for a
// launch's prefix_group(K) prefixes, each prefix's row_parts / col_parts floats apart.
struct ForwardLayout {
  Block block;
  float *run_row_shift, *run_row_sum, *run_col_shift, *run_col_sum;
  float *row_shift, *row_sum, *col_shift, *col_sum;
  int64_t row_parts, col_parts;
  size_t bytes;
};

inline ForwardLayout forward_layout(int64_t m, int64_t n, bool rows, bool cols, int64_t budget, void* base,
                                    int64_t prefixes = 1) {
  ForwardLayout l{};
  const int64_t group = prefix_group(prefixes);
  l.block = forward_block(m, n, budget, group);
  int64_t row_parts = 0, col_parts = 0;
  for (const int64_t r : {l.block.rows, m % l.block.rows}) {
    for (const int64_t c : {l.block.cols, n % l.block.cols}) {
      if (r == 0 || c == 0) continue;
      row_parts = std::max(row_parts, split_b(cdiv(r, kBlockA), cdiv(c, kBlockB)).count * r);
      col_parts = std::max(col_parts, cdiv(r, kBlockA) * c);
    }
  }
  l.row_parts = row_parts;
  l.col_parts = col_parts;
  Carve carve(base);
  if (rows) {
    l.run_row_shift = carve.take(prefixes * m);
    l.run_row_sum = carve.take(prefixes * m);
    l.row_shift = carve.take(group * row_parts);
    l.row_sum = carve.take(group * row_parts);
  }
  if (cols) {
    l.run_col_shift = carve.take(prefixes * n);
    l.run_col_sum = carve.take(prefixes * n);
    l.col_shift = carve.take(group * col_parts);
    l.col_sum = carve.take(group * col_parts);
  }
  l.bytes = carve.bytes();
  return l;
}

}  // namespace plan
}  // namespace fastcl::cuda
