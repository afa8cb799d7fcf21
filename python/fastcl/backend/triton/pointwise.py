"""Sums of a pointwise loss of S = scale * x @ y.T + row_bias (SigLIP, MW) and its gradients, in Triton.

Per pair, with f the loss's argument:
  kind 0, SigLIP: keyed pairs are positives (z = +1): f = -S; others f = S. Loss softplus(f),
                  d loss / dS = -sigmoid(f) on positives, sigmoid(f) otherwise.
  kind 1, MW:     keyed pairs (the targets) are excluded (loss 0, gradient 0); others f = S.
D = d loss / dS, scaled per row by g_row when it is given.

As the lse backward (lse.py): S in blocks that bound the workspace, one program per tile. Each
program forms its S tile once and writes its rows' partial loss sums (and sums of D) into
``[R, C / BLOCK_B]`` partials, summed by the host in a fixed order; with ``want_grads`` it also
writes its tile of D into the block's G buffer, and the two GEMMs of ``gemm.py`` add D @ y and
D.T @ x. The loss alone is one S GEMM (2 M N D flops); with gradients three, the floor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import gemm, plan, tiles

_TILES = tiles.tile_configs("pointwise")


# col0 and col_end specialised for G's 16-byte stores, as lse._gradient_kernel's (which says why).
@triton.autotune(configs=_TILES, key=["D"], prune_configs_by={"early_config_prune": tiles.tile_pruner("pointwise")})
@triton.jit(do_not_specialize=["row0", "row_end", "kind", "has_keys", "grads"])
def _pointwise_kernel(a_ptr, b_ptr, consts_ptr, a_keys, b_keys, bias_ptr, weight_ptr, loss_part, dsum_part, g_ptr,
                      row0, row_end, col0, col_end, D, kind, has_keys, grads, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Tile (i, j) of the block: per row, the sum of its loss (and with ``grads`` of D) into
    ``*_part[row - row0, j]``; with ``grads``, D into g_ptr as the lse gradient kernel does.
    The flags are run-time values, as in lse.py.
    consts = (scale * log2 e, ln 2); bias is the row bias times log2 e: the tile holds base-2
    arguments t = f log2 e. The row bias and weight are always read (zeros / ones when absent):
    two vector loads per tile cost less than doubling the kernel's specialisations twice over."""
    i, j, tiles_b = tiles.tile_of(row_end - row0, col_end - col0, BLOCK_A, BLOCK_B)
    offs_a = row0 + i * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = col0 + j * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_a, mask_b = offs_a < row_end, offs_b < col_end
    scale = tl.load(consts_ptr)
    ln2 = tl.load(consts_ptr + 1)
    t = tiles.logits_tile(a_ptr, b_ptr, offs_a, offs_b, mask_a, mask_b, D, scale, BLOCK_A, BLOCK_B, BLOCK_D,
                          PRECISION)
    t += tl.load(bias_ptr + offs_a, mask=mask_a, other=0.0)[:, None]
    # Keyed pairs: SigLIP's positives (t -> -t), MW's excluded targets (t -> -inf).
    positive = tl.zeros((BLOCK_A, BLOCK_B), tl.int1)
    if has_keys:
        keyed = tiles.keyed_pairs(a_keys, b_keys, offs_a, mask_a, offs_b, mask_b)
        positive = keyed & (kind == 0)
        t = tl.where(positive, -t, tl.where(keyed & (kind != 0), float("-inf"), t))
    # Outside the matrix t = -inf: softplus and sigmoid are 0 there.
    mask = mask_a[:, None] & mask_b[None, :]
    t = tl.where(mask, t, float("-inf"))
    loss, g = tiles.softplus_sigmoid(t, ln2)
    part = (offs_a - row0).to(tl.int64) * tiles_b + j
    tl.store(loss_part + part, tl.sum(loss, 1), mask=mask_a)
    if grads:
        g = tl.where(positive, -g, g)  # d loss / dS = -z sigmoid(f)
        g = g * tl.load(weight_ptr + offs_a, mask=mask_a, other=0.0)[:, None]
        tl.store(dsum_part + part, tl.sum(g, 1), mask=mask_a)
        out = g_ptr + (offs_a - row0).to(tl.int64)[:, None] * (col_end - col0) + (offs_b - col0)[None, :]
        tl.store(out, g.to(g_ptr.dtype.element_ty), mask=mask)


