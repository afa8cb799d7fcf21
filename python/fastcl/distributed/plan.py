"""The plan of a process group: this rank's rows against every rank's columns (``fastcl.losses._plan``
has the interface, and the single-process plan).

One plan serves the three strategies, which differ only in how the ranks form nodes (``ring.py``):
``allgather`` gathers every rank's columns at once (one node; memory ``O(N_global * D)``),
``ring`` passes them rank to rank (nodes of one; ``O(N_local * D)``), ``hierarchical`` gathers them
within a node and passes node blocks around the ring of nodes (``O(node_size * N_local * D)``).
"""
from __future__ import annotations

import torch

from .._checks import math_dtype
from ..backend.primitives import LSE
from ..losses._plan import LocalPlan
from .comm import Context
from .ring import Ring, TurnColumns, TurnLSE, TurnPointwise, TurnTake


class GroupPlan(LocalPlan):
    def __init__(self, ctx: Context, engine):
        self.ctx, self.engine, self.kernels, self.ring = ctx, engine, engine.kernels, Ring(ctx)
        self.size, self.rank = ctx.size, ctx.rank
        self.all_sum, self.gather, self.gather_nograd = ctx.all_sum, ctx.gather, ctx.gather_nograd

    def lse(self, x, y, s, keys=None, stride: int = 0, *, cols: bool = False, pair_cols=None, extra=None) -> LSE:
        row_keys, col_keys = (None, None) if keys is None else keys
        columns = y if extra is None else torch.cat([y, extra])
        pairs, key_list = [(x, columns)], [None if keys is None else (row_keys, col_keys, stride)]
        if cols:  # this rank's y against every rank's x
            pairs.append((y, x))
            key_list.append(None if keys is None else (col_keys, row_keys, stride))
        if self.ring.nodes > 1:  # both directions in one turn: half the messages around the ring
            out = TurnLSE.apply(self.ring, self.kernels, key_list, s, *(p[0] for p in pairs), *(p[1] for p in pairs))
        else:  # one node (allgather): no ring to share, so one gather per direction, one held at a time
            out = [TurnLSE.apply(self.ring, self.kernels, [k], s, *p)[0] for p, k in zip(pairs, key_list)]
        pair = None
        if pair_cols is not None:
            paired = y[:x.shape[0]] if isinstance(pair_cols, str) else self.take(y, pair_cols)
            acc = math_dtype(x.dtype)
            pair = s * (x.to(acc) * paired.to(acc)).sum(-1)
        return LSE(out[0], out[1] if cols else None, pair)

    def pointwise(self, x, y, s, row_bias, keys, stride: int, kind: str, reduce: bool):
        row_keys, col_keys = (None, None) if keys is None else keys
        return TurnPointwise.apply(self.ring, self.kernels, kind, reduce, (row_keys, col_keys, stride), x, y, s,
                                   row_bias)

    def take(self, y, index):
        return TurnTake.apply(self.ring, y, index)

    def columns(self, fn, rows, column, *constants):
        return TurnColumns.apply(self.ring, fn, rows, column, *constants)
