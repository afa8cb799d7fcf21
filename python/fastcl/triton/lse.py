"""Masked row / column log-sum-exp of S = scale * x @ y.T, and its backward, in Triton.

Forward (``lse_forward``): one launch over row tiles. Each program owns BLOCK_A rows, walks every
column tile once, and from each S tile (in registers) merges its rows' online (max, sum-exp) and
writes the tile's column (shift, sum-exp) into a ``[row tiles, N]`` partial buffer; a second, tiny
kernel merges those partials per column in row-tile order. 2 M N D flops, deterministic.

Backward (``lse_backward``): G_ij = g_row_i exp(S_ij - row_shift_i) + g_col_j exp(S_ij - col_shift_j),
keyed pairs 0. Without float atomics every output row must be owned by one program, so this is a
row-parallel pass for G @ y (programs own BLOCK_A rows of x) and a column-parallel pass for G.T @ x
(programs own BLOCK_A rows of y), each recomputing its S tiles and forming G in registers.
Flops: each pass is 2 M N D (S) * ceil(D / BLOCK_DO) + 2 M N D (the G GEMM), so 8 M N D in all for
D <= BLOCK_DO (256), against 6 M N D for a single pass with atomics; for D = 1024 the S
recomputation per 256-feature output chunk makes it 20 M N D.

Numerics: statistics and outputs in float32 (float64 for float64 inputs); float32 S on GPU per
``tiles.dot_precision`` (about float32 accuracy by default, 1e-3 relative under TF32);
16-bit inputs multiply exactly into float32, and G is rounded to bfloat16 for bfloat16 inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles

_FORWARD = tiles.configs([(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 64, 8, 2)])
_GRAD = tiles.configs([(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2)])
_MERGE_BLOCK = 256


@triton.autotune(configs=_FORWARD, key=["D", "ROWS", "COLS", "HAS_KEYS"])
@triton.jit
def _forward_kernel(x_ptr, y_ptr, scale_ptr, row_keys, col_keys, row_lse_ptr, part_shift, part_sum, M, N, D,
                    HAS_KEYS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_m = offs_m < M
    scale = tl.load(scale_ptr)
    m_i = tl.full((BLOCK_A,), float("-inf"), scale.dtype)
    s_i = tl.zeros((BLOCK_A,), scale.dtype)
    part_row = pid.to(tl.int64) * N
    for n0 in range(0, N, BLOCK_B):
        offs_n = n0 + tl.arange(0, BLOCK_B)
        mask_n = offs_n < N
        s = tiles.logits_tile(x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, scale,
                              BLOCK_A, BLOCK_B, BLOCK_D, PRECISION)
        # Rows and columns past the ends are excluded like keyed pairs: they must not reach the
        # other direction's statistics.
        excluded = ~(mask_m[:, None] & mask_n[None, :])
        if HAS_KEYS:
            excluded = excluded | tiles.keyed_pairs(row_keys, col_keys, offs_m, mask_m, offs_n, mask_n)
        s = tl.where(excluded, float("-inf"), s)
        if ROWS:
            shift, total = tiles.block_stats(s, 1)
            m_i, s_i = tiles.lse_merge(m_i, s_i, shift, total)
        if COLS:
            shift, total = tiles.block_stats(s, 0)
            tl.store(part_shift + part_row + offs_n, shift, mask=mask_n)
            tl.store(part_sum + part_row + offs_n, total, mask=mask_n)
    if ROWS:
        tl.store(row_lse_ptr + offs_m, m_i + tl.log(s_i), mask=mask_m)


@triton.jit
def _merge_columns_kernel(part_shift, part_sum, col_lse_ptr, row_tiles, N, BLOCK: tl.constexpr):
    """col_lse from the per-row-tile partials, merged in row-tile order (deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    m = tl.full((BLOCK,), float("-inf"), part_sum.dtype.element_ty)
    s = tl.zeros((BLOCK,), part_sum.dtype.element_ty)
    at = offs.to(tl.int64)  # advanced by N per row tile: 64-bit offsets without a product
    for _ in range(0, row_tiles):
        shift = tl.load(part_shift + at, mask=mask, other=0.0)
        total = tl.load(part_sum + at, mask=mask, other=0.0)
        m, s = tiles.lse_merge(m, s, shift, total)
        at += N
    tl.store(col_lse_ptr + offs, m + tl.log(s), mask=mask)


@triton.autotune(configs=_GRAD, key=["D", "A_TERM", "B_TERM", "HAS_KEYS"],
                 prune_configs_by={"early_config_prune": tiles.prune_by_accumulator})
@triton.jit
def _grad_kernel(a_ptr, b_ptr, scale_ptr, a_keys, b_keys, a_g, a_shift, b_g, b_shift, out_ptr, RA, RB, D,
                 A_TERM: tl.constexpr, B_TERM: tl.constexpr, HAS_KEYS: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """out[a rows, chunk] = sum_b G(a, b) b[b, chunk] with
    G(a, b) = a_g[a] exp(S_ab - a_shift[a]) + b_g[b] exp(S_ab - b_shift[b]) (each term if on).
    (a, b) = (x, y) gives G @ y; (a, b) = (y, x) is the tile S.T and gives G.T @ x."""
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < RA
    d0 = tl.program_id(1) * BLOCK_DO
    scale = tl.load(scale_ptr)
    acc = tl.zeros((BLOCK_A, BLOCK_DO), scale.dtype)
    if A_TERM:  # per a row: loaded once
        ga = tl.load(a_g + offs_a, mask=mask_a, other=0.0)[:, None]
        sa = tl.load(a_shift + offs_a, mask=mask_a, other=0.0)[:, None]
    for b0 in range(0, RB, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < RB
        s = tiles.logits_tile(a_ptr, b_ptr, offs_a, offs_b, mask_a, mask_b, D, scale,
                              BLOCK_A, BLOCK_B, BLOCK_D, PRECISION)
        if HAS_KEYS:  # keyed pairs: exp(-inf - shift) = 0
            s = tl.where(tiles.keyed_pairs(a_keys, b_keys, offs_a, mask_a, offs_b, mask_b), float("-inf"), s)
        g = tl.zeros((BLOCK_A, BLOCK_B), scale.dtype)
        if A_TERM:
            g += ga * tl.exp(s - sa)
        if B_TERM:
            gb = tl.load(b_g + offs_b, mask=mask_b, other=0.0)[None, :]
            g += gb * tl.exp(s - tl.load(b_shift + offs_b, mask=mask_b, other=0.0)[None, :])
        g = tl.where(mask_a[:, None] & mask_b[None, :], g, 0.0)
        acc = tiles.accumulate_gemm(acc, g, b_ptr, offs_b, mask_b, d0, D, BLOCK_DO, PRECISION)
    offs_d = d0 + tl.arange(0, BLOCK_DO)
    out = out_ptr + offs_a.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(out, acc, mask=mask_a[:, None] & (offs_d[None, :] < D))


@tiles.quiet_under_interpreter
def lse_forward(x, y, scale, row_keys, col_keys, rows: bool, cols: bool):
    """-> (row_lse [M] or [0], col_lse [N] or [0]) over the non-keyed pairs."""
    x, y = tiles.operands(x, y)
    (m, d), n = x.shape, y.shape[0]
    acc = tiles.math_dtype(x.dtype)
    scale = scale.to(device=x.device, dtype=acc)
    row_lse = x.new_full((m if rows else 0,), float("-inf"), dtype=acc)
    col_lse = x.new_full((n if cols else 0,), float("-inf"), dtype=acc)
    if m == 0 or n == 0 or not (rows or cols):
        return row_lse, col_lse
    # Sized for the smallest row tile any configuration may pick; the launch says which it took.
    max_tiles = triton.cdiv(m, min(c.kwargs["BLOCK_A"] for c in _FORWARD)) if cols else 0
    part_shift = x.new_empty((max_tiles, n), dtype=acc)
    part_sum = x.new_empty((max_tiles, n), dtype=acc)
    block_d, _ = tiles.feature_blocks(d, x.dtype)
    _forward_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_A"]),)](
        x, y, scale, tiles.keys_or_dummy(row_keys, x), tiles.keys_or_dummy(col_keys, x), row_lse, part_shift,
        part_sum, m, n, d, HAS_KEYS=row_keys is not None, ROWS=rows, COLS=cols, BLOCK_D=block_d,
        PRECISION=tiles.dot_precision(x.dtype))
    if cols:
        row_tiles = triton.cdiv(m, _forward_kernel.best_config.kwargs["BLOCK_A"])
        _merge_columns_kernel[(triton.cdiv(n, _MERGE_BLOCK),)](part_shift, part_sum, col_lse, row_tiles, n,
                                                               BLOCK=_MERGE_BLOCK)
    return row_lse, col_lse


def grad_pass(a, b, scale, a_keys, b_keys, a_term, b_term) -> torch.Tensor:
    """sum_b G(a, b) b[b] for every row of a, in the math dtype; each term is None (off) or the
    pair (upstream gradient, shift) of the a side or the b side."""
    (ra, d), rb = a.shape, b.shape[0]
    if ra == 0 or rb == 0 or d == 0 or (a_term is None and b_term is None):
        return a.new_zeros((ra, d), dtype=scale.dtype)
    out = a.new_empty((ra, d), dtype=scale.dtype)  # every element is written once
    block_d, block_do = tiles.feature_blocks(d, a.dtype)
    off = (scale, scale)  # pointers for a term that is off; never read
    _grad_kernel[lambda meta: (triton.cdiv(ra, meta["BLOCK_A"]), triton.cdiv(d, block_do))](
        a, b, scale, tiles.keys_or_dummy(a_keys, a), tiles.keys_or_dummy(b_keys, a), *(a_term or off),
        *(b_term or off), out, ra, rb, d, A_TERM=a_term is not None, B_TERM=b_term is not None,
        HAS_KEYS=a_keys is not None, BLOCK_D=block_d, BLOCK_DO=block_do, PRECISION=tiles.dot_precision(a.dtype))
    return out


@tiles.quiet_under_interpreter
def lse_backward(x, y, scale, row_keys, col_keys, row_shift, col_shift, g_row, g_col, rows: bool, cols: bool):
    """-> (G @ y [M, D], G.T @ x [N, D]) in the math dtype."""
    x, y = tiles.operands(x, y)
    acc = tiles.math_dtype(x.dtype)
    scale = scale.to(device=x.device, dtype=acc)
    row_term = (g_row.to(acc).contiguous(), row_shift.to(acc).contiguous()) if rows else None
    col_term = (g_col.to(acc).contiguous(), col_shift.to(acc).contiguous()) if cols else None
    gy = grad_pass(x, y, scale, row_keys, col_keys, row_term, col_term)
    gx = grad_pass(y, x, scale, col_keys, row_keys, col_term, row_term)
    return gy, gx
