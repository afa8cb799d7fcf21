"""Masked row / column log-sum-exp of S = scale * x @ y.T, and its backward, in Triton.

S is visited in blocks of ``R x C`` pairs that bound the workspace (``plan.py``); one launch per block,
one program per ``BLOCK_A x BLOCK_B`` tile of it.

Forward (``lse_forward``): each program forms its S tile in registers and writes the tile's
log-sum-exp of each row and of each column into the block's partials (``[R, C / BLOCK_B]`` and
``[R / BLOCK_A, C]``); the host merges them per row and per column with torch's logsumexp, then
across blocks in block order. One S GEMM (2 M N D flops), both directions at once, deterministic.

Backward (``lse_backward``): each program recomputes its S tile and writes the gradient tile
G_ij = g_row_i exp(S_ij - row_lse_i) + g_col_j exp(S_ij - col_lse_j) (left-out pairs 0) into the block's
G buffer; two GEMMs of ``gemm.py`` then add G @ y into dx's rows and G.T @ x into dy's rows. One S
GEMM plus the two gradient GEMMs (6 M N D flops) whatever D: with the forward, the floor of four
GEMM-equivalents (DESIGN.md beside this file says why this shape).

Left out of every statistic and gradient: pairs outside the block, keyed pairs (equal keys), and
with op ``lse_exclude`` (``lse_forward_excluding``, ``lse_backward_excluding``) the pairs
(i, exclude[i, e]) of a ``[M, E]`` list (-1 padded): each tile sets them to -inf in S before anything
reads it, one loop step per listed column (``tiles.drop_listed``).

Numerics: statistics and outputs in float32 (float64 for float64 inputs); float32 S on GPU per
``tiles.dot_precision`` (about float32 accuracy by default, 1e-3 relative under TF32);
16-bit inputs multiply exactly into float32; G is stored in ``plan.g_dtype``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import gemm, plan, tiles

_TILES = tiles.tile_configs("lse")


@triton.autotune(configs=_TILES, key=["D"], prune_configs_by={"early_config_prune": tiles.tile_pruner("lse")})
@triton.jit(do_not_specialize=["row0", "row_end", "col0", "col_end", "E", "has_keys", "rows", "cols"])
def _forward_kernel(a_ptr, b_ptr, scale_ptr, a_keys, b_keys, exclude, row_part, col_part, row0, row_end, col0,
                    col_end, D, E, has_keys, rows, cols, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Tile (i, j) of the block [row0, row_end) x [col0, col_end): base-2 log-sum-exp of each of its
    rows into row_part[row - row0, j] (if ``rows``) and of each column into col_part[i, col - col0]
    (if ``cols``), over the pairs neither keyed (if ``has_keys``) nor listed in ``exclude [M, E]``
    (E = 0: no list). The flags and E are run-time values (uniform branches, a loop of E steps): one
    compiled kernel per dtype and feature block, whatever the loss."""
    i, j, tiles_b = tiles.tile_of(row_end - row0, col_end - col0, BLOCK_A, BLOCK_B)
    offs_a = row0 + i * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = col0 + j * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_a, mask_b = offs_a < row_end, offs_b < col_end
    scale = tl.load(scale_ptr)
    s = tiles.logits_tile(a_ptr, b_ptr, offs_a, offs_b, mask_a, mask_b, D, scale, BLOCK_A, BLOCK_B, BLOCK_D,
                          PRECISION)
    # Pairs outside the block are excluded like keyed pairs: they must not reach any statistic.
    excluded = ~(mask_a[:, None] & mask_b[None, :])
    if has_keys:
        excluded = excluded | tiles.keyed_pairs(a_keys, b_keys, offs_a, mask_a, offs_b, mask_b)
    s = tiles.drop_listed(tl.where(excluded, float("-inf"), s), exclude, E, offs_a, mask_a, offs_b)
    if rows:
        tl.store(row_part + (offs_a - row0).to(tl.int64) * tiles_b + j, tiles.tile_lse2(s, 1),
                 mask=mask_a)
    if cols:
        tl.store(col_part + i.to(tl.int64) * (col_end - col0) + (offs_b - col0), tiles.tile_lse2(s, 0), mask=mask_b)


