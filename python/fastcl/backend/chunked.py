"""The ``chunked`` backend: the engine's two primitives in plain PyTorch tiles.

This is the portable fallback (any device torch runs on) and the executable description of the
algorithm every kernel follows. ``S = scale * x @ y.T`` is only ever formed one tile at a time:

    x  [M, D]  rows            y  [N, D]  columns
    S  tile [br, bc] = scale * x[rows] @ y[cols].T      (+ row_bias[rows] for pointwise)
    keys = (row_keys [M], col_keys [N]) or None: pairs with row_keys[i] == col_keys[j] are the
           "keyed" pairs, excluded from the log-sum-exp, positives for SigLIP, excluded for MW.

Forward: one pass over the tiles, merging row and column log-sum-exps with ``logaddexp``.
Backward: recompute each tile once, form ``G = dLoss/dS`` from the saved statistics, and feed two
GEMMs. Only ``x``, ``y`` and O(M + N) statistics are saved; nothing of size M x N is allocated
(the largest temporary is a few tiles of ``TILE_ELEMENTS``). Inputs are upcast to the math dtype
(float32, or float64 for float64 inputs) once; gradients come back in the input dtype.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .._checks import math_dtype

# One S tile holds at most this many elements (8 MiB in float32); a pass keeps a few alive.
TILE_ELEMENTS = 1 << 21
# Column blocks are capped so that row blocks stay tall enough for an efficient GEMM.
MAX_TILE_COLS = 8192

Keys = tuple[torch.Tensor, torch.Tensor] | None


def _tile_shape(m: int, n: int) -> tuple[int, int]:
    bc = min(n, MAX_TILE_COLS)
    return max(1, min(m, TILE_ELEMENTS // bc)), bc


def _tiles(m: int, n: int) -> Iterator[tuple[slice, slice]]:
    br, bc = _tile_shape(m, n)
    for r0 in range(0, m, br):
        for c0 in range(0, n, bc):
            yield slice(r0, min(r0 + br, m)), slice(c0, min(c0 + bc, n))


class _Scratch:
    """Two tile buffers reused across a pass: no allocation (and no page faults) per tile, and a
    fixed peak of two tiles whatever the problem size."""

    def __init__(self, like: torch.Tensor, m: int, n: int):
        shape = _tile_shape(m, n)
        self.a, self.b = like.new_empty(shape), like.new_empty(shape)

    def views(self, rs: slice, cs: slice) -> tuple[torch.Tensor, torch.Tensor]:
        r, c = rs.stop - rs.start, cs.stop - cs.start
        return self.a[:r, :c], self.b[:r, :c]


def _keyed(keys: Keys, rs: slice, cs: slice) -> torch.Tensor | None:
    """Bool tile marking the keyed pairs, described by two index vectors, never stored whole."""
    if keys is None:
        return None
    return keys[0][rs, None] == keys[1][None, cs]


def _upcast(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = math_dtype(x.dtype)
    xa = x.to(acc)
    return xa, (xa if y is x else y.to(acc))


def _logits(out, xa, ya, scale, rs, cs) -> torch.Tensor:
    return torch.mm(xa[rs], ya[cs].T, out=out).mul_(scale)


def _tile_lse(s: torch.Tensor, dim: int, work: torch.Tensor) -> torch.Tensor:
    """log-sum-exp of tile ``s`` along ``dim`` with ``work`` as scratch. An infinite maximum shifts
    by 0, so an all -inf line gives -inf and a +inf entry gives +inf (NaN stays NaN)."""
    shift = s.amax(dim, keepdim=True)
    shift.masked_fill_(shift.isinf(), 0.0)
    return torch.sub(s, shift, out=work).exp_().sum(dim).log_().add_(shift.squeeze(dim))


class _LSE(torch.autograd.Function):
    """Row and/or column log-sum-exp of S over the non-keyed pairs."""

    @staticmethod
    def forward(ctx, x, y, scale, row_keys, col_keys, rows: bool, cols: bool):
        keys = None if row_keys is None else (row_keys, col_keys)
        xa, ya = _upcast(x, y)
        m, n = x.shape[0], y.shape[0]
        row_lse = xa.new_full((m if rows else 0,), float("-inf"))
        col_lse = xa.new_full((n if cols else 0,), float("-inf"))
        scratch = _Scratch(xa, m, n)
        for rs, cs in _tiles(m, n):
            s, work = scratch.views(rs, cs)
            _logits(s, xa, ya, scale, rs, cs)
            mask = _keyed(keys, rs, cs)
            if mask is not None:
                s.masked_fill_(mask, float("-inf"))
            if rows:
                row_lse[rs] = torch.logaddexp(row_lse[rs], _tile_lse(s, 1, work))
            if cols:
                col_lse[cs] = torch.logaddexp(col_lse[cs], _tile_lse(s, 0, work))
        ctx.save_for_backward(x, y, scale, row_lse, col_lse, row_keys, col_keys)
        ctx.flags = (rows, cols)
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, g_row, g_col):
        x, y, scale, row_lse, col_lse, row_keys, col_keys = ctx.saved_tensors
        rows, cols = ctx.flags
        keys = None if row_keys is None else (row_keys, col_keys)
        xa, ya = _upcast(x, y)
        # A fully keyed row has lse = -inf; its S entries are -inf too, so shifting by 0 gives
        # exp(-inf) = 0 instead of exp(-inf - -inf) = NaN.
        row_shift = row_lse.masked_fill(row_lse == float("-inf"), 0.0)[:, None]
        col_shift = col_lse.masked_fill(col_lse == float("-inf"), 0.0)[None, :]
        g_row, g_col = g_row[:, None], g_col[None, :]
        gy = torch.zeros_like(xa)  # G @ y   (dx = scale * gy)
        gx = torch.zeros_like(ya)  # G.T @ x (dy = scale * gx)
        scratch = _Scratch(xa, x.shape[0], y.shape[0])
        for rs, cs in _tiles(x.shape[0], y.shape[0]):
            s, g = scratch.views(rs, cs)
            _logits(s, xa, ya, scale, rs, cs)
            mask = _keyed(keys, rs, cs)
            if mask is not None:
                s.masked_fill_(mask, float("-inf"))
            if rows:  # d lse_i / d S_ij = softmax over j
                torch.sub(s, row_shift[rs], out=g).exp_().mul_(g_row[rs])
            if cols:  # in s's storage: the logits are not needed after this
                p = s.sub_(col_shift[:, cs]).exp_().mul_(g_col[:, cs])
                g = g.add_(p) if rows else p
            gy[rs].addmm_(g, ya[cs])
            gx[cs].addmm_(g.T, xa[rs])
        return _pair_grads(ctx, x, y, xa, scale, gy, gx) + (None, None, None, None)


def _pair_grads(ctx, x, y, xa, scale, gy, gx):
    """dx, dy, dscale from ``gy = G @ y`` and ``gx = G.T @ x`` (both consumed in place).

    ``x is y`` (self-similarity) needs no special case: autograd sums the two gradients."""
    # d/dscale sum_ij G_ij scale <x_i, y_j> = sum_i <x_i, (G y)_i>
    dscale = torch.dot(gy.reshape(-1), xa.reshape(-1)).to(scale.dtype) if ctx.needs_input_grad[2] else None
    dx = gy.mul_(scale).to(x.dtype) if ctx.needs_input_grad[0] else None
    dy = gx.mul_(scale).to(y.dtype) if ctx.needs_input_grad[1] else None
    return dx, dy, dscale


def _pointwise_tile(s: torch.Tensor, keyed: torch.Tensor | None, kind: str, work: torch.Tensor):
    """Row sums of the element losses, and d loss / d S in ``s``'s own storage, for one tile.

    siglip: keyed pairs are positives (z = +1), others negatives (z = -1); loss softplus(-z S).
    mw:     keyed pairs (the targets) are excluded; every other pair costs softplus(S).
    """
    if keyed is not None:
        if kind == "siglip":
            s[keyed] = -s[keyed]  # s = -z S
        else:
            s.masked_fill_(keyed, float("-inf"))  # softplus(-inf) = sigmoid(-inf) = 0
    # softplus(s) = max(s, 0) + log1p(exp(-|s|)), summed per row without a temporary tile
    row_sum = torch.clamp(s, min=0, out=work).sum(1)
    row_sum += torch.abs(s, out=work).neg_().exp_().log1p_().sum(1)
    d = s.sigmoid_()
    if kind == "siglip" and keyed is not None:
        d[keyed] = -d[keyed]  # d loss/dS = -z sigmoid(-z S)
    return row_sum, d


def _pointwise_pass(x, y, scale, row_bias, keys, kind, g_row, want_grads):
    """One pass: per-row loss sums and, if asked, gradients weighted by g_row [M] (or 1)."""
    xa, ya = _upcast(x, y)
    m, n = x.shape[0], y.shape[0]
    row_sum = xa.new_zeros(m)
    if want_grads:
        gy, gx, d_bias = torch.zeros_like(xa), torch.zeros_like(ya), xa.new_zeros(m)
    scratch = _Scratch(xa, m, n)
    for rs, cs in _tiles(m, n):
        s, work = scratch.views(rs, cs)
        _logits(s, xa, ya, scale, rs, cs)
        if row_bias is not None:
            s.add_(row_bias[rs, None])
        tile_sum, d = _pointwise_tile(s, _keyed(keys, rs, cs), kind, work)
        row_sum[rs] += tile_sum
        if want_grads:
            if g_row is not None:
                d.mul_(g_row[rs, None])
            gy[rs].addmm_(d, ya[cs])
            gx[cs].addmm_(d.T, xa[rs])
            d_bias[rs] += d.sum(1)
    if not want_grads:
        return row_sum, xa, None, None, None
    return row_sum, xa, gy, gx, d_bias


class _Pointwise(torch.autograd.Function):
    """Sum over pairs of an element-wise loss of S (+ row_bias): per row, or in total.

    With ``reduce`` the upstream gradient is one scalar, so the gradients are computed in the same
    pass as the loss and backward only rescales them (3 GEMMs' worth instead of 4). Per-row output
    has per-row upstream gradients, so backward recomputes the tiles.
    """

    @staticmethod
    def forward(ctx, x, y, scale, row_bias, row_keys, col_keys, kind: str, reduce: bool):
        keys = None if row_keys is None else (row_keys, col_keys)
        want = reduce and any(ctx.needs_input_grad[:4])
        row_sum, xa, gy, gx, d_bias = _pointwise_pass(x, y, scale, row_bias, keys, kind, None, want)
        ctx.reduce, ctx.kind = reduce, kind
        if reduce:
            grads = _pair_grads(ctx, x, y, xa, scale, gy, gx) if want else (None, None, None)
            ctx.save_for_backward(*grads, d_bias)
            return row_sum.sum()
        ctx.save_for_backward(x, y, scale, row_bias, row_keys, col_keys)
        return row_sum

    @staticmethod
    def backward(ctx, g):
        if ctx.reduce:
            dx, dy, dscale, d_bias = ctx.saved_tensors
            grads = [None if t is None else t * g.to(t.dtype) for t in (dx, dy, dscale, d_bias)]
        else:
            x, y, scale, row_bias, row_keys, col_keys = ctx.saved_tensors
            keys = None if row_keys is None else (row_keys, col_keys)
            _, xa, gy, gx, d_bias = _pointwise_pass(x, y, scale, row_bias, keys, ctx.kind, g, True)
            grads = [*_pair_grads(ctx, x, y, xa, scale, gy, gx), d_bias]
        if not ctx.needs_input_grad[3]:
            grads[3] = None
        return (*grads, None, None, None, None)


def _split(keys: Keys):
    return (None, None) if keys is None else keys


def lse(x, y, scale, *, keys: Keys = None, rows: bool = True, cols: bool = False):
    """Row (``[M]``) and column (``[N]``) log-sum-exp of ``scale * x @ y.T`` over non-keyed pairs.

    Returns ``(row_lse or None, col_lse or None)`` in the math dtype.
    """
    row_lse, col_lse = _LSE.apply(x, y, scale, *_split(keys), rows, cols)
    return (row_lse if rows else None), (col_lse if cols else None)


def pointwise(x, y, scale, row_bias=None, *, keys: Keys = None, kind: str, reduce: bool):
    """``sum_j loss(scale <x_i, y_j> + row_bias_i)`` per row ``[M]``, or its total if ``reduce``."""
    return _Pointwise.apply(x, y, scale, row_bias, *_split(keys), kind, reduce)
