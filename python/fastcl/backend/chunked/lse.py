"""The ``chunked`` backend's ``lse`` kernels (see ``primitives/``): the masked row / column
log-sum-exp of S in plain PyTorch tiles (``tiles.py``).

Forward: one pass over the tiles, merging row and column log-sum-exps with ``logaddexp``.
Backward: recompute each tile once, form ``G = dLoss/dS`` in place from the saved statistics, and
feed two GEMMs.
"""
from __future__ import annotations

import torch

from .tiles import Scratch, each_tile, keyed_mask, logits_into


def _tile_lse(s: torch.Tensor, dim: int, work: torch.Tensor) -> torch.Tensor:
    """log-sum-exp of tile ``s`` along ``dim`` with ``work`` as scratch. An infinite maximum shifts
    by 0, so an all -inf line gives -inf and a +inf entry gives +inf (NaN stays NaN)."""
    shift = s.amax(dim, keepdim=True)
    shift.masked_fill_(shift.isinf(), 0.0)
    return torch.sub(s, shift, out=work).exp_().sum(dim).log_().add_(shift.squeeze(dim))


def _left_out(row_keys, col_keys, exclude, rs: slice, cs: slice) -> torch.Tensor | None:
    """Bool tile of the pairs that leave the log-sum-exps: keyed, or listed in ``exclude [M, E]``
    (row i's column indices, -1 padded)."""
    mask = keyed_mask(row_keys, col_keys, rs, cs)
    if exclude is None:
        return mask
    listed = exclude[rs]
    inside = (listed >= cs.start) & (listed < cs.stop)
    hit = torch.zeros(listed.shape[0], cs.stop - cs.start, dtype=torch.bool, device=listed.device)
    row = torch.arange(listed.shape[0], device=listed.device)[:, None].expand_as(listed)
    hit[row[inside], listed[inside] - cs.start] = True
    return hit if mask is None else mask | hit


def lse_forward_excluding(x, y, scale, row_keys, col_keys, exclude, rows: bool, cols: bool):
    """``lse_forward`` with the pairs listed in ``exclude`` left out too (op ``lse_exclude``)."""
    return lse_forward(x, y, scale, row_keys, col_keys, rows, cols, exclude)


def lse_backward_excluding(x, y, scale, row_keys, col_keys, exclude, row_shift, col_shift, g_row, g_col,
                           rows: bool, cols: bool):
    return lse_backward(x, y, scale, row_keys, col_keys, row_shift, col_shift, g_row, g_col, rows, cols, exclude)


def lse_forward(x, y, scale, row_keys, col_keys, rows: bool, cols: bool, exclude=None):
    m, n = x.shape[0], y.shape[0]
    row_lse = x.new_full((m if rows else 0,), float("-inf"))
    col_lse = x.new_full((n if cols else 0,), float("-inf"))
    scratch = Scratch(x, m, n)
    for rs, cs in each_tile(m, n):
        s, work = scratch.views(rs, cs)
        logits_into(s, x, y, scale, rs, cs)
        keyed = _left_out(row_keys, col_keys, exclude, rs, cs)
        if keyed is not None:
            s.masked_fill_(keyed, float("-inf"))
        if rows:
            row_lse[rs] = torch.logaddexp(row_lse[rs], _tile_lse(s, 1, work))
        if cols:
            col_lse[cs] = torch.logaddexp(col_lse[cs], _tile_lse(s, 0, work))
    return row_lse, col_lse


def lse_backward(x, y, scale, row_keys, col_keys, row_shift, col_shift, g_row, g_col, rows: bool, cols: bool,
                 exclude=None):
    gy, gx = torch.zeros_like(x), torch.zeros_like(y)  # G @ y, G.T @ x
    row_shift, g_row = row_shift[:, None], g_row[:, None]
    col_shift, g_col = col_shift[None, :], g_col[None, :]
    scratch = Scratch(x, x.shape[0], y.shape[0])
    for rs, cs in each_tile(x.shape[0], y.shape[0]):
        s, g = scratch.views(rs, cs)
        logits_into(s, x, y, scale, rs, cs)
        keyed = _left_out(row_keys, col_keys, exclude, rs, cs)
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
