"""Collectives with autograd, and the one cheap agreement every distributed loss starts with.

    gather(t)   -> cat of every rank's ``t`` along dim 0, in rank order; backward sums each rank's
                   gradient slices back onto their owner (reduce-scatter; all-reduce + slice on gloo)
    all_sum(t)  -> sum of ``t`` over ranks; backward all-reduces the gradient (every rank's output
                   depends on every rank's input)
    Context     -> group, rank, world size; ``local_checks()`` collects a rank's own validation error
                   and ``agree(...)`` compares every rank's shapes and dtypes in one all-gather of a
                   few integers, so that all ranks raise the same error (nobody is left waiting in
                   a collective the others never reach).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

STRATEGIES = ("allgather", "ring")

# dtype codes for the agreement; 0 means "absent"
_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool]
_SLOT = 6  # per tensor: present/dtype code, ndim, three leading dims (padded), last dim
_MAX_TENSORS = 6


class DistributedInputError(ValueError):
    """Ranks passed inputs that cannot form one global batch (raised on every rank)."""


def _backend_name(group) -> str:
    try:
        return str(dist.get_backend(group)).lower()
    except (RuntimeError, ValueError):
        return ""


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group, world, rank):
        ctx.group, ctx.world, ctx.rank, ctx.rows = group, world, rank, t.shape[0]
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t, group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        if _backend_name(ctx.group) == "nccl":
            out = g.new_empty((ctx.rows, *g.shape[1:]))
            dist.reduce_scatter_tensor(out, g, group=ctx.group)
            return out, None, None, None
        total = g.clone()  # gloo has no reduce-scatter for every dtype: all-reduce, keep our slice
        dist.all_reduce(total, group=ctx.group)
        return total[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None, None


class _GatherLocalGrad(torch.autograd.Function):
    """open_clip's ``gather_with_grad=False``: the other ranks' slices are constants, so only our
    own slice of the gradient comes back (no communication in backward)."""

    @staticmethod
    def forward(ctx, t, group, world, rank):
        ctx.rank, ctx.rows = rank, t.shape[0]
        return _Gather.forward(ctx, t, group, world, rank)

    @staticmethod
    def backward(ctx, g):
        return g[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None, None


class _AllSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = t.clone().contiguous()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.clone().contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class Context:
    """Where a distributed loss runs: ``group``, this rank's ``rank`` in it and its ``world`` size."""

    def __init__(self, group, strategy: str, *, gather_grad: bool = True):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("fastcl.distributed needs an initialised default process group: call "
                               "torch.distributed.init_process_group(...) first (or use the single-process loss)")
        self.group, self.strategy = group, strategy
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise RuntimeError("this process is not a member of the process group passed as group=")
        self.world = dist.get_world_size(group)
        self._error: Exception | None = None
        self._gather_fn = _Gather if gather_grad else _GatherLocalGrad

    # --- collectives with gradient -------------------------------------------------------------
    def gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        return self._gather_fn.apply(t, self.group, self.world, self.rank)

    def gather_nograd(self, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.gather(t.detach())

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        if not t.requires_grad:
            out = t.clone().contiguous()
            dist.all_reduce(out, group=self.group)
            return out
        return _AllSum.apply(t, self.group)

    def global_peer(self, group_rank: int) -> int:
        """The global rank of ``group_rank`` in our group (point-to-point ops address global ranks)."""
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    # --- agreement -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def local_checks(self):
        """Run a rank's own validation; an error is held back until ``agree`` so that every rank
        reaches the same collective and then raises."""
        try:
            if self.strategy not in STRATEGIES:
                raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
            yield
        except Exception as e:  # noqa: BLE001 -- re-raised (on every rank) by agree()
            self._error = e

    def agree(self, like: torch.Tensor | None, **tensors: torch.Tensor | None) -> None:
        """One all-gather of a few integers per rank: the shape and dtype of each named tensor,
        the strategy and whether local validation failed. Raises the same error on every rank
        when any rank failed or the ranks disagree. Feature widths, views and local batch sizes
        must match (the global batch is the concatenation of equal shards)."""
        desc = [0 if self._error is None else 1, STRATEGIES.index(self.strategy) if self.strategy in STRATEGIES else -1]
        names = list(tensors)[:_MAX_TENSORS]
        for name in names:
            desc += _describe(tensors[name])
        desc += [0] * (2 + _SLOT * _MAX_TENSORS - len(desc))
        device = like.device if isinstance(like, torch.Tensor) and self._error is None else _comm_device(self.group)
        mine = torch.tensor(desc, dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        rows = [e.tolist() for e in every]
        failed = [r for r, row in enumerate(rows) if row[0]]
        if failed:
            messages = [None] * self.world
            dist.all_gather_object(messages, None if self._error is None else f"{type(self._error).__name__}: "
                                   f"{self._error}", group=self.group)
            if self._error is not None:
                raise self._error
            first = failed[0]
            raise DistributedInputError(f"rank {first} of the process group rejected its inputs ({messages[first]}); "
                                        f"every rank raises so that none waits in a collective")
        for r, row in enumerate(rows):
            if row[1] != rows[0][1]:
                raise DistributedInputError(f"ranks disagree on strategy: rank 0 uses {STRATEGIES[rows[0][1]]!r}, "
                                            f"rank {r} uses {STRATEGIES[row[1]]!r}")
            for i, name in enumerate(names):
                sl = slice(2 + _SLOT * i, 2 + _SLOT * (i + 1))
                if row[sl] != rows[0][sl]:
                    raise DistributedInputError(
                        f"{name} differs between ranks: rank 0 passed {_show(rows[0][sl])}, rank {r} passed "
                        f"{_show(row[sl])}; every rank must pass the same shape (equal local batch) and dtype")


def _comm_device(group) -> torch.device:
    if _backend_name(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
