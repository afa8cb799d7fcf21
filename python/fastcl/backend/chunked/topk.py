"""The ``chunked`` backend's ``topk`` kernel, a streaming top-k (see ``fastcl.topk``): plain PyTorch tiles, any device.

Rows are taken a block at a time and the column tiles left to right. Each tile of S becomes integer
keys with the order of its values (NaN above +inf, -0.0 equal to +0.0, excluded pairs on a sentinel
below every real key). The tile's k best (``torch.topk``, with the tie rule enforced where equal
keys straddle the k-th place) are merged with the block's running k best, kept sorted by key
(descending) then column. Peak extra memory is a few tiles of ``TILE_ELEMENTS``, whatever M and N are.
"""
from __future__ import annotations

import torch

# One S tile holds at most this many elements; the merge makes a handful of same-sized temporaries
# (keys, masks, a running count), so this keeps the whole pass within a few tens of MiB.
TILE_ELEMENTS = 1 << 19
MAX_TILE_COLS = 4096

_KEY_DTYPES = {torch.float32: torch.int32, torch.float64: torch.int64}


def ordered_keys(s: torch.Tensor) -> torch.Tensor:
    """Integer keys with the order of ``s`` (consumes ``s``): non-negative floats keep their bits,
    negative ones flip their magnitude bits so that more negative means smaller."""
    s.add_(0.0)  # -0.0 + 0.0 = +0.0
    s.masked_fill_(s.isnan(), float("nan"))  # one NaN, the positive one: above +inf
    bits = s.view(_KEY_DTYPES[s.dtype])
    return bits ^ ((bits >> (bits.element_size() * 8 - 1)) & torch.iinfo(bits.dtype).max)


def key_values(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of ``ordered_keys`` (the same flip undoes itself)."""
    return (keys ^ ((keys >> (keys.element_size() * 8 - 1)) & torch.iinfo(keys.dtype).max)).view(dtype)


def _tile_shape(m: int, n: int) -> tuple[int, int]:
    bc = max(1, min(n, MAX_TILE_COLS))
    return max(1, min(m, TILE_ELEMENTS // bc)), bc


def _best(keys: torch.Tensor, kk: int) -> torch.Tensor:
    """Positions of the ``kk`` best keys of every row, ordered by key (descending) then position:
    among equal keys the lower position wins, also at the k-th place (where ``torch.topk`` may pick
    any of them)."""
    top = keys.topk(kk, dim=1)
    kth = top.values[:, -1:]
    if bool(((keys == kth).sum(1) > (top.values == kth).sum(1)).any()):  # ties straddle the k-th place
        above, tied = keys > kth, keys == kth
        take = above | (tied & (tied.cumsum(1) <= kk - above.sum(1, keepdim=True)))
        pos = take.nonzero()[:, 1].view(-1, kk)  # exactly kk per row, ascending
    else:
        pos = top.indices.sort(dim=1).values
    order = keys.gather(1, pos).sort(dim=1, descending=True, stable=True).indices  # stable: ties by position
    return pos.gather(1, order)


def topk(x, y, scale, k: int, row_keys, col_keys, exclude_diagonal: bool):
    """-> (values [M, k] in x's dtype, columns [M, k] int64). x, y contiguous, float32 or float64."""
    m, n = x.shape[0], y.shape[0]
    values, indices = x.new_empty((m, k)), torch.empty((m, k), dtype=torch.int64, device=x.device)
    if m == 0 or k == 0:
        return values, indices
    br, bc = _tile_shape(m, n)
    sentinel = torch.iinfo(_KEY_DTYPES[x.dtype]).min
    for r0 in range(0, m, br):
        rows = slice(r0, min(r0 + br, m))
        run_keys = torch.empty((rows.stop - r0, 0), dtype=_KEY_DTYPES[x.dtype], device=x.device)
        run_cols = torch.empty((rows.stop - r0, 0), dtype=torch.int64, device=x.device)
        for c0 in range(0, n, bc):
            cs = slice(c0, min(c0 + bc, n))
            keys = ordered_keys(torch.mm(x[rows], y[cs].T).mul_(scale))
            if row_keys is not None:
                keys.masked_fill_(row_keys[rows, None] == col_keys[None, cs], sentinel)
            if exclude_diagonal and r0 < cs.stop and c0 < rows.stop:  # the tile meets the diagonal
                diagonal = torch.arange(r0, rows.stop, device=x.device)[:, None] == \
                    torch.arange(cs.start, cs.stop, device=x.device)[None, :]
                keys.masked_fill_(diagonal, sentinel)
            # The tile's own best, then the best of the running list followed by them: in that order
            # equal keys stand in column order, so positions break ties as columns do.
            pos = _best(keys, min(k, keys.shape[1]))
            cand_keys = torch.cat([run_keys, keys.gather(1, pos)], 1)
            cand_cols = torch.cat([run_cols, pos + c0], 1)
            pick = _best(cand_keys, min(k, cand_keys.shape[1]))
            run_keys, run_cols = cand_keys.gather(1, pick), cand_cols.gather(1, pick)
        values[rows], indices[rows] = key_values(run_keys, x.dtype), run_cols
    return values, indices
