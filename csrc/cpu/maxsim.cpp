// Late interaction (MaxSim) scores and their gradients, never holding the [B, N, Lq, Ld] token
// similarities: s_ij = sum_{a real} max_{t real} <q_ia, d_jt>.
//
// A tile is a block of queries against a block of documents: one GEMM of their flattened tokens,
// [bq*Lq, D] x [D, bn*Ld], into a thread-local buffer, with padding document tokens set to -inf.
// Forward reduces each (query token, document) row segment to its maximum and sums those into s.
// Backward recomputes the tile, finds each segment's first maximal token again (the tie rule:
// lowest token index) and routes g_ij there: dq_ia += g_ij d_jt*, dd_jt* += g_ij q_ia. Tiles run in
// grid.h's schedule, in which no two concurrent tasks share a query block or a document block, so
// both updates are race-free and happen in a fixed order: bitwise deterministic for any thread count.
#include "cpu/kernels.h"

#include "cpu/grid.h"
#include "cpu/tile_math.h"

#include <ATen/cpu/vec/functional.h>

#include <cmath>

namespace fastcl::cpu {

namespace {

// Tile edges in queries and documents: about 256 query tokens x 512 document tokens (512 KiB in
// float32, cache-resident while it is reduced), from the shape only (never the thread count).
Grid maxsim_grid(int64_t b, int64_t n, int64_t lq, int64_t ld) {
  Grid g(b, n);
  g.br = std::clamp<int64_t>(256 / std::max<int64_t>(lq, 1), 1, std::max<int64_t>(b, 1));
  g.bc = std::clamp<int64_t>(512 / std::max<int64_t>(ld, 1), 1, std::max<int64_t>(n, 1));
  g.row_blocks = (b + g.br - 1) / g.br;
  g.col_blocks = (n + g.bc - 1) / g.bc;
  return g;
}

// The token-similarity tile of queries [r0, r1) x documents [c0, c1): [(r1-r0)*Lq, (c1-c0)*Ld].
template <typename T>
at::Tensor similarity_tile(const MaxSimArgs& a, const Tile& tile, int64_t lq, int64_t ld) {
  const int64_t dim = a.q.size(2);
  auto qf = a.q.view({-1, dim}).narrow(0, tile.r0 * lq, tile.rows() * lq);
  auto df = a.d.view({-1, dim}).narrow(0, tile.c0 * ld, tile.cols() * ld);
  auto sim = at::mm(qf, df.t());
  if (a.d_mask != nullptr) {
    T* s = sim.template data_ptr<T>();
    const int64_t cols = tile.cols() * ld;
    for (int64_t c = 0; c < cols; ++c) {
      if (a.d_mask[tile.c0 * ld + c]) continue;
      for (int64_t r = 0; r < tile.rows() * lq; ++r) s[r * cols + c] = -kInf<T>;
    }
  }
  return sim;
}

template <typename T>
T segment_max(const T* row, int64_t ld) {
  return at::vec::reduce_all<T>([](Vec<T> x, Vec<T> y) { return at::vec::maximum(x, y); }, row, ld);
}

template <typename T>
void forward_impl(const MaxSimArgs& a, at::Tensor& s) {
  const int64_t b = a.q.size(0), lq = a.q.size(1), n = a.d.size(0), ld = a.d.size(1);
  const Grid grid = maxsim_grid(b, n, lq, ld);
  T* out = s.template data_ptr<T>();
  at::parallel_for(0, grid.row_blocks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // see for_each_tile in grid.h
    for (int64_t rb = begin; rb < end; ++rb) {
      for (int64_t cb = 0; cb < grid.col_blocks; ++cb) {
        const Tile tile{rb * grid.br, std::min(b, (rb + 1) * grid.br), cb * grid.bc, std::min(n, (cb + 1) * grid.bc)};
        auto sim = similarity_tile<T>(a, tile, lq, ld);
        const T* sp = sim.template data_ptr<T>();
        const int64_t cols = tile.cols() * ld;
        for (int64_t i = tile.r0; i < tile.r1; ++i) {
          for (int64_t j = tile.c0; j < tile.c1; ++j) {
            T total = 0;
            for (int64_t u = 0; u < lq; ++u) {
              if (a.q_mask != nullptr && !a.q_mask[i * lq + u]) continue;
              total += segment_max(sp + ((i - tile.r0) * lq + u) * cols + (j - tile.c0) * ld, ld);
            }
            out[i * n + j] = total;
          }
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const MaxSimArgs& a, const at::Tensor& g, at::Tensor& dq, at::Tensor& dd, bool need_q,
                   bool need_d) {
  const int64_t b = a.q.size(0), lq = a.q.size(1), n = a.d.size(0), ld = a.d.size(1), dim = a.q.size(2);
  const T* gp = g.template data_ptr<T>();
  const T* qp = a.q.template data_ptr<T>();
  const T* dp = a.d.template data_ptr<T>();
  T* dqp = need_q ? dq.template data_ptr<T>() : nullptr;
  T* ddp = need_d ? dd.template data_ptr<T>() : nullptr;
  for_each_tile(maxsim_grid(b, n, lq, ld), [&](const Tile& tile) {
    auto sim = similarity_tile<T>(a, tile, lq, ld);
    const T* sp = sim.template data_ptr<T>();
    const int64_t cols = tile.cols() * ld;
    for (int64_t i = tile.r0; i < tile.r1; ++i) {
      for (int64_t j = tile.c0; j < tile.c1; ++j) {
        const T gij = gp[i * n + j];
        if (gij == T(0)) continue;  // nothing to route (a softmax weight that underflowed, a zero upstream)
        for (int64_t u = 0; u < lq; ++u) {
          if (a.q_mask != nullptr && !a.q_mask[i * lq + u]) continue;
          const T* row = sp + ((i - tile.r0) * lq + u) * cols + (j - tile.c0) * ld;
          const T best = segment_max(row, ld);
          // No winner for an all-padding document (-inf) or NaN similarities (the loss is NaN anyway).
          if (std::isnan(best) || best == -kInf<T>) continue;
          int64_t t = 0;
          while (row[t] != best) ++t;  // the first maximal token: the tie rule
          const T* qrow = qp + (i * lq + u) * dim;
          const T* drow = dp + (j * ld + t) * dim;
          if (need_q) {
            T* out = dqp + (i * lq + u) * dim;
            for (int64_t k = 0; k < dim; ++k) out[k] += gij * drow[k];
          }
          if (need_d) {
            T* out = ddp + (j * ld + t) * dim;
            for (int64_t k = 0; k < dim; ++k) out[k] += gij * qrow[k];
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor maxsim_forward(const MaxSimArgs& a) {
  auto s = at::empty({a.q.size(0), a.d.size(0)}, a.q.options());
  AT_DISPATCH_FLOATING_TYPES(a.q.scalar_type(), "fastcl_maxsim_forward", [&] { forward_impl<scalar_t>(a, s); });
  return s;
}

std::tuple<at::Tensor, at::Tensor> maxsim_backward(const MaxSimArgs& a, const at::Tensor& g, bool need_q,
                                                   bool need_d) {
  auto dq = need_q ? at::zeros_like(a.q) : at::empty({0}, a.q.options());
  auto dd = need_d ? at::zeros_like(a.d) : at::empty({0}, a.d.options());
  if (need_q || need_d) {
    AT_DISPATCH_FLOATING_TYPES(a.q.scalar_type(), "fastcl_maxsim_backward",
                               [&] { backward_impl<scalar_t>(a, g, dq, dd, need_q, need_d); });
  }
  return {dq, dd};
}

}  // namespace fastcl::cpu