@tiles.quiet_under_interpreter
def pointwise(x, y, scale, row_bias, row_keys, col_keys, kind: int, g_row, want_grads: bool):
    """-> (row sums of the loss [M], D @ y, D.T @ x, row sums of D); the last three are empty
    unless ``want_grads``. All in the math dtype."""
    x, y, d_in = tiles.operands(x, y)
    (m, d), n = x.shape, y.shape[0]
    acc = tiles.math_dtype(x.dtype)
    empty = x.new_empty(0, dtype=acc)
    if m == 0 or n == 0:
        zeros = x.new_zeros
        return (zeros(m, dtype=acc), *((zeros((m, d_in), dtype=acc), zeros((n, d_in), dtype=acc),
                                        zeros(m, dtype=acc)) if want_grads else (empty,) * 3))
    consts = torch.cat([tiles.scalar(scale, tiles.LOG2E, x), x.new_full((1,), tiles.LN2, dtype=acc)])
    bias = x.new_zeros(m, dtype=acc) if row_bias is None else row_bias.to(acc) * tiles.LOG2E
    weight = x.new_ones(m, dtype=acc) if g_row is None else g_row.to(acc).contiguous()
    budget = plan.workspace_budget()
    if want_grads:
        block_r, block_c = plan.gradient_blocks(m, n, x.dtype, tiles.INTERPRET, budget)
        g = x.new_empty(block_r * block_c, dtype=plan.g_dtype(x.dtype))
        gy, gx = x.new_empty((m, d), dtype=acc), x.new_empty((n, d), dtype=acc)  # every element is written
        d_bias = x.new_empty(m, dtype=acc)
    else:  # the G pointer keeps its type: one compiled kernel with and without gradients
        block_r, block_c = plan.forward_blocks(m, n, x.dtype, tiles.INTERPRET, budget)
        g = x.new_empty(1, dtype=plan.g_dtype(x.dtype))
    smallest = min(c.block_b for c in plan.tile_configs(x.dtype, tiles.INTERPRET, "pointwise"))
    loss_part = x.new_empty(block_r * triton.cdiv(block_c, smallest), dtype=acc)
    dsum_part = torch.empty_like(loss_part) if want_grads else consts  # consts: a pointer never written
    row_sum = x.new_empty(m, dtype=acc)
    block_d = plan.feature_block(d, x.dtype, tiles.INTERPRET)
    keys = tiles.keys_or_dummy(row_keys, x), tiles.keys_or_dummy(col_keys, x)
    for r0, r1 in plan.ranges(m, block_r):
        for c0, c1 in plan.ranges(n, block_c):
            grid = tiles.TileGrid(r1 - r0, c1 - c0)
            _pointwise_kernel[grid](x, y, consts, *keys, bias, weight, loss_part, dsum_part, g, r0, r1, c0, c1, d,
                                    kind, int(row_keys is not None), int(want_grads), BLOCK_D=block_d,
                                    PRECISION=tiles.dot_precision(x.dtype))
            tiles_b = grid.launched()[1]
            _add_rows(row_sum[r0:r1], loss_part, r1 - r0, tiles_b, c0 > 0)
            if want_grads:
                _add_rows(d_bias[r0:r1], dsum_part, r1 - r0, tiles_b, c0 > 0)
                gemm.gradient_products(g, (r0, r1), (c0, c1), x, y, gy, gx)
    if not want_grads:
        return row_sum, empty, empty, empty
    return row_sum, tiles.unpadded(gy, d_in), tiles.unpadded(gx, d_in), d_bias


def _add_rows(out: torch.Tensor, parts: torch.Tensor, rows: int, cols: int, accumulate: bool) -> None:
    block = parts[: rows * cols].view(rows, cols).sum(1)
    out.add_(block) if accumulate else out.copy_(block)
