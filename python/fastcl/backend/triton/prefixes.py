"""Op ``lse_prefixes`` in Triton: the row / column log-sum-exps of the K similarity matrices of nested
feature prefixes ``d_1 < ... < d_K`` (Matryoshka), and their backward, from one pass over D.

    S^k_ij = scale * a^k_i * b^k_j * P^k_ij,    P^k_ij = <x_i[:d_k], y_j[:d_k]>

(``a``, ``b``: per-prefix row and column factors, the inverse prefix norms, or none). The algorithm is
``chunked/prefixes.py``'s; blocks of S, programs and host merges are ``lse.py``'s.

Forward (``lse_forward_prefixes``): each program grows its tile's P in registers segment
``[d_{q-1}, d_q)`` by segment and, at each segment's end, writes the base-2 log-sum-exp of each row
and column of ``S^q`` into slot q of the block's partials (``[K, R, C / BLOCK_B]``, ``[K, R / BLOCK_A,
C]``); the host merges them per prefix as ``lse.py`` does. One S GEMM at ``d_K``, K exps per pair and
direction.

Backward (``lse_backward_prefixes``): each program grows P again, forms every ``G^q``, writes the
partial row and column sums of ``G^q * S^q`` and stores ``H^q = a^q b^q G^q`` into slot q of a
``[K, R, C]`` workspace; then, descending in the same program (the tile is in L2, just written, and
the running sum stays in float32 registers: no host pass over K R C elements, no rounding of a
partial sum to the storage type before the next is added), it turns the slots into the suffix sums
``sum_{k >= q} H^k``. Segment q's features of the gradients are then two ``gemm.py`` products of
slot q with that segment of y and x (column windows of the gradients, no copies): the segments
partition ``[0, d_K)``, so the gradient GEMMs cost one loss's at ``d_K`` whatever K. Four
GEMM-equivalents in all, plus, per boundary that is not a multiple of 16, the 16 features around it
multiplied twice (masked, once per side) in each S pass.

``pointwise_prefixes`` (Matryoshka SigLIP / MW): one kernel, ``_prefix_pointwise_kernel``, grows P the
same way and at each segment's end forms ``pointwise.py``'s loss tile of ``S^q + bias`` (its row sums
into slot q of the loss partials) and, with gradients, ``D^q`` times the prefix's per-row weight, the
row / column sums of ``D^q T^q`` and ``H^q = a^q b^q D^q``, turned into suffix sums in the program as
the backward's are; the same per-segment GEMMs follow. Three GEMM-equivalents in all, as one SigLIP.

The feature loop keeps ``lse.py``'s unmasked, aligned loads for every whole feature block: only the
blocks a boundary cuts are loaded with a feature mask, 16 features at a time (``_grow``). Dims, K and the flags are
run-time values: one compiled kernel per dtype and feature block, whatever the prefixes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import gemm, plan, tiles
from .lse import _merge

_TILES = tiles.tile_configs("prefixes")


CHUNK = tl.constexpr(16)  # the feature padding (plan.FEATURE_QUANTUM), a multiple of every MMA's K step


@triton.jit
def _cut_block(acc, a_base, b_base, mask_a, mask_b, d0, lo, hi, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """acc += the features ``[lo, hi)`` of the feature block at d0, CHUNK features at a time: only the
    chunk a boundary falls in is multiplied on both of its sides (masked), not the whole block.
    ``a_base`` and ``b_base`` point at the tile's rows."""
    offs_c = tl.arange(0, CHUNK)
    for c0 in range(tl.maximum(lo, d0) // CHUNK * CHUNK, tl.minimum(hi, d0 + BLOCK_D), CHUNK):
        inside = (offs_c >= lo - c0) & (offs_c < hi - c0)
        a = tl.load(a_base[:, None] + (c0 + offs_c)[None, :], mask=mask_a[:, None] & inside[None, :], other=0.0)
        b = tl.load(b_base[None, :] + (c0 + offs_c)[:, None], mask=mask_b[None, :] & inside[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _grow(acc, a_rows, b_cols, a_base, b_base, mask_a, mask_b, lo, hi, BLOCK_D: tl.constexpr,
          PRECISION: tl.constexpr):
    """acc += a[:, lo:hi] @ b[:, lo:hi].T over feature blocks aligned to BLOCK_D: a block cut by lo,
    the whole blocks (unmasked loads, as ``tiles.logits_tile``'s), a block cut by hi
    (``plan.prefix_features`` counts the work)."""
    first = lo // BLOCK_D
    if first * BLOCK_D < lo:
        acc = _cut_block(acc, a_base, b_base, mask_a, mask_b, first * BLOCK_D, lo, hi, BLOCK_D, PRECISION)
        first += 1
    last = hi // BLOCK_D
    for blk in range(first, last):
        a = tl.load(a_rows + blk * BLOCK_D, mask=mask_a[:, None], other=0.0)
        b = tl.load(b_cols + blk * BLOCK_D, mask=mask_b[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    if (last * BLOCK_D < hi) & (last >= first):  # hi cuts a block lo did not
        acc = _cut_block(acc, a_base, b_base, mask_a, mask_b, last * BLOCK_D, lo, hi, BLOCK_D, PRECISION)
    return acc


@triton.jit
def _logits(acc, scale, a_scale, b_scale, q, M, N, offs_a, mask_a, offs_b, mask_b, has_scales):
    """S^q in base 2: scale2 * a^q_i * b^q_j * P_ij."""
    s = acc * scale
    if has_scales:
        fa = tl.load(a_scale + q * M + offs_a, mask=mask_a, other=0.0)
        fb = tl.load(b_scale + q * N + offs_b, mask=mask_b, other=0.0)
        s = s * fa[:, None] * fb[None, :]
    return s


@triton.autotune(configs=_TILES, key=["D"], prune_configs_by={"early_config_prune": tiles.tile_pruner("prefixes")})
@triton.jit(do_not_specialize=["row0", "row_end", "col0", "col_end", "M", "N", "K", "has_scales", "rows", "cols"])
def _prefix_forward_kernel(a_ptr, b_ptr, scale_ptr, dims_ptr, a_scale, b_scale, row_part, col_part, row0, row_end,
                           col0, col_end, M, N, D, K, has_scales, rows, cols, BLOCK_D: tl.constexpr,
                           PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Tile (i, j) of the block: for each prefix q, the base-2 log-sum-exp of each row of S^q into
    row_part[q, row - row0, j] and of each column into col_part[q, i, col - col0]."""
    i, j, tiles_b = tiles.tile_of(row_end - row0, col_end - col0, BLOCK_A, BLOCK_B)
    offs_a = row0 + i * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = col0 + j * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    mask_a, mask_b = offs_a < row_end, offs_b < col_end
    a_base, b_base = a_ptr + offs_a.to(tl.int64) * D, b_ptr + offs_b.to(tl.int64) * D
    a_rows, b_cols = a_base[:, None] + offs_d[None, :], b_base[None, :] + offs_d[:, None]
    scale = tl.load(scale_ptr)
    excluded = ~(mask_a[:, None] & mask_b[None, :])  # pairs outside the block reach no statistic
    row_slot = (row_end - row0).to(tl.int64) * tiles_b
    col_slot = tl.cdiv(row_end - row0, BLOCK_A).to(tl.int64) * (col_end - col0)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=scale.dtype)
    for q in range(K):
        lo, hi = tl.load(dims_ptr + q - 1, mask=q > 0, other=0), tl.load(dims_ptr + q)
        acc = _grow(acc, a_rows, b_cols, a_base, b_base, mask_a, mask_b, lo, hi, BLOCK_D, PRECISION)
        s = _logits(acc, scale, a_scale, b_scale, q, M, N, offs_a, mask_a, offs_b, mask_b, has_scales)
        s = tl.where(excluded, float("-inf"), s)
        if rows:
            tl.store(row_part + q * row_slot + (offs_a - row0).to(tl.int64) * tiles_b + j, tiles.tile_lse2(s, 1),
                     mask=mask_a)
        if cols:
            tl.store(col_part + q * col_slot + i.to(tl.int64) * (col_end - col0) + (offs_b - col0),
                     tiles.tile_lse2(s, 0), mask=mask_b)


@triton.autotune(configs=_TILES, key=["D"], prune_configs_by={"early_config_prune": tiles.tile_pruner("prefixes")})
@triton.jit(do_not_specialize=["row0", "row_end", "M", "N", "K", "has_scales", "row_term", "col_term"])
def _prefix_gradient_kernel(a_ptr, b_ptr, scale_ptr, dims_ptr, a_scale, b_scale, row_g, row_shift, col_g, col_shift,
                            row_part, col_part, h_ptr, row0, row_end, col0, col_end, M, N, D, K, has_scales, row_term,
                            col_term, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_A: tl.constexpr,
                            BLOCK_B: tl.constexpr):
    """Tile (i, j) of the block: for each prefix q, ``G^q`` (the shifts are base-2 log-sum-exps,
    ``[K, M]`` and ``[K, N]`` like the gradients and factors), the row sums of ``G^q * S2^q`` into
    row_part[q, row - row0, j] and the column sums into col_part[q, i, col - col0], and the suffix sum
    ``sum_{k >= q} a^k b^k G^k`` into slot q of h_ptr (``[K, R, C]``, row-major slots). col0 and
    col_end are specialised, as in ``lse._gradient_kernel``: 16-byte stores of H."""
    i, j, tiles_b = tiles.tile_of(row_end - row0, col_end - col0, BLOCK_A, BLOCK_B)
    offs_a = row0 + i * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = col0 + j * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    mask_a, mask_b = offs_a < row_end, offs_b < col_end
    mask = mask_a[:, None] & mask_b[None, :]
    a_base, b_base = a_ptr + offs_a.to(tl.int64) * D, b_ptr + offs_b.to(tl.int64) * D
    a_rows, b_cols = a_base[:, None] + offs_d[None, :], b_base[None, :] + offs_d[:, None]
    scale = tl.load(scale_ptr)
    row_slot = (row_end - row0).to(tl.int64) * tiles_b
    col_slot = tl.cdiv(row_end - row0, BLOCK_A).to(tl.int64) * (col_end - col0)
    h_slot = (row_end - row0).to(tl.int64) * (col_end - col0)
    h_rows = (offs_a - row0).to(tl.int64) * (col_end - col0)  # slot q of H: q h_slot + h_rows + h_cols
    h_cols = offs_b - col0
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=scale.dtype)
    for q in range(K):
        lo, hi = tl.load(dims_ptr + q - 1, mask=q > 0, other=0), tl.load(dims_ptr + q)
        acc = _grow(acc, a_rows, b_cols, a_base, b_base, mask_a, mask_b, lo, hi, BLOCK_D, PRECISION)
        s = _logits(acc, scale, a_scale, b_scale, q, M, N, offs_a, mask_a, offs_b, mask_b, has_scales)
        g = tl.zeros((BLOCK_A, BLOCK_B), dtype=scale.dtype)
        if row_term:
            ga = tl.load(row_g + q * M + offs_a, mask=mask_a, other=0.0)[:, None]
            g += ga * tl.exp2(s - tl.load(row_shift + q * M + offs_a, mask=mask_a, other=0.0)[:, None])
        if col_term:
            gb = tl.load(col_g + q * N + offs_b, mask=mask_b, other=0.0)[None, :]
            g += gb * tl.exp2(s - tl.load(col_shift + q * N + offs_b, mask=mask_b, other=0.0)[None, :])
        g = tl.where(mask, g, 0.0)
        gs = g * s
        tl.store(row_part + q * row_slot + (offs_a - row0).to(tl.int64) * tiles_b + j, tl.sum(gs, 1), mask=mask_a)
        tl.store(col_part + q * col_slot + i.to(tl.int64) * (col_end - col0) + (offs_b - col0), tl.sum(gs, 0),
                 mask=mask_b)
        h = _logits(g, 1.0, a_scale, b_scale, q, M, N, offs_a, mask_a, offs_b, mask_b, has_scales)
        tl.store(h_ptr + (q * h_slot + h_rows)[:, None] + h_cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
    # The suffix sums, descending: slot q becomes H^q + slot q + 1, the running sum in the math dtype.
    # H^{K-1} is read back rather than kept: a tile of registers fewer through the loop above. The
    # barrier makes the stores above visible to whichever thread of the program reads them back.
    tl.debug_barrier()
    h = tl.load(h_ptr + ((K - 1) * h_slot + h_rows)[:, None] + h_cols[None, :], mask=mask, other=0.0).to(scale.dtype)
    for t in range(1, K):
        slot = h_ptr + ((K - 1 - t) * h_slot + h_rows)[:, None] + h_cols[None, :]
        h += tl.load(slot, mask=mask, other=0.0).to(h.dtype)
        tl.store(slot, h.to(h_ptr.dtype.element_ty), mask=mask)


# col0 and col_end specialised, as in ``_prefix_gradient_kernel``: 16-byte stores of H.
@triton.autotune(configs=tiles.tile_configs("prefix_pointwise"), key=["D"],
                 prune_configs_by={"early_config_prune": tiles.tile_pruner("prefix_pointwise")})
@triton.jit(do_not_specialize=["row0", "row_end", "M", "N", "K", "has_scales", "kind", "has_keys", "grads"])
def _prefix_pointwise_kernel(a_ptr, b_ptr, consts_ptr, dims_ptr, a_scale, b_scale, a_keys, b_keys, bias_ptr,
                             weight_ptr, loss_part, dsum_part, row_part, col_part, h_ptr, row0, row_end, col0, col_end,
                             M, N, D, K, has_scales, kind, has_keys, grads, BLOCK_D: tl.constexpr,
                             PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Tile (i, j) of the block, for each prefix q: the row sums of the loss of ``S^q = T^q + bias``
    into loss_part[q, row - row0, j] (``pointwise._pointwise_kernel``'s kinds, keys and base-2
    arguments: consts = (scale * log2 e, ln 2), bias times log2 e, ``T2^q = consts[0] a^q b^q P^q``);
    with ``grads``, ``D^q = weight[q] * d loss / dS^q`` (weight ``[K, M]``), the row and column sums
    of ``D^q * T2^q`` into row_part[q, row - row0, j] and col_part[q, i, col - col0], the row sums of
    ``sum_q D^q`` into dsum_part[row - row0, j], and ``a^q b^q D^q`` into slot q of h_ptr, turned into
    the suffix sums ``sum_{k >= q} a^k b^k D^k`` at the end as in ``_prefix_gradient_kernel``."""
    i, j, tiles_b = tiles.tile_of(row_end - row0, col_end - col0, BLOCK_A, BLOCK_B)
    offs_a = row0 + i * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = col0 + j * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    mask_a, mask_b = offs_a < row_end, offs_b < col_end
    mask = mask_a[:, None] & mask_b[None, :]
    a_base, b_base = a_ptr + offs_a.to(tl.int64) * D, b_ptr + offs_b.to(tl.int64) * D
    a_rows, b_cols = a_base[:, None] + offs_d[None, :], b_base[None, :] + offs_d[:, None]
    scale = tl.load(consts_ptr)
    ln2 = tl.load(consts_ptr + 1)
    bias = tl.load(bias_ptr + offs_a, mask=mask_a, other=0.0)
    # SigLIP's positives (t -> -t); MW's keyed targets and the pairs outside the block: t = -inf,
    # where softplus and sigmoid are 0.
    positive = tl.zeros((BLOCK_A, BLOCK_B), tl.int1)
    off = ~mask
    if has_keys:
        keyed = tiles.keyed_pairs(a_keys, b_keys, offs_a, mask_a, offs_b, mask_b)
        positive = keyed & (kind == 0)
        off = off | (keyed & (kind != 0))
    part = (offs_a - row0).to(tl.int64) * tiles_b + j
    row_slot = (row_end - row0).to(tl.int64) * tiles_b
    col_slot = tl.cdiv(row_end - row0, BLOCK_A).to(tl.int64) * (col_end - col0)
    h_slot = (row_end - row0).to(tl.int64) * (col_end - col0)
    h_rows = (offs_a - row0).to(tl.int64) * (col_end - col0)
    h_cols = offs_b - col0
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=scale.dtype)
    dsum = tl.zeros((BLOCK_A,), dtype=scale.dtype)
    for q in range(K):
        lo, hi = tl.load(dims_ptr + q - 1, mask=q > 0, other=0), tl.load(dims_ptr + q)
        acc = _grow(acc, a_rows, b_cols, a_base, b_base, mask_a, mask_b, lo, hi, BLOCK_D, PRECISION)
        s = _logits(acc, scale, a_scale, b_scale, q, M, N, offs_a, mask_a, offs_b, mask_b, has_scales)
        t = s + bias[:, None]
        t = tl.where(off, float("-inf"), tl.where(positive, -t, t))  # keys read 0 outside: off first
        loss, g = tiles.softplus_sigmoid(t, ln2)
        tl.store(loss_part + q * row_slot + part, tl.sum(loss, 1), mask=mask_a)
        if grads:
            g = tl.where(positive, -g, g)  # d loss / dS = -z sigmoid(f)
            g = g * tl.load(weight_ptr + q * M + offs_a, mask=mask_a, other=0.0)[:, None]
            dsum += tl.sum(g, 1)
            gs = g * s
            tl.store(row_part + q * row_slot + part, tl.sum(gs, 1), mask=mask_a)
            tl.store(col_part + q * col_slot + i.to(tl.int64) * (col_end - col0) + (offs_b - col0), tl.sum(gs, 0),
                     mask=mask_b)
            h = _logits(g, 1.0, a_scale, b_scale, q, M, N, offs_a, mask_a, offs_b, mask_b, has_scales)
            tl.store(h_ptr + (q * h_slot + h_rows)[:, None] + h_cols[None, :], h.to(h_ptr.dtype.element_ty),
                     mask=mask)
    if grads:
        tl.store(dsum_part + part, dsum, mask=mask_a)
        # the suffix sums, as in _prefix_gradient_kernel
        tl.debug_barrier()
        h = tl.load(h_ptr + ((K - 1) * h_slot + h_rows)[:, None] + h_cols[None, :], mask=mask,
                    other=0.0).to(scale.dtype)
        for r in range(1, K):
            slot = h_ptr + ((K - 1 - r) * h_slot + h_rows)[:, None] + h_cols[None, :]
            h += tl.load(slot, mask=mask, other=0.0).to(h.dtype)
            tl.store(slot, h.to(h_ptr.dtype.element_ty), mask=mask)


def _factors(row_scale, col_scale, like, acc):
    """(a, b, has_scales) as the kernels read them: contiguous [K, M] / [K, N] in the math dtype, or
    stand-ins of the same type (never read) so that both share one compiled kernel."""
    if row_scale is None:
        dummy = like.new_empty(1, dtype=acc)
        return dummy, dummy, 0
    return row_scale.to(device=like.device, dtype=acc).contiguous(), \
        col_scale.to(device=like.device, dtype=acc).contiguous(), 1


def _segments(dims):
    return list(zip([0, *dims[:-1]], dims))


@tiles.quiet_under_interpreter
def lse_forward_prefixes(x, y, scale, dims, row_scale, col_scale, rows: bool, cols: bool):
    """-> (row_lse [K, M] or [K, 0], col_lse [K, N] or [K, 0]) of each prefix's S^k."""
    x, y, _ = tiles.operands(x, y)
    (m, d), n, k = x.shape, y.shape[0], len(dims)
    acc = tiles.math_dtype(x.dtype)
    row_lse = x.new_full((k, m if rows else 0), float("-inf"), dtype=acc)
    col_lse = x.new_full((k, n if cols else 0), float("-inf"), dtype=acc)
    if m == 0 or n == 0 or k == 0 or not (rows or cols):
        return row_lse, col_lse
    scale2 = tiles.scalar(scale, tiles.LOG2E, x)
    a, b, has_scales = _factors(row_scale, col_scale, x, acc)
    dims_t = torch.tensor(list(dims), dtype=torch.int32, device=x.device)
    block_r, block_c = plan.prefix_forward_blocks(m, n, k, x.dtype, tiles.INTERPRET, plan.workspace_budget())
    smallest = plan.smallest_tile_edge(x.dtype, tiles.INTERPRET, ("prefixes",))
    row_part = x.new_empty(k * block_r * triton.cdiv(block_c, smallest) if rows else 1, dtype=acc)
    col_part = x.new_empty(k * triton.cdiv(block_r, smallest) * block_c if cols else 1, dtype=acc)
    block_d = plan.feature_block(d, x.dtype, tiles.INTERPRET)
    for r0, r1 in plan.ranges(m, block_r):
        for c0, c1 in plan.ranges(n, block_c):
            grid = tiles.TileGrid(r1 - r0, c1 - c0)
            _prefix_forward_kernel[grid](x, y, scale2, dims_t, a, b, row_part, col_part, r0, r1, c0, c1, m, n, d, k,
                                         has_scales, int(rows), int(cols), BLOCK_D=block_d,
                                         PRECISION=tiles.dot_precision(x.dtype))
            tiles_a, tiles_b = grid.launched()
            if rows:
                parts = row_part[: k * (r1 - r0) * tiles_b].view(k, r1 - r0, tiles_b)
                _merge(row_lse[:, r0:r1], parts, 2, c0 > 0)
            if cols:
                parts = col_part[: k * tiles_a * (c1 - c0)].view(k, tiles_a, c1 - c0)
                _merge(col_lse[:, c0:c1], parts, 1, r0 > 0)
    return row_lse, col_lse


@tiles.quiet_under_interpreter
def lse_backward_prefixes(x, y, scale, dims, row_scale, col_scale, row_shift, col_shift, g_row, g_col,
                          rows: bool, cols: bool):
    """-> (gy [M, D], gx [N, D], row_gs [K, M], col_gs [K, N]) in the math dtype (``primitives.shared.Kernels``):
    features ``[d_{s-1}, d_s)`` of gy hold ``sum_{k >= s} (a^k b^k.T * G^k) @ y`` there, 0 past d_K."""
    x, y, d_in = tiles.operands(x, y)
    (m, d), n, k = x.shape, y.shape[0], len(dims)
    acc = tiles.math_dtype(x.dtype)
    row_gs, col_gs = x.new_zeros((k, m), dtype=acc), x.new_zeros((k, n), dtype=acc)
    if m == 0 or n == 0 or k == 0 or not (rows or cols):
        return x.new_zeros((m, d_in), dtype=acc), x.new_zeros((n, d_in), dtype=acc), row_gs, col_gs
    gy, gx = x.new_empty((m, d), dtype=acc), x.new_empty((n, d), dtype=acc)
    gy[:, dims[-1]:].zero_()  # past d_K: no prefix reads those features; below it every element is written
    gx[:, dims[-1]:].zero_()
    scale2 = tiles.scalar(scale, tiles.LOG2E, x)
    a, b, has_scales = _factors(row_scale, col_scale, x, acc)
    off = (scale2, scale2)  # pointers of a term that is off; never read
    row_term = (g_row.to(acc).contiguous(), (row_shift.to(acc) * tiles.LOG2E).contiguous()) if rows else off
    col_term = (g_col.to(acc).contiguous(), (col_shift.to(acc) * tiles.LOG2E).contiguous()) if cols else off
    dims_t = torch.tensor(list(dims), dtype=torch.int32, device=x.device)
    block_r, block_c = plan.prefix_gradient_blocks(m, n, k, x.dtype, tiles.INTERPRET, plan.workspace_budget())
    smallest = plan.smallest_tile_edge(x.dtype, tiles.INTERPRET, ("prefixes",))
    h = x.new_empty(k * block_r * block_c, dtype=plan.g_dtype(x.dtype))
    row_part = x.new_empty(k * block_r * triton.cdiv(block_c, smallest), dtype=acc)
    col_part = x.new_empty(k * triton.cdiv(block_r, smallest) * block_c, dtype=acc)
    block_d = plan.feature_block(d, x.dtype, tiles.INTERPRET)
    for r0, r1 in plan.ranges(m, block_r):
        for c0, c1 in plan.ranges(n, block_c):
            grid = tiles.TileGrid(r1 - r0, c1 - c0)
            _prefix_gradient_kernel[grid](x, y, scale2, dims_t, a, b, *row_term, *col_term, row_part, col_part, h, r0,
                                          r1, c0, c1, m, n, d, k, has_scales, int(rows), int(cols), BLOCK_D=block_d,
                                          PRECISION=tiles.dot_precision(x.dtype))
            tiles_a, tiles_b = grid.launched()
            # sums of G * S2 in the block's tiles, in a fixed order; S2 = S log2(e)
            row_gs[:, r0:r1] += row_part[: k * (r1 - r0) * tiles_b].view(k, r1 - r0, tiles_b).sum(2) * tiles.LN2
            col_gs[:, c0:c1] += col_part[: k * tiles_a * (c1 - c0)].view(k, tiles_a, c1 - c0).sum(1) * tiles.LN2
            slot = (r1 - r0) * (c1 - c0)
            for q, (lo, hi) in enumerate(_segments(dims)):
                suffix = h[q * slot:(q + 1) * slot]
                gemm.accumulate_product(gy[r0:r1, lo:hi], suffix, False, y[c0:c1, lo:hi], accumulate=c0 > 0)
                gemm.accumulate_product(gx[c0:c1, lo:hi], suffix, True, x[r0:r1, lo:hi], accumulate=r0 > 0)
    return tiles.unpadded(gy, d_in), tiles.unpadded(gx, d_in), row_gs, col_gs


@tiles.quiet_under_interpreter
def pointwise_prefixes(x, y, scale, row_bias, dims, row_scale, col_scale, row_keys, col_keys, kind: int, g_row,
                       want_grads: bool):
    """-> (row sums [K, M], gy, gx, d_bias [M], row_gs [K, M], col_gs [K, N]) in the math dtype
    (``primitives.shared.Kernels.pointwise_prefixes``): the loss of every prefix from one pass over the
    features, with the gradients formed beside it (``pointwise.py``'s way) and summed into the
    features segment by segment from the suffix sums of the K gradient tiles (the backward's way)."""
    x, y, d_in = tiles.operands(x, y)
    (m, d), n, k = x.shape, y.shape[0], len(dims)
    acc = tiles.math_dtype(x.dtype)
    row_sum = x.new_zeros((k, m), dtype=acc)
    empty = x.new_empty(0, dtype=acc)
    if want_grads:
        d_bias, row_gs, col_gs = x.new_zeros(m, dtype=acc), x.new_zeros((k, m), dtype=acc), \
            x.new_zeros((k, n), dtype=acc)
    if m == 0 or n == 0 or k == 0:
        if not want_grads:
            return row_sum, empty, empty, empty, empty, empty
        return (row_sum, x.new_zeros((m, d_in), dtype=acc), x.new_zeros((n, d_in), dtype=acc), d_bias, row_gs,
                col_gs)
    consts = torch.cat([tiles.scalar(scale, tiles.LOG2E, x), x.new_full((1,), tiles.LN2, dtype=acc)])
    bias = x.new_zeros(m, dtype=acc) if row_bias is None else (row_bias.to(acc) * tiles.LOG2E).contiguous()
    a, b, has_scales = _factors(row_scale, col_scale, x, acc)
    keys = tiles.keys_or_dummy(row_keys, x), tiles.keys_or_dummy(col_keys, x)
    dims_t = torch.tensor(list(dims), dtype=torch.int32, device=x.device)
    block_r, block_c = plan.prefix_pointwise_blocks(m, n, k, x.dtype, tiles.INTERPRET, plan.workspace_budget(),
                                                    want_grads)
    smallest = plan.smallest_tile_edge(x.dtype, tiles.INTERPRET, ("prefix_pointwise",))
    loss_part = x.new_empty(k * block_r * triton.cdiv(block_c, smallest), dtype=acc)
    if want_grads:
        gy, gx = x.new_empty((m, d), dtype=acc), x.new_empty((n, d), dtype=acc)
        gy[:, dims[-1]:].zero_()  # past d_K: no prefix reads those features; below it every element is written
        gx[:, dims[-1]:].zero_()
        weight = x.new_ones((k, m), dtype=acc) if g_row is None else g_row.to(acc).contiguous()
        h = x.new_empty(k * block_r * block_c, dtype=plan.g_dtype(x.dtype))
        dsum_part = x.new_empty(block_r * triton.cdiv(block_c, smallest), dtype=acc)
        row_part = x.new_empty(k * block_r * triton.cdiv(block_c, smallest), dtype=acc)
        col_part = x.new_empty(k * triton.cdiv(block_r, smallest) * block_c, dtype=acc)
    else:  # pointers never read or written, of the types the gradients' have: one compiled kernel
        weight = dsum_part = row_part = col_part = consts
        h = x.new_empty(1, dtype=plan.g_dtype(x.dtype))
    block_d = plan.feature_block(d, x.dtype, tiles.INTERPRET)
    for r0, r1 in plan.ranges(m, block_r):
        for c0, c1 in plan.ranges(n, block_c):
            grid = tiles.TileGrid(r1 - r0, c1 - c0)
            _prefix_pointwise_kernel[grid](x, y, consts, dims_t, a, b, *keys, bias, weight, loss_part, dsum_part,
                                           row_part, col_part, h, r0, r1, c0, c1, m, n, d, k, has_scales, kind,
                                           int(row_keys is not None), int(want_grads), BLOCK_D=block_d,
                                           PRECISION=tiles.dot_precision(x.dtype))
            tiles_a, tiles_b = grid.launched()
            row_sum[:, r0:r1] += loss_part[: k * (r1 - r0) * tiles_b].view(k, r1 - r0, tiles_b).sum(2)
            if not want_grads:
                continue
            d_bias[r0:r1] += dsum_part[: (r1 - r0) * tiles_b].view(r1 - r0, tiles_b).sum(1)
            # sums of D * T2 in the block's tiles, in a fixed order; T2 = T log2(e)
            row_gs[:, r0:r1] += row_part[: k * (r1 - r0) * tiles_b].view(k, r1 - r0, tiles_b).sum(2) * tiles.LN2
            col_gs[:, c0:c1] += col_part[: k * tiles_a * (c1 - c0)].view(k, tiles_a, c1 - c0).sum(1) * tiles.LN2
            slot = (r1 - r0) * (c1 - c0)
            for q, (lo, hi) in enumerate(_segments(dims)):
                suffix = h[q * slot:(q + 1) * slot]
                gemm.accumulate_product(gy[r0:r1, lo:hi], suffix, False, y[c0:c1, lo:hi], accumulate=c0 > 0)
                gemm.accumulate_product(gx[c0:c1, lo:hi], suffix, True, x[r0:r1, lo:hi], accumulate=r0 > 0)
    if not want_grads:
        return row_sum, empty, empty, empty, empty, empty
    return row_sum, tiles.unpadded(gy, d_in), tiles.unpadded(gx, d_in), d_bias, row_gs, col_gs