# col0 and col_end are specialised: Triton compiles the kernel once for both multiples of 16 (col0
# always is; col_end too but in the matrix's last column block when N % 16 != 0, which gets a second
# variant, and N == 1 a third, as Triton makes an int equal to 1 a constant). They give G's row
# stride (col_end - col0) and the store mask along each row (offs_b < col_end): known multiples of
# 16, each thread stores G in 16-byte vectors instead of 64 scalar 16-bit stores
# (tests/test_triton_sass.py). The row bounds and the flags gain nothing from it: run-time values.
@triton.autotune(configs=_TILES, key=["D"], prune_configs_by={"early_config_prune": tiles.tile_pruner("lse")})
@triton.jit(do_not_specialize=["row0", "row_end", "E", "has_keys", "row_term", "col_term"])
def _gradient_kernel(a_ptr, b_ptr, scale_ptr, a_keys, b_keys, exclude, row_g, row_shift, col_g, col_shift, g_ptr,
                     row0, row_end, col0, col_end, D, E, has_keys, row_term, col_term, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """G of tile (i, j) into g_ptr[(row - row0) * (col_end - col0) + col - col0]; the shifts are the
    base-2 log-sum-exps. Run-time flags and E, as in the forward."""
    i, j, tiles_b = tiles.tile_of(row_end - row0, col_end - col0, BLOCK_A, BLOCK_B)
    offs_a = row0 + i * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = col0 + j * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_a, mask_b = offs_a < row_end, offs_b < col_end
    scale = tl.load(scale_ptr)
    s = tiles.logits_tile(a_ptr, b_ptr, offs_a, offs_b, mask_a, mask_b, D, scale, BLOCK_A, BLOCK_B, BLOCK_D,
                          PRECISION)
    if has_keys:  # keyed pairs: exp2(-inf - shift) = 0
        s = tl.where(tiles.keyed_pairs(a_keys, b_keys, offs_a, mask_a, offs_b, mask_b), float("-inf"), s)
    s = tiles.drop_listed(s, exclude, E, offs_a, mask_a, offs_b)  # listed pairs: 0 as well
    g = tl.zeros((BLOCK_A, BLOCK_B), scale.dtype)
    if row_term:
        ga = tl.load(row_g + offs_a, mask=mask_a, other=0.0)[:, None]
        g += ga * tl.exp2(s - tl.load(row_shift + offs_a, mask=mask_a, other=0.0)[:, None])
    if col_term:
        gb = tl.load(col_g + offs_b, mask=mask_b, other=0.0)[None, :]
        g += gb * tl.exp2(s - tl.load(col_shift + offs_b, mask=mask_b, other=0.0)[None, :])
    mask = mask_a[:, None] & mask_b[None, :]
    out = g_ptr + (offs_a - row0).to(tl.int64)[:, None] * (col_end - col0) + (offs_b - col0)[None, :]
    tl.store(out, tl.where(mask, g, 0.0).to(g_ptr.dtype.element_ty), mask=mask)


def lse_forward_excluding(x, y, scale, row_keys, col_keys, exclude, rows: bool, cols: bool):
    """``lse_forward`` with the pairs (i, exclude[i, e]) left out too (op ``lse_exclude``; ``exclude``
    [M, E] int64 column indices, -1 padded)."""
    return lse_forward(x, y, scale, row_keys, col_keys, rows, cols, exclude)


def lse_backward_excluding(x, y, scale, row_keys, col_keys, exclude, row_shift, col_shift, g_row, g_col,
                           rows: bool, cols: bool):
    """``lse_backward`` with the same pairs left out (their G is 0)."""
    return lse_backward(x, y, scale, row_keys, col_keys, row_shift, col_shift, g_row, g_col, rows, cols, exclude)


@tiles.quiet_under_interpreter
def lse_forward(x, y, scale, row_keys, col_keys, rows: bool, cols: bool, exclude=None):
    """-> (row_lse [M] or [0], col_lse [N] or [0]) over the pairs neither keyed nor listed in ``exclude``."""
    x, y, _ = tiles.operands(x, y)
    (m, d), n = x.shape, y.shape[0]
    acc = tiles.math_dtype(x.dtype)
    row_lse = x.new_full((m if rows else 0,), float("-inf"), dtype=acc)
    col_lse = x.new_full((n if cols else 0,), float("-inf"), dtype=acc)
    if m == 0 or n == 0 or not (rows or cols):
        return row_lse, col_lse
    scale2 = tiles.scalar(scale, tiles.LOG2E, x)
    block_r, block_c = plan.forward_blocks(m, n, x.dtype, tiles.INTERPRET, plan.workspace_budget())
    smallest = min(min(c.block_a, c.block_b) for c in plan.tile_configs(x.dtype, tiles.INTERPRET))
    row_part = x.new_empty(block_r * triton.cdiv(block_c, smallest) if rows else 1, dtype=acc)
    col_part = x.new_empty(triton.cdiv(block_r, smallest) * block_c if cols else 1, dtype=acc)
    block_d = plan.feature_block(d, x.dtype, tiles.INTERPRET)
    keys = tiles.keys_or_dummy(row_keys, x), tiles.keys_or_dummy(col_keys, x)
    listed, width = _listed(exclude, x)
    for r0, r1 in plan.ranges(m, block_r):
        for c0, c1 in plan.ranges(n, block_c):
            grid = tiles.TileGrid(r1 - r0, c1 - c0)
            _forward_kernel[grid](x, y, scale2, *keys, listed, row_part, col_part, r0, r1, c0, c1, d, width,
                                  int(row_keys is not None), int(rows), int(cols), BLOCK_D=block_d,
                                  PRECISION=tiles.dot_precision(x.dtype))
            tiles_a, tiles_b = grid.launched()
            if rows:
                _merge(row_lse[r0:r1], row_part[: (r1 - r0) * tiles_b].view(r1 - r0, tiles_b), 1, c0 > 0)
            if cols:
                _merge(col_lse[c0:c1], col_part[: tiles_a * (c1 - c0)].view(tiles_a, c1 - c0), 0, r0 > 0)
    return row_lse, col_lse


def _listed(exclude: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(pointer, E) of an exclude list as the kernels read it: int64, contiguous [M, E]; without one
    a dummy int64 pointer (never read: E = 0), so that both share one compiled kernel."""
    if exclude is None or exclude.shape[1] == 0:
        return tiles.keys_or_dummy(None, like), 0
    return exclude.to(device=like.device, dtype=torch.int64).contiguous(), exclude.shape[1]


def _merge(lse: torch.Tensor, parts2: torch.Tensor, dim: int, accumulate: bool) -> None:
    """Base-2 partials of a block into ``lse`` (a view, natural logarithms), blocks in a fixed order.
    torch's logsumexp shifts an infinite maximum by 0, as the kernels do."""
    block = torch.logsumexp(parts2 * tiles.LN2, dim)
    lse.copy_(torch.logaddexp(lse, block) if accumulate else block)


@tiles.quiet_under_interpreter
def lse_backward(x, y, scale, row_keys, col_keys, row_shift, col_shift, g_row, g_col, rows: bool, cols: bool,
                 exclude=None):
    """-> (G @ y [M, D], G.T @ x [N, D]) in the math dtype."""
    x, y, d_in = tiles.operands(x, y)
    (m, d), n = x.shape, y.shape[0]
    acc = tiles.math_dtype(x.dtype)
    if m == 0 or n == 0 or d == 0 or not (rows or cols):
        return x.new_zeros((m, d_in), dtype=acc), x.new_zeros((n, d_in), dtype=acc)
    gy, gx = x.new_empty((m, d), dtype=acc), x.new_empty((n, d), dtype=acc)  # every element is written
    scale2 = tiles.scalar(scale, tiles.LOG2E, x)
    off = (scale2, scale2)  # pointers of a term that is off; never read
    row_term = (g_row.to(acc).contiguous(), (row_shift.to(acc) * tiles.LOG2E).contiguous()) if rows else off
    col_term = (g_col.to(acc).contiguous(), (col_shift.to(acc) * tiles.LOG2E).contiguous()) if cols else off
    block_r, block_c = plan.gradient_blocks(m, n, x.dtype, tiles.INTERPRET, plan.workspace_budget())
    g = x.new_empty(block_r * block_c, dtype=plan.g_dtype(x.dtype))
    block_d = plan.feature_block(d, x.dtype, tiles.INTERPRET)
    keys = tiles.keys_or_dummy(row_keys, x), tiles.keys_or_dummy(col_keys, x)
    listed, width = _listed(exclude, x)
    for r0, r1 in plan.ranges(m, block_r):
        for c0, c1 in plan.ranges(n, block_c):
            _gradient_kernel[tiles.TileGrid(r1 - r0, c1 - c0)](
                x, y, scale2, *keys, listed, *row_term, *col_term, g, r0, r1, c0, c1, d, width,
                int(row_keys is not None), int(rows), int(cols), BLOCK_D=block_d,
                PRECISION=tiles.dot_precision(x.dtype))
            gemm.gradient_products(g, (r0, r1), (c0, c1), x, y, gy, gx)
    return tiles.unpadded(gy, d_in), tiles.unpadded(gx, d_in)
