"""NT-Xent with one term per positive pair, as pytorch-metric-learning defines it.

Rows ``x [M, D]`` with group ids ``gx``, columns ``y [N, D]`` with group ids ``gy`` (one numbering),
``S = s x y^T``. A pair ``(i, j)`` is positive when ``gx_i == gy_j`` (less at most one skipped
column per row, ``skip[i]``: the row's own copy), negative otherwise. Every positive pair is a term:

    l_ip = -log( e^{S_ip} / (e^{S_ip} + sum_{n in N(i)} e^{S_in}) + tiny )
         = -log( e^{-softplus(L_i - S_ip)} + tiny ),        L_i = lse_{n in N(i)} S_in

so the other positives of row ``i`` are not in its denominator (unlike SupCon). ``tiny`` is
``torch.finfo(dtype).tiny`` of the features' dtype, as pytorch-metric-learning adds it: it caps a
pair's loss at ``-log(tiny)`` (87.3 in float32, 9.7 in float16).

``L`` is one pass of the fused engine (the negatives are the pairs of different groups: group ids as
keys). The positive logits are a gather over the pair list: ``O(P * D)`` work and ``O(P)`` memory
for ``P`` positive pairs (``2B`` for two views of ``B`` samples), never ``O(P * D)`` memory.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._common import arange, upcast


def positive_pairs(gx: torch.Tensor, gy: torch.Tensor, skip: torch.Tensor | None):
    """Every ``(i, j)`` with ``gx_i == gy_j`` and ``j != skip[i]``, in row-major order (the order of
    ``torch.where`` on the ``[M, N]`` match matrix, which this never builds): ``(rows, cols)``."""
    groups = gx.shape[0] + gy.shape[0]  # an upper bound on the group ids
    order = torch.argsort(gy, stable=True)  # columns by group, ascending within a group
    per_group = torch.bincount(gy, minlength=groups)
    first = per_group.cumsum(0) - per_group  # where each group starts in `order`
    n_match = per_group[gx]
    rows = torch.repeat_interleave(arange(gx.shape[0], gx), n_match)
    offset = arange(rows.shape[0], gx) - torch.repeat_interleave(n_match.cumsum(0) - n_match, n_match)
    cols = order[first[gx[rows]] + offset]
    if skip is not None:
        kept = cols != skip[rows]
        rows, cols = rows[kept], cols[kept]
    return rows, cols


_PAIR_CHUNK = 1 << 20  # elements of the [pairs, D] gathers held at once


class _PairDots(torch.autograd.Function):
    """``<x_{rows[k]}, y_{cols[k]}>`` for ``k < P``, in chunks, saving only ``x``, ``y`` and the
    indices (autograd through ``x[rows] * y[cols]`` would save two ``[P, D]`` gathers)."""

    @staticmethod
    def forward(ctx, x, y, rows, cols):
        ctx.save_for_backward(x, y, rows, cols)
        out = x.new_empty(rows.shape[0])
        for c in _chunks(rows.shape[0], x.shape[1]):
            out[c] = (x[rows[c]] * y[cols[c]]).sum(-1)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, y, rows, cols = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[:2]
        gx = torch.zeros_like(x) if need_x else None
        gy = torch.zeros_like(y) if need_y else None
        for c in _chunks(rows.shape[0], x.shape[1]):
            g = grad[c, None]
            if need_x:
                gx.index_add_(0, rows[c], g * y[cols[c]])
            if need_y:
                gy.index_add_(0, cols[c], g * x[rows[c]])
        return gx, gy, None, None


def _chunks(pairs: int, width: int):
    step = max(1, _PAIR_CHUNK // max(width, 1))
    return (slice(i, min(i + step, pairs)) for i in range(0, pairs, step))


def pair_ntxent_terms(engine, x, gx, y, gy, s, skip, tiny: float):
    """``(l, rows, cols)``: the term of every positive pair and the pair; ``engine=None``: the
    reference on the materialised ``S``. ``y=None``: the rows against themselves, each skipping itself."""
    self_contrast = y is None
    if self_contrast:
        y, gy, skip = x, gx, arange(x.shape[0], x)
    rows, cols = positive_pairs(gx, gy, skip)
    xa, ya = upcast(x), upcast(y)
    if engine is None:
        S = s * xa @ ya.T
        neg_lse = S.masked_fill(gx[:, None] == gy[None, :], float("-inf")).logsumexp(1)
        pos = S[rows, cols]
    else:
        # Keys = groups: same-group pairs (the positives, and the row itself) leave the log-sum-exp.
        # With y = x one key tensor for both sides lets the engine use its symmetric kernels.
        neg_lse = engine.lse(x, y, s, keys=(gx, gx if self_contrast else gy)).row_lse
        pos = s * _PairDots.apply(xa, ya, rows, cols)
    loss = F.softplus(neg_lse[rows] - pos)  # -log(e^pos / (e^pos + e^L)); L = -inf: 0
    return -torch.logaddexp(-loss, torch.full_like(loss, math.log(tiny))), rows, cols
