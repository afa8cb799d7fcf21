"""The ``chunked`` backend's ``lse_prefixes`` kernels (see ``primitives/``): the row / column
log-sum-exps of K similarity matrices, one per nested feature prefix ``d_1 < ... < d_K``,

    S^k_ij = scale * a^k_i * b^k_j * P^k_ij,    P^k_ij = <x_i[:d_k], y_j[:d_k]>

(``a``, ``b``: per-prefix row and column factors, e.g. inverse prefix norms), in one pass over the
features: a prefix dot product is a partial sum of the next one, so each tile's ``P`` grows segment
``[d_{k-1}, d_k)`` by segment and every ``S^k`` is read off it on the way. The GEMM work is that of
one loss at ``d_K``; only the exps grow with K.

Backward, per tile: the same pass forms every ``G^k = dLoss/dS^k``, its row and column sums of
``G^k * S^k`` (the gradients of ``a`` and ``b`` times ``a`` and ``b``), and ``H^k = a^k b^k G^k``. Segment
s of x's gradient is ``sum_{k >= s} H^k @ y[:, seg s]``: the suffix sums of the H^k, one GEMM per
segment, so the two gradient GEMMs also cost one loss's. The K H-tiles are held at once; the tile
is cut K + 3 ways so that the scratch memory is that of the two-tile ``lse``, whatever K.

``pointwise_prefixes``: SigLIP's (and MW's) sums of a pointwise loss of ``S^k + row_bias`` at each prefix
in the same pass. Like ``pointwise`` it forms the gradients beside the loss when asked (each prefix's
``D^k = g_row^k * d loss / dS^k`` in its H tile), then the same suffix-sum GEMMs.
"""
from __future__ import annotations

import torch

from . import tiles
from .lse import _tile_lse
from .pointwise import _pointwise_tile
from .tiles import Scratch, each_tile, keyed_mask


def _segments(dims):
    """``[d_{k-1}, d_k)`` for each prefix, ``d_0 = 0``."""
    return [slice(a, b) for a, b in zip([0, *dims[:-1]], dims)]


def _scaled(out, p, scale, q, row_scale, col_scale, rs, cs):
    """``out = scale * a^q * b^q * p`` over the tile."""
    torch.mul(p, scale, out=out)
    if row_scale is not None:
        out.mul_(row_scale[q, rs, None]).mul_(col_scale[q, None, cs])
    return out


def _grow(p, x, y, seg, rs, cs, first: bool):
    """``p += x[rs, seg] @ y[cs, seg].T`` (``p =`` for the first segment)."""
    if first:
        return torch.mm(x[rs, seg], y[cs, seg].T, out=p)
    return p.addmm_(x[rs, seg], y[cs, seg].T)


