"""The plan of a process group: this rank's rows against every rank's columns (``fastcl.losses._plan``
has the interface, and the single-process plan).

One plan serves the three strategies, which differ only in how the ranks form nodes (``ring.py``):
``allgather`` gathers every rank's columns at once (one node; memory ``O(N_global * D)``),
``ring`` passes them rank to rank (nodes of one; ``O(N_local * D)``), ``hierarchical`` gathers them
within a node and passes node blocks around the ring of nodes (``O(node_size * N_local * D)``).
``lse(..., cols=True)`` (CLIP's, CWCL's two directions) is one turn over ``y``: each block of S once,
rows' and columns' statistics from the same pass (``ring.TurnLSE``).
"""
from __future__ import annotations

import torch

from .._checks import math_dtype
from ..backend.primitives.shared import LSE
from ..losses._plan import LocalPlan
from .ring import Ring, TurnColumns, TurnLSE, TurnPointwise, TurnTake


class GroupPlan(LocalPlan):
    """The plan of ``world`` (a ``world.GroupWorld``) over ``engine``'s primitives."""

    def __init__(self, world, engine):
        self.world, self.engine, self.ring = world, engine, Ring(world)
        self.size, self.rank = world.size, world.rank
        self.all_sum, self.gather, self.gather_nograd = world.all_sum, world.gather, world.gather_nograd

    def lse(self, x, y, s, keys=None, stride: int = 0, *, cols: bool = False, pair_cols=None, extra=None,
            exclude=None) -> LSE:
        columns = y if extra is None else torch.cat([y, extra])
        rk, ck = (None, None) if keys is None else keys
        row_lse, col_lse = TurnLSE.apply(self.ring, self.engine, (rk, ck, stride, exclude), cols, s, x, columns)
        pair = None
        if pair_cols is not None:
            paired = y[:x.shape[0]] if isinstance(pair_cols, str) else self.take(y, pair_cols)
            acc = math_dtype(x.dtype)
            pair = s * (x.to(acc) * paired.to(acc)).sum(-1)
        return LSE(row_lse, col_lse if cols else None, pair)

    def pointwise(self, x, y, s, row_bias, keys, stride: int, kind: str, reduce: bool):
        row_keys, col_keys = (None, None) if keys is None else keys
        return TurnPointwise.apply(self.ring, self.engine, kind, reduce, (row_keys, col_keys, stride), x, y, s,
                                   row_bias)

    def take(self, y, index):
        return TurnTake.apply(self.ring, y, index)

    def columns(self, fn, rows, column, *constants):
        return TurnColumns.apply(self.ring, fn, rows, column, *constants)
