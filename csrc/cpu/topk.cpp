// Streaming top-k of S = scale * x @ y.T per row: the k largest entries of every row and their
// columns, without ever holding more than one tile of S per thread.
//
// Each task owns a block of rows and walks the column tiles left to right: a tile GEMM into a
// thread-local buffer, then every entry is offered to its row's running list of the k best so far
// (kept sorted). After the first few tiles almost every entry loses to the row's current k-th
// value on one comparison, so the selection costs next to nothing beside the GEMM. Rows belong to
// one task each: no merging, results identical for any thread count.
#include "cpu/kernels.h"

#include "cpu/grid.h"
#include "cpu/tile_math.h"

#include <cmath>
#include <limits>
#include <vector>

namespace fastcl::cpu {

namespace {

// The order of the result: larger values first, NaN above everything (as torch.sort), equal
// values by the lower column index.
template <typename T>
inline bool ranks_before(T a, int64_t col_a, T b, int64_t col_b) {
  const bool nan_a = std::isnan(a), nan_b = std::isnan(b);
  if (nan_a != nan_b) return nan_a;
  if (!nan_a && a != b) return a > b;
  return col_a < col_b;
}

// One row's running list of its best entries so far, sorted by ranks_before.
template <typename T>
struct RowList {
  T* values;
  int64_t* cols;
  int64_t filled;
  int64_t k;

  // Whether (v, col) can enter the list; v < worst is the common, cheap rejection (false for NaN).
  bool may_enter(T v) const { return filled < k || !(v < values[k - 1]); }

  void offer(T v, int64_t col) {
    if (filled == k && !ranks_before(v, col, values[k - 1], cols[k - 1])) return;
    int64_t p = filled < k ? filled++ : k - 1;
    for (; p > 0 && ranks_before(v, col, values[p - 1], cols[p - 1]); --p) {
      values[p] = values[p - 1];
      cols[p] = cols[p - 1];
    }
    values[p] = v;
    cols[p] = col;
  }
};

template <typename T>
void topk_impl(const TopkArgs& a, at::Tensor& values, at::Tensor& indices) {
  const int64_t m = a.x.size(0), n = a.y.size(0), k = a.k;
  T* out_values = values.template data_ptr<T>();
  int64_t* out_cols = indices.template data_ptr<int64_t>();
  const Grid grid(m, n);
  at::parallel_for(0, grid.row_blocks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // see for_each_tile in grid.h
    auto buffer = at::empty({grid.br * grid.bc}, a.x.options());
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * grid.br, r1 = std::min(m, r0 + grid.br);
      std::vector<RowList<T>> lists;
      for (int64_t i = r0; i < r1; ++i) lists.push_back({out_values + i * k, out_cols + i * k, 0, k});
      for (int64_t c0 = 0; c0 < n; c0 += grid.bc) {
        const int64_t c1 = std::min(n, c0 + grid.bc), cols = c1 - c0;
        auto tile = buffer.narrow(0, 0, (r1 - r0) * cols).view({r1 - r0, cols});  // contiguous
        tile_logits(tile, a.x, a.y, a.scale, r0, c0);
        const T* s = tile.template data_ptr<T>();
        for (int64_t i = r0; i < r1; ++i) {
          RowList<T>& list = lists[i - r0];
          const T* row = s + (i - r0) * cols;
          for (int64_t j = c0; j < c1; ++j) {
            const T v = row[j - c0];
            if (!list.may_enter(v)) continue;
            // Exclusions are checked only for the few entries that pass the cheap test.
            if (a.exclude_diagonal && i == j) continue;
            if (a.row_keys != nullptr && a.row_keys[i] == a.col_keys[j]) continue;
            list.offer(v, j);
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk(const TopkArgs& a) {
  const int64_t m = a.x.size(0);
  // Slots a row cannot fill keep -inf and column -1; the caller has checked that every row has
  // at least k eligible columns, so none is left.
  auto values = at::full({m, a.k}, -std::numeric_limits<double>::infinity(), a.x.options());
  auto indices = at::full({m, a.k}, -1, a.x.options().dtype(at::kLong));
  if (a.k > 0 && a.y.size(0) > 0) {
    AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fastcl_topk", [&] { topk_impl<scalar_t>(a, values, indices); });
  }
  return {values, indices};
}

}  // namespace fastcl::cpu
