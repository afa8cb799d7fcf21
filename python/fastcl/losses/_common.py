"""Helpers every loss composition shares: dispatch, normalisation, reduction and output rules."""
from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F

from .._checks import math_dtype
from ..backend import engine, resolve


def dispatch(backend: str, like: torch.Tensor, op: str | None = None, pairs: int | None = None):
    """``None`` for the reference path, else the engine of the backend chosen for ``op``; ``pairs``
    (M x N of the call's S) lets ``"auto"`` take the reference path for a small S."""
    name = resolve(backend, like, op=op, pairs=pairs)
    return None if name == "reference" else engine(name)


def engine_for(world, backend: str, like: torch.Tensor, op: str, pairs: int | None = None):
    """``world.engine`` of the backend chosen for ``op`` (``"lse"`` or ``"pointwise"``): the world
    validates the concrete name (``None``: the single-process reference). ``pairs``: as ``dispatch``
    takes it, in a single process only (a process group's S is spread over its ranks)."""
    return world.engine(resolve(backend, like, op=op, pairs=pairs if world.size == 1 and world.local else None),
                        like)


def maybe_normalize(t: torch.Tensor, normalize: bool) -> torch.Tensor:
    """L2-normalise rows (in the math dtype, returned in the input dtype); autograd flows through."""
    if not normalize:
        return t
    return F.normalize(t.to(math_dtype(t.dtype)), dim=-1).to(t.dtype)


def upcast(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in _MATH_DTYPES else t.to(math_dtype(t.dtype))  # no call where there is nothing to do


_MATH_DTYPES = (torch.float32, torch.float64)


def scaled_scores(x: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``S = s x @ y.T``, materialised, with ``s`` applied to the smaller of ``x [M, D]`` and ``S [M, N]``:
    the same S (up to rounding), with fewer multiplications forward and backward (where D > N, ``s x``
    would scale more values than S has)."""
    return s * x @ y.T if x.shape[1] <= y.shape[0] else (x @ y.T) * s


def engine_of(name: str, like: torch.Tensor | None = None):
    """``None`` for ``"reference"``, else the engine of backend ``name``: a name ``resolve`` returned
    (``engine_for``, ``maxsim_loss``), not validated again (``like``: as ``GroupWorld.engine`` takes it)."""
    return None if name == "reference" else engine(name)


def arange(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device)


def reduce(per_row: torch.Tensor, reduction: str, size: int = 1) -> torch.Tensor:
    """``mean``: over this rank's rows; ``sum``: ``size`` (ranks) times this rank's share, so that
    the mean over ranks is the global sum; ``none``: the rows themselves."""
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum() * size if size > 1 else per_row.sum()
    return per_row


def total(out: torch.Tensor, reduction: str, rows: int, size: int) -> torch.Tensor:
    """``reduce`` for a pointwise loss, whose primitive sums the rows itself unless ``none``."""
    return out / rows if reduction == "mean" else out * size if reduction == "sum" and size > 1 else out


_RESULT = threading.local()  # .dtype: set by ``result_dtype`` for the calls inside it (this thread only)


@contextlib.contextmanager
def result_dtype(dtype: torch.dtype | None):
    """Inside: ``finish`` casts to ``dtype`` instead of the features' dtype (``None``: as usual).

    For ``fastcl.nn``'s drop-ins, whose peers' losses have another dtype under ``torch.autocast``:
    the loss is cast once from the math dtype, not rounded to the features' dtype first. A
    thread-local rather than an argument of every loss composition (and of ``fastcl.distributed``'s
    entry points, made from their signatures); ``torch.compile`` traces it (a ``ContextVar`` it
    does not).
    """
    before = getattr(_RESULT, "dtype", None)
    _RESULT.dtype = dtype
    try:
        yield
    finally:
        _RESULT.dtype = before


def finish(out: torch.Tensor, dtype: torch.dtype, *inputs: torch.Tensor | None,
           scores: torch.Tensor | None = None) -> torch.Tensor:
    """Cast to the features' dtype (or ``result_dtype``'s); any NaN or Inf among the inputs makes the result NaN.

    An infinite feature can otherwise cancel into a finite or infinite loss (inf - inf, softplus),
    which would hide the bad input. The check reads O(N * D) values, allocates nothing of that size
    and needs no device sync: on a GPU its verdict is added to the loss (0 or NaN), on the CPU it is
    read (a finite batch adds no op to the loss's graph; at small N every op is a visible share).
    ``scores``: the reference path's materialised ``S``, a product of every input (a NaN or Inf input
    leaves a NaN or Inf in it: inf * 0 is NaN), read instead when it holds fewer values than the
    inputs (N < 2D).
    """
    # This runs on every call: at small N each Python step is a visible share of it (a call of a
    # 128 x 128 CLIP is ~0.5 ms), hence the plain loops and is_cpu rather than device.type.
    tensors = [t.detach() for t in inputs if t is not None]
    if scores is not None:
        values = 0
        for t in tensors:
            values += t.numel()
        if scores.numel() < values:
            tensors = [scores.detach()]
    dtype = getattr(_RESULT, "dtype", None) or dtype
    if tensors and tensors[0].is_cpu and not torch.compiler.is_compiling():
        # On the CPU reading values costs no device sync: a finite batch adds nothing to the graph.
        # A sum is finite only if every value is (inf + x, inf - inf and NaN + x are not), and it is
        # half the reads of the ends; a finite batch whose sum overflows is told apart by its ends.
        for t in tensors:
            if not math.isfinite(t.sum().item()) and \
                    not all(math.isfinite(e.item()) for e in torch.aminmax(t)):
                return (out + float("nan")).to(dtype)
        return out if out.dtype == dtype else out.to(dtype)
    ends = [e for t in tensors for e in torch.aminmax(t)]  # NaN propagates into both
    # e - e is 0 for a finite e and NaN for an infinite or NaN one: added to the loss, exact, and fewer
    # ops than isfinite/all/where (this runs on every call; at small N each op's dispatch is a visible share)
    if len(ends) == 2:
        out = out + ((ends[0] - ends[0]) + (ends[1] - ends[1]))
    elif ends and all(e.dtype == ends[0].dtype for e in ends):
        ends = torch.stack(ends)
        out = out + (ends - ends).sum()
    elif ends:
        out = out + sum(e - e for e in ends)
    return out.to(dtype)
