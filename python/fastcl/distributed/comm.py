"""Collectives over a process group, with autograd where a loss differentiates through them.

    all_gather(t, group, parts)            -> ``[parts, *t.shape]``: every rank's ``t`` in rank order
    reduce_scatter(t, group, rank, parts)  -> our ``1/parts`` slice (dim 0) of the sum of every rank's ``t``
    gather(t, group, size, rank, with_grad) -> cat of every rank's ``t`` along dim 0, in rank order;
                   backward sums each rank's gradient slices back onto their owner (reduce-scatter;
                   all-reduce + slice on gloo), or with ``with_grad=False`` keeps only our own slice
    all_sum(t, group) -> sum of ``t`` over ranks; backward all-reduces the gradient (every rank's
                   output depends on every rank's input)
    comm_device(group) -> where this group's collectives want their tensors (CUDA for NCCL)

Nothing here knows about losses or plans: ``world.py`` (the group as a loss's world) and ``ring.py``
(the turn) build on it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _backend_name(group) -> str:
    try:
        return str(dist.get_backend(group)).lower()
    except (RuntimeError, ValueError):
        return ""


def comm_device(group) -> torch.device:
    if _backend_name(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_scatter(t: torch.Tensor, group, rank: int, parts: int, fresh: bool = False) -> torch.Tensor:
    """Our ``1/parts`` slice (along dim 0) of the sum over the group's ranks of ``t`` (``fresh``:
    ``t`` is a buffer of our own, which may be overwritten)."""
    t = t.contiguous()
    rows = t.shape[0] // parts
    if _backend_name(group) == "nccl":
        out = t.new_empty((rows, *t.shape[1:]))
        dist.reduce_scatter_tensor(out, t, group=group)
        return out
    total = t if fresh else t.clone()  # gloo has no reduce-scatter for every dtype: all-reduce, keep our slice
    dist.all_reduce(total, group=group)
    return total[rank * rows:(rank + 1) * rows].clone()  # not a view that keeps the whole sum alive


def all_gather(t: torch.Tensor, group, parts: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Every rank's ``t`` stacked in rank order: ``[parts, *t.shape]`` (into ``out`` if given)."""
    t = t.contiguous()
    out = t.new_empty((parts, *t.shape)) if out is None else out
    dist.all_gather(list(out.unbind(0)), t, group=group)
    return out


class _Gather(torch.autograd.Function):
    """``with_grad=False`` is open_clip's ``gather_with_grad=False``: the other ranks' slices are
    constants, so only our own slice of the gradient comes back (no communication in backward)."""

    @staticmethod
    def forward(ctx, t, group, size, rank, with_grad):
        ctx.group, ctx.size, ctx.rank, ctx.with_grad = group, size, rank, with_grad
        return all_gather(t, group, size).flatten(0, 1)

    @staticmethod
    def backward(ctx, g):
        rows = g.shape[0] // ctx.size
        own = reduce_scatter(g, ctx.group, ctx.rank, ctx.size) if ctx.with_grad else g[ctx.rank * rows:][:rows]
        return own, None, None, None, None


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


def gather(t: torch.Tensor, group, size: int, rank: int, with_grad: bool = True) -> torch.Tensor:
    return t if size == 1 else _Gather.apply(t, group, size, rank, with_grad)


def all_sum(t: torch.Tensor, group, size: int) -> torch.Tensor:
    return t if size == 1 else _AllSum.apply(t, group)