def lse_forward_prefixes(x, y, scale, dims, row_scale, col_scale, rows: bool, cols: bool):
    m, n, k = x.shape[0], y.shape[0], len(dims)
    row_lse = x.new_full((k, m if rows else 0), float("-inf"))
    col_lse = x.new_full((k, n if cols else 0), float("-inf"))
    scratch = Scratch(x, m, n, 3, tiles.TILE_ELEMENTS * 2 // 3)
    for rs, cs in each_tile(m, n, tiles.TILE_ELEMENTS * 2 // 3):
        p, s, work = scratch.views(rs, cs)
        for q, seg in enumerate(_segments(dims)):
            _grow(p, x, y, seg, rs, cs, q == 0)
            _scaled(s, p, scale, q, row_scale, col_scale, rs, cs)
            if rows:
                row_lse[q, rs] = torch.logaddexp(row_lse[q, rs], _tile_lse(s, 1, work))
            if cols:
                col_lse[q, cs] = torch.logaddexp(col_lse[q, cs], _tile_lse(s, 0, work))
    return row_lse, col_lse


def _feature_grads(h, x, y, segments, rs, cs, gy, gx):
    """``H^q += H^{q+1}`` (the suffix sums, last to first), then segment q's two gradient GEMMs."""
    for q in reversed(range(len(segments))):
        if q + 1 < len(segments):
            h[q].add_(h[q + 1])
        gy[rs, segments[q]].addmm_(h[q], y[cs, segments[q]])
        gx[cs, segments[q]].addmm_(h[q].T, x[rs, segments[q]])


def lse_backward_prefixes(x, y, scale, dims, row_scale, col_scale, row_shift, col_shift, g_row, g_col,
                          rows: bool, cols: bool):
    m, n, k = x.shape[0], y.shape[0], len(dims)
    gy, gx = torch.zeros_like(x), torch.zeros_like(y)  # sum_k H^k @ y and its transpose, segment by segment
    row_gs, col_gs = x.new_zeros(k, m), x.new_zeros(k, n)  # sum_j G^k_ij S^k_ij, sum_i G^k_ij S^k_ij
    elements = max(1, tiles.TILE_ELEMENTS * 2 // (k + 3))  # read at call time: tests shrink it
    scratch = Scratch(x, m, n, k + 3, elements)
    segments = _segments(dims)
    for rs, cs in each_tile(m, n, elements):
        p, s, work, *h = scratch.views(rs, cs)
        for q, seg in enumerate(segments):
            _grow(p, x, y, seg, rs, cs, q == 0)
            _scaled(s, p, scale, q, row_scale, col_scale, rs, cs)
            g = h[q]
            if rows:  # d lse_i / d S_ij = softmax over j
                torch.sub(s, row_shift[q, rs, None], out=g).exp_().mul_(g_row[q, rs, None])
            if cols:
                col = torch.sub(s, col_shift[q, None, cs], out=work).exp_().mul_(g_col[q, None, cs])
                g = g.add_(col) if rows else g.copy_(col)
            s.mul_(g)
            row_gs[q, rs] += s.sum(1)
            col_gs[q, cs] += s.sum(0)
            if row_scale is not None:
                g.mul_(row_scale[q, rs, None]).mul_(col_scale[q, None, cs])
        _feature_grads(h, x, y, segments, rs, cs, gy, gx)
    return gy, gx, row_gs, col_gs


def pointwise_prefixes(x, y, scale, row_bias, dims, row_scale, col_scale, row_keys, col_keys, kind: int, g_row,
                       want_grads: bool):
    m, n, k = x.shape[0], y.shape[0], len(dims)
    siglip = kind == 0  # primitives.shared.POINTWISE_KINDS: 0 SigLIP, 1 MW
    row_sum = x.new_zeros(k, m)
    empty = x.new_empty(0)
    if want_grads:
        gy, gx, d_bias = torch.zeros_like(x), torch.zeros_like(y), x.new_zeros(m)
        row_gs, col_gs = x.new_zeros(k, m), x.new_zeros(k, n)  # sum_j D^k_ij T^k_ij, sum_i D^k_ij T^k_ij
    else:
        gy = gx = d_bias = row_gs = col_gs = empty
    # the loss alone: P, T and a work tile; with gradients also the K H-tiles, as lse_backward_prefixes
    count = k + 3 if want_grads else 3
    elements = max(1, tiles.TILE_ELEMENTS * 2 // count)  # read at call time: tests shrink it
    scratch = Scratch(x, m, n, count, elements)
    segments = _segments(dims)
    for rs, cs in each_tile(m, n, elements):
        p, t, work, *h = scratch.views(rs, cs)
        keyed = keyed_mask(row_keys, col_keys, rs, cs)
        for q, seg in enumerate(segments):
            _grow(p, x, y, seg, rs, cs, q == 0)
            _scaled(t, p, scale, q, row_scale, col_scale, rs, cs)  # T^q = scale a^q b^q P^q, S^q = T^q + bias
            s = h[q].copy_(t) if want_grads else t
            if row_bias is not None:
                s.add_(row_bias[rs, None])
            tile_sum, d = _pointwise_tile(s, keyed, siglip, work)
            row_sum[q, rs] += tile_sum
            if not want_grads:
                continue
            if g_row is not None:
                d.mul_(g_row[q, rs, None])
            d_bias[rs] += d.sum(1)
            t.mul_(d)  # d S^q / d a^q_i = T^q_ij / a^q_i: the factors' gradients from D^q T^q
            row_gs[q, rs] += t.sum(1)
            col_gs[q, cs] += t.sum(0)
            if row_scale is not None:
                d.mul_(row_scale[q, rs, None]).mul_(col_scale[q, None, cs])
        if want_grads:
            _feature_grads(h, x, y, segments, rs, cs, gy, gx)
    return row_sum, gy, gx, d_bias, row_gs, col_gs
