"""How this rank's rows meet the global batch's columns: the two strategies behind one interface.

Every distributed loss is written once against ``Plan``:

    lse(x, y, scale, keys, stride)       -> [M] row log-sum-exp of scale * x @ Y_global.T over non-keyed pairs
    pointwise(x, y, scale, row_bias, keys, stride, kind, reduce)
                                         -> sum_j loss(S_ij + row_bias_i) over global columns, per row or total
    take(y, index)                       -> Y_global[index], with gradient

``y`` is always this rank's block of the columns; ``Y_global`` is every rank's block in rank order.
``keys = (row_keys [M], col_keys [N])`` hold *global* ids for this rank's rows and its own block;
the block of rank ``q`` has keys ``col_keys + (q - rank) * stride``.

- ``AllGatherPlan`` gathers ``Y_global`` (with gradient; backward reduce-scatters) and runs the
  engine's fused primitives on local rows x global columns. Memory ``O(N_global * D)``.
- ``RingPlan`` never holds ``Y_global``: blocks travel the ring (``ring.py``). Memory
  ``O(N_local * D)``.
"""
from __future__ import annotations

import torch

from .comm import Context
from .ring import Ring, RingLSE, RingPointwise, RingTake


class AllGatherPlan:
    def __init__(self, ctx: Context, engine):
        self.ctx, self.engine = ctx, engine
        self._gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor, gathered)

    def columns(self, y: torch.Tensor) -> torch.Tensor:
        """``Y_global``, gathered once per loss call (the tensor is kept so its id stays unique)."""
        if id(y) not in self._gathered:
            self._gathered[id(y)] = (y, self.ctx.gather(y))
        return self._gathered[id(y)][1]

    def _keys(self, keys, stride):
        if keys is None:
            return None
        row_keys, col_keys = keys
        ctx = self.ctx
        return row_keys, torch.cat([col_keys + (q - ctx.rank) * stride for q in range(ctx.world)])

    def lse(self, x, y, scale, keys=None, stride: int = 0) -> torch.Tensor:
        return self.engine.lse(x, self.columns(y), scale, keys=self._keys(keys, stride)).row_lse

    def pointwise(self, x, y, scale, row_bias, keys, stride: int, kind: str, reduce: bool) -> torch.Tensor:
        return self.engine.pointwise(x, self.columns(y), scale, row_bias, keys=self._keys(keys, stride), kind=kind,
                                     reduce=reduce)

    def take(self, y, index) -> torch.Tensor:
        return self.columns(y)[index]


class RingPlan:
    def __init__(self, ctx: Context, engine):
        self.ctx, self.kernels, self.ring = ctx, engine.kernels, Ring(ctx)

    def lse(self, x, y, scale, keys=None, stride: int = 0) -> torch.Tensor:
        row_keys, col_keys = (None, None) if keys is None else keys
        return RingLSE.apply(self.ring, self.kernels, x, y, scale, row_keys, col_keys, stride)

    def pointwise(self, x, y, scale, row_bias, keys, stride: int, kind: str, reduce: bool) -> torch.Tensor:
        row_keys, col_keys = (None, None) if keys is None else keys
        return RingPointwise.apply(self.ring, self.kernels, kind, reduce, x, y, scale, row_bias, row_keys, col_keys,
                                   stride)

    def take(self, y, index) -> torch.Tensor:
        return RingTake.apply(self.ring, y, index)


def make_plan(ctx: Context, engine):
    return (RingPlan if ctx.strategy == "ring" else AllGatherPlan)(ctx, engine)
