// The tile schedule shared by every CPU kernel.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cstdint>

namespace fastcl::cpu {

// Block edge for a dimension of size n. It depends on the shape only, never on the thread count,
// so every accumulation below happens in the same order whatever the thread count. 256 x 256 fp32
// tiles (256 KiB) stay in L2 while they are reduced and fed back into the gradient GEMMs; small
// problems get smaller blocks so that there are still several tasks to share out.
inline int64_t block_edge(int64_t n) { return std::clamp<int64_t>((n + 15) / 16, 16, 256); }

struct Tile {
  int64_t r0, r1, c0, c1;
  int64_t rows() const { return r1 - r0; }
  int64_t cols() const { return c1 - c0; }
};

struct Grid {
  int64_t m, n, br, bc, row_blocks, col_blocks;
  Grid(int64_t m_, int64_t n_)
      : m(m_), n(n_), br(block_edge(m_)), bc(block_edge(n_)),
        row_blocks((m_ + br - 1) / br), col_blocks((n_ + bc - 1) / bc) {}
};

// Visit every tile once. With R row blocks and C column blocks (say R <= C), step t runs tasks
// k = 0..R-1 in parallel, task k on tile (k, (k + t) mod C); for R > C the roles swap. Within a step
// no two tasks share a row block or a column block, so every row statistic, column statistic, dX
// row and dY row is updated by one task at a time and in the order of t: race-free and bitwise
// deterministic for any thread count, with no per-thread partial buffers to merge.
template <class F>
void for_each_tile(const Grid& g, const F& visit) {
  const bool by_rows = g.row_blocks <= g.col_blocks;
  const int64_t tasks = std::min(g.row_blocks, g.col_blocks);
  const int64_t steps = std::max(g.row_blocks, g.col_blocks);
  for (int64_t t = 0; t < steps; ++t) {
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the caller's dispatch state: without this guard the tile
      // GEMMs would go through autograd there and record a graph that keeps every tile alive.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t k = begin; k < end; ++k) {
        const int64_t i = by_rows ? k : (k + t) % g.row_blocks;
        const int64_t j = by_rows ? (k + t) % g.col_blocks : k;
        visit(Tile{i * g.br, std::min(g.m, (i + 1) * g.br), j * g.bc, std::min(g.n, (j + 1) * g.bc)});
      }
    });
  }
}

// Visit the tiles (i, j), i <= j, of a square grid of B blocks (S symmetric: z @ z.T), each once.
// Round-robin tournament order: each step pairs every block with at most one other (or itself),
// so no two tasks of a step touch the same rows: B - 1 (or B) rounds of pairs, then one round of
// diagonal tiles. As above, every per-row update happens in a fixed order for any thread count.
template <class F>
void for_each_upper_tile(const Grid& g, const F& visit) {
  const int64_t blocks = g.row_blocks;
  const int64_t players = blocks + (blocks % 2);  // one "bye" player when B is odd
  auto tile = [&](int64_t i, int64_t j) {
    return Tile{i * g.br, std::min(g.m, (i + 1) * g.br), j * g.bc, std::min(g.n, (j + 1) * g.bc)};
  };
  for (int64_t round = 0; round < players - 1; ++round) {
    at::parallel_for(0, players / 2, 1, [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // see for_each_tile
      for (int64_t k = begin; k < end; ++k) {
        // circle method: player players-1 stays, the others rotate by one each round
        const int64_t a = k == 0 ? players - 1 : (round + k) % (players - 1);
        const int64_t b = (round - k + players - 1) % (players - 1);
        if (a >= blocks || b >= blocks) continue;  // paired with the bye
        visit(tile(std::min(a, b), std::max(a, b)));
      }
    });
  }
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = begin; i < end; ++i) visit(tile(i, i));
  });
}

}  // namespace fastcl::cpu
