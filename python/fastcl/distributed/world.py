"""A process group as a loss's world: ``GroupWorld``, the counterpart of ``fastcl.losses._plan.LocalWorld``.

A loss's composition asks its world to check its inputs, to pick the engine and to make the plan
(``fastcl.losses._plan`` states the interface). Here ``checked(...)`` runs a rank's own validation,
then ``agree(...)`` compares every rank's shapes and dtypes in one all-gather of a few integers, so
that all ranks raise the same error (nobody is left waiting in a collective the others never
reach); ``plan(engine)`` is the group's plan (``plan.py``), whose turns are in ``ring.py``; the
collectives with gradient (``gather``, ``all_sum``) are ``comm.py``'s.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..backend import engine as engine_of
from ..backend import resolve
from . import comm
from .plan import GroupPlan

STRATEGIES = ("allgather", "ring", "hierarchical")

# dtype codes for the agreement; 0 means "absent"
_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool]
_SLOT = 6  # per tensor: present/dtype code, ndim, three leading dims (padded), last dim
_MAX_TENSORS = 6
_HEAD = 3  # failed?, strategy, node size


class DistributedInputError(ValueError):
    """Ranks passed inputs that cannot form one global batch (raised on every rank)."""


class GroupWorld:
    """A process group as a loss's world (``fastcl.losses._plan``): ``group``, this rank's ``rank``
    in it, its ``size``, and how the ranks form nodes (``node_size`` ranks each, in rank order:
    the whole group for ``allgather``, one rank for ``ring``). ``gather_grad=False`` is open_clip's
    ``gather_with_grad=False``: other ranks' features are constants."""

    local = False  # S spreads over the ranks: "auto" never materialises it

    def __init__(self, group, strategy: str, *, node_size: int | None = None, gather_grad: bool = True):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("fastcl.distributed needs an initialised default process group: call "
                               "torch.distributed.init_process_group(...) first (or use the single-process loss)")
        self.group, self.strategy, self._node_size = group, strategy, node_size
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise RuntimeError("this process is not a member of the process group passed as group=")
        self.size = dist.get_world_size(group)
        self._error: Exception | None = None
        self.gather_grad = gather_grad

    @property
    def node_size(self) -> int:
        if self.strategy == "allgather":
            return self.size
        if self.strategy == "ring":
            return 1
        size = self._node_size if self._node_size is not None else os.environ.get("LOCAL_WORLD_SIZE")
        if size is None:
            raise ValueError("strategy='hierarchical' needs the ranks per node: pass node_size= or set "
                             "LOCAL_WORLD_SIZE (torchrun sets it)")
        size = int(size)
        if size < 1 or self.size % size:
            raise ValueError(f"node_size must divide the group's {self.size} ranks, got {size}")
        return size

    # --- a loss's world ------------------------------------------------------------------------
    def checked(self, validate, like, **tensors):
        """``validate()`` on every rank, then the agreement: the same error on every rank if any
        rank's validation failed or the ranks' inputs cannot form one global batch. ``like`` and
        ``tensors`` may be functions of what ``validate`` returns (a tensor the checks build)."""
        result = None
        try:
            if self.strategy not in STRATEGIES:
                raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
            self.node_size  # noqa: B018 -- validates node_size / LOCAL_WORLD_SIZE
            result = validate()
        except Exception as e:  # noqa: BLE001 -- re-raised (on every rank) by agree()
            self._error = e

        def value(t):
            return (None if self._error else t(result)) if callable(t) else t

        self.agree(value(like), **{name: value(t) for name, t in tensors.items()})
        return result

    @staticmethod
    def engine(backend: str, like: torch.Tensor):
        name = resolve(backend, like)
        if name == "reference":
            raise ValueError("backend='reference' materialises S and has no distributed path; use 'auto', 'cpu' "
                             "or 'chunked' (compare a distributed run with the single-process reference instead)")
        return engine_of(name)

    def plan(self, engine) -> GroupPlan:
        return GroupPlan(self, engine)

    # --- collectives with gradient -------------------------------------------------------------
    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return comm.gather(t, self.group, self.size, self.rank, self.gather_grad)

    def gather_nograd(self, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.gather(t.detach())

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return comm.all_sum(t, self.group, self.size)

    def global_rank(self, group_rank: int) -> int:
        """The global rank of ``group_rank`` in our group (point-to-point ops address global ranks)."""
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    # --- agreement -----------------------------------------------------------------------------
    def agree(self, like: torch.Tensor | None, **tensors: torch.Tensor | None) -> None:
        """One all-gather of a few integers per rank: the shape and dtype of each named tensor,
        the strategy and whether local validation failed. Raises the same error on every rank
        when any rank failed or the ranks disagree. Feature widths, views and local batch sizes
        must match (the global batch is the concatenation of equal shards)."""
        strategy = STRATEGIES.index(self.strategy) if self.strategy in STRATEGIES else -1
        desc = [0 if self._error is None else 1, strategy, self.node_size if self._error is None else 0]
        names = list(tensors)[:_MAX_TENSORS]
        for name in names:
            desc += _describe(tensors[name])
        desc += [0] * (_HEAD + _SLOT * _MAX_TENSORS - len(desc))
        device = like.device if isinstance(like, torch.Tensor) and self._error is None else comm.comm_device(self.group)
        mine = torch.tensor(desc, dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(every, mine, group=self.group)
        rows = [e.tolist() for e in every]
        failed = [r for r, row in enumerate(rows) if row[0]]
        if failed:
            messages = [None] * self.size
            dist.all_gather_object(messages, None if self._error is None else f"{type(self._error).__name__}: "
                                   f"{self._error}", group=self.group)
            if self._error is not None:
                raise self._error
            first = failed[0]
            raise DistributedInputError(f"rank {first} of the process group rejected its inputs ({messages[first]}); "
                                        f"every rank raises so that none waits in a collective")
        for r, row in enumerate(rows):
            if row[1:_HEAD] != rows[0][1:_HEAD]:
                raise DistributedInputError(f"ranks disagree on strategy or node size: rank 0 uses "
                                            f"{STRATEGIES[rows[0][1]]!r} in nodes of {rows[0][2]}, rank {r} uses "
                                            f"{STRATEGIES[row[1]]!r} in nodes of {row[2]}")
            for i, name in enumerate(names):
                sl = slice(_HEAD + _SLOT * i, _HEAD + _SLOT * (i + 1))
                if row[sl] != rows[0][sl]:
                    raise DistributedInputError(
                        f"{name} differs between ranks: rank 0 passed {_show(rows[0][sl])}, rank {r} passed "
                        f"{_show(row[sl])}; every rank must pass the same shape (equal local batch) and dtype")


def _describe(t) -> list[int]:
    if not isinstance(t, torch.Tensor):
        return [0] * _SLOT
    code = _DTYPES.index(t.dtype) + 1 if t.dtype in _DTYPES else len(_DTYPES) + 1
    dims = list(t.shape)
    lead = (dims[:-1] + [-1, -1, -1])[:3] if dims else [-1, -1, -1]
    return [code, t.dim(), *lead, dims[-1] if dims else -1]


def _show(slot: list[int]) -> str:
    code, ndim, *rest = slot
    if code == 0:
        return "nothing"
    dtype = _DTYPES[code - 1] if code <= len(_DTYPES) else "another dtype"
    shape = tuple(rest[: ndim - 1]) + ((rest[-1],) if ndim else ())
    more = "" if ndim <= 4 else f" (and {ndim - 4} more leading dims)"
    return f"shape {shape}{more} of {dtype}"
