"""The ``chunked`` backend: the engine's kernels (see ``primitives.py``) in plain PyTorch tiles.

This is the portable fallback (any device torch runs on) and the executable description of the
algorithm every compiled kernel follows. ``S = scale * x @ y.T`` only exists one tile at a time:

    tile [br, bc] = scale * x[rows] @ y[cols].T     (+ row_bias[rows] for pointwise)

Forward: one pass over the tiles, merging row and column log-sum-exps with ``logaddexp``.
Backward: recompute each tile once, form ``G = dLoss/dS`` in place from the saved statistics, and
feed two GEMMs. Two scratch tiles are reused across a pass, so the peak extra memory is two tiles
of at most ``TILE_ELEMENTS`` whatever M and N are. Keyed pairs are described by index vectors and
turned into a bool tile on the fly, never stored whole.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .primitives import POINTWISE_KINDS, Engine

# One S tile holds at most this many elements (8 MiB in float32).
TILE_ELEMENTS = 1 << 21
# Column blocks are capped so that row blocks stay tall enough for an efficient GEMM.
MAX_TILE_COLS = 8192


def _tile_shape(m: int, n: int) -> tuple[int, int]:
    bc = min(n, MAX_TILE_COLS)
    return max(1, min(m, TILE_ELEMENTS // bc)), bc


def _tiles(m: int, n: int) -> Iterator[tuple[slice, slice]]:
    br, bc = _tile_shape(m, n)
    for r0 in range(0, m, br):
        for c0 in range(0, n, bc):
            yield slice(r0, min(r0 + br, m)), slice(c0, min(c0 + bc, n))


class _Scratch:
    """Two tile buffers reused across a pass: no allocation (and no page faults) per tile."""

    def __init__(self, like: torch.Tensor, m: int, n: int):
        shape = _tile_shape(m, n)
        self.a, self.b = like.new_empty(shape), like.new_empty(shape)

    def views(self, rs: slice, cs: slice) -> tuple[torch.Tensor, torch.Tensor]:
        r, c = rs.stop - rs.start, cs.stop - cs.start
        return self.a[:r, :c], self.b[:r, :c]


def _keyed(row_keys, col_keys, rs: slice, cs: slice) -> torch.Tensor | None:
    """Bool tile marking the keyed pairs."""
    return None if row_keys is None else row_keys[rs, None] == col_keys[None, cs]


def _logits(out, x, y, scale, rs, cs) -> torch.Tensor:
    return torch.mm(x[rs], y[cs].T, out=out).mul_(scale)


def _tile_lse(s: torch.Tensor, dim: int, work: torch.Tensor) -> torch.Tensor:
    """log-sum-exp of tile ``s`` along ``dim`` with ``work`` as scratch. An infinite maximum shifts
    by 0, so an all -inf line gives -inf and a +inf entry gives +inf (NaN stays NaN)."""
    shift = s.amax(dim, keepdim=True)
    shift.masked_fill_(shift.isinf(), 0.0)
    return torch.sub(s, shift, out=work).exp_().sum(dim).log_().add_(shift.squeeze(dim))


def lse_forward(x, y, scale, row_keys, col_keys, rows: bool, cols: bool):
    m, n = x.shape[0], y.shape[0]
    row_lse = x.new_full((m if rows else 0,), float("-inf"))
    col_lse = x.new_full((n if cols else 0,), float("-inf"))
    scratch = _Scratch(x, m, n)
    for rs, cs in _tiles(m, n):
        s, work = scratch.views(rs, cs)
        _logits(s, x, y, scale, rs, cs)
        keyed = _keyed(row_keys, col_keys, rs, cs)
        if keyed is not None:
            s.masked_fill_(keyed, float("-inf"))
        if rows:
            row_lse[rs] = torch.logaddexp(row_lse[rs], _tile_lse(s, 1, work))
        if cols:
            col_lse[cs] = torch.logaddexp(col_lse[cs], _tile_lse(s, 0, work))
    return row_lse, col_lse


def lse_backward(x, y, scale, row_keys, col_keys, row_shift, col_shift, g_row, g_col, rows: bool, cols: bool):
    gy, gx = torch.zeros_like(x), torch.zeros_like(y)  # G @ y, G.T @ x
    row_shift, g_row = row_shift[:, None], g_row[:, None]
    col_shift, g_col = col_shift[None, :], g_col[None, :]
    scratch = _Scratch(x, x.shape[0], y.shape[0])
    for rs, cs in _tiles(x.shape[0], y.shape[0]):
        s, g = scratch.views(rs, cs)
        _logits(s, x, y, scale, rs, cs)
        keyed = _keyed(row_keys, col_keys, rs, cs)
        if keyed is not None:
            s.masked_fill_(keyed, float("-inf"))
        if rows:  # d lse_i / d S_ij = softmax over j
            torch.sub(s, row_shift[rs], out=g).exp_().mul_(g_row[rs])
        if cols:  # in s's storage: the logits are not needed after this
            p = s.sub_(col_shift[:, cs]).exp_().mul_(g_col[:, cs])
            g = g.add_(p) if rows else p
        gy[rs].addmm_(g, y[cs])
        gx[cs].addmm_(g.T, x[rs])
    return gy, gx


def _pointwise_tile(s, keyed, siglip: bool, work):
    """Row sums of the element losses, and d loss / d S in ``s``'s own storage, for one tile.

    siglip: keyed pairs are positives (z = +1), others negatives (z = -1); loss softplus(-z S).
    mw:     keyed pairs (the targets) are excluded; every other pair costs softplus(S).
    """
    if keyed is not None:
        if siglip:
            s[keyed] = -s[keyed]  # s = -z S
        else:
            s.masked_fill_(keyed, float("-inf"))  # softplus(-inf) = sigmoid(-inf) = 0
    # softplus(s) = max(s, 0) + log1p(exp(-|s|)), summed per row without a temporary tile
    row_sum = torch.clamp(s, min=0, out=work).sum(1)
    row_sum += torch.abs(s, out=work).neg_().exp_().log1p_().sum(1)
    d = s.sigmoid_()
    if siglip and keyed is not None:
        d[keyed] = -d[keyed]  # d loss/dS = -z sigmoid(-z S)
    return row_sum, d


def pointwise(x, y, scale, row_bias, row_keys, col_keys, kind: int, g_row, want_grads: bool):
    m, n = x.shape[0], y.shape[0]
    siglip = kind == POINTWISE_KINDS["siglip"]
    row_sum = x.new_zeros(m)
    empty = x.new_empty(0)
    gy, gx, d_bias = (torch.zeros_like(x), torch.zeros_like(y), x.new_zeros(m)) if want_grads else (empty,) * 3
    scratch = _Scratch(x, m, n)
    for rs, cs in _tiles(m, n):
        s, work = scratch.views(rs, cs)
        _logits(s, x, y, scale, rs, cs)
        if row_bias is not None:
            s.add_(row_bias[rs, None])
        tile_sum, d = _pointwise_tile(s, _keyed(row_keys, col_keys, rs, cs), siglip, work)
        row_sum[rs] += tile_sum
        if want_grads:
            if g_row is not None:
                d.mul_(g_row[rs, None])
            gy[rs].addmm_(d, y[cs])
            gx[cs].addmm_(d.T, x[rs])
            d_bias[rs] += d.sum(1)
    return row_sum, gy, gx, d_bias


class _Kernels:
    lse_forward = staticmethod(lse_forward)
    lse_backward = staticmethod(lse_backward)
    pointwise = staticmethod(pointwise)


ENGINE = Engine("chunked", _Kernels())
