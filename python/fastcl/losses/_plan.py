"""Where a loss's columns live: the interface every loss is composed against, and the world of one.

A loss is written once, as a function of a *world*: this process (``LOCAL``, a ``LocalWorld``) or a
process group (``fastcl.distributed.world.GroupWorld``). It validates through
``world.checked(validate, like, **tensors)`` (a group agrees on the outcome, so every rank raises the
same error), gets ``world.engine(backend, like)`` (``None``: the single-process ``reference``) and
asks ``world.plan(engine)`` for a plan.
Rows are this process's own; columns ``Y`` are every rank's ``y`` in rank order:

    lse(x, y, s, keys, stride, cols, pair_cols, extra) -> LSE(row_lse, col_lse, pair_logit): row
        log-sum-exp of ``s x @ Y.T`` (then ``extra``, more columns); ``cols``: the column log-sum-exp
        of this rank's ``y`` over every rank's ``x``; ``pair_cols``: ``S_{i, t(i)}``, ``t`` global
        indices or ``"diagonal"``; ``exclude [M, E]``: each row's columns left out too, as indices
        into every rank's columns (``y`` then ``extra``) side by side in rank order (op ``lse_exclude``)
    pointwise(x, y, s, row_bias, keys, stride, kind, reduce) -> sum_j loss(S_ij + row_bias_i)
    take(y, index) -> Y[index] by global row index, with gradient
    columns(fn, rows, column, *constants) -> fn(rows, C, *K) against every rank's columns, side by
        side in rank order: scores that are not ``x @ y.T`` (MaxSim), differentiable torch ``fn``
    ids(n, like), own(t, n), count(n), all_sum(t), gather(t), gather_nograd(t), reduce(per_row, r)

``keys = (row_keys, col_keys)`` are global ids of this rank's rows and columns; rank ``q``'s columns
have ``col_keys + (q - rank) * stride``. The group's plan is ``fastcl.distributed.plan``.
"""
from __future__ import annotations

import torch

from ._common import engine_of, reduce


class LocalPlan:
    """One process: the global batch is the local one, every collective the identity. (What does
    not move data is written for any ``size`` and ``rank``: the group's plan inherits it.)"""

    size, rank = 1, 0

    def __init__(self, engine):
        self.engine = engine

    def lse(self, x, y, s, keys=None, stride: int = 0, *, cols: bool = False, pair_cols=None, extra=None,
            exclude=None):
        y = y if extra is None else torch.cat([y, extra])
        return self.engine.lse(x, y, s, keys=keys, rows=True, cols=cols, pair_cols=pair_cols, exclude=exclude)

    def pointwise(self, x, y, s, row_bias, keys, stride: int, kind: str, reduce: bool):
        return self.engine.pointwise(x, y, s, row_bias, keys=keys, kind=kind, reduce=reduce)

    @staticmethod
    def take(y, index):
        return y[index]

    @staticmethod
    def columns(fn, rows, column, *constants):
        return fn(rows, column, *constants)

    @staticmethod
    def all_sum(t):
        return t

    gather = gather_nograd = all_sum

    def ids(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.arange(self.rank * n, (self.rank + 1) * n, device=like.device)

    def own(self, t, n: int):
        return t[self.rank * n:(self.rank + 1) * n]

    def count(self, n: int) -> int:
        return n * self.size

    def reduce(self, per_row: torch.Tensor, reduction: str) -> torch.Tensor:
        return reduce(per_row, reduction, self.size)


class LocalWorld:
    """This process as a loss's world: nothing to agree on, the single-process engine and plan
    (``fastcl.distributed.world.GroupWorld`` is a process group's)."""

    size, rank = 1, 0
    local = True  # one process: "auto" may materialise a small S (GroupWorld: False)
    engine = staticmethod(engine_of)  # None: the reference backend
    plan = LocalPlan

    @staticmethod
    def checked(validate, like=None, **tensors):
        return validate()


LOCAL = LocalWorld()
