"""The ``chunked`` backend's ``pointwise`` kernel (see ``primitives/``): SigLIP's and MW's sums of a
pointwise loss of S, and their gradients, in plain PyTorch tiles (``tiles.py``): one pass computes
each tile's loss and, if asked, feeds its gradient to two GEMMs at once.
"""
from __future__ import annotations

import torch

from .tiles import Scratch, each_tile, keyed_mask, logits_into


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
    siglip = kind == 0  # primitives.shared.POINTWISE_KINDS: 0 SigLIP, 1 MW
    row_sum = x.new_zeros(m)
    empty = x.new_empty(0)
    gy, gx, d_bias = (torch.zeros_like(x), torch.zeros_like(y), x.new_zeros(m)) if want_grads else (empty,) * 3
    scratch = Scratch(x, m, n)
    for rs, cs in each_tile(m, n):
        s, work = scratch.views(rs, cs)
        logits_into(s, x, y, scale, rs, cs)
        if row_bias is not None:
            s.add_(row_bias[rs, None])
        tile_sum, d = _pointwise_tile(s, keyed_mask(row_keys, col_keys, rs, cs), siglip, work)
        row_sum[rs] += tile_sum
        if want_grads:
            if g_row is not None:
                d.mul_(g_row[rs, None])
            gy[rs].addmm_(d, y[cs])
            gx[cs].addmm_(d.T, x[rs])
            d_bias[rs] += d.sum(1)
    return row_sum, gy, gx, d_bias
