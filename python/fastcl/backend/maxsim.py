"""The late-interaction primitive: MaxSim scores of every query against every document, tiled.

    s_ij = sum_{a : q_mask_ia} max_{t : d_mask_jt} <q_ia, d_jt>       q [B, Lq, D], d [N, Ld, D] -> s [B, N]

Ties in the max go to the lowest document-token index ``t`` (that token receives the gradient).
A document with no real token has ``max = -inf``: it scores ``-inf`` against every query with a
real token (never chosen by a softmax) and passes no gradient. A query token that is masked out
contributes nothing and receives a zero gradient.

Each backend that declares the ``maxsim`` op (``registry.py``) supplies two kernels over contiguous
inputs in the math dtype, ``maxsim_forward(q, d, q_mask, d_mask) -> s`` and
``maxsim_backward(q, d, q_mask, d_mask, g, need_q, need_d) -> (dq, dd)`` (empty where not needed):
the forward reduces each token-similarity tile ``q_block @ d_block.T`` (one GEMM) to its row
maxima and sums them into ``s``, never holding more than a tile; the backward recomputes each
tile, finds the winning document token of every (query token, document) pair again and routes
``g_ij = dL/ds_ij`` to it: ``dq_ia += g_ij d_{j,t*}`` (a gather) and ``dd_{j,t*} += g_ij q_ia``
(a scatter-add, each backend in a fixed order: deterministic, no float atomics). Extra memory is
``O((B * Lq + N * Ld) * D + B * N)`` plus a tile, never ``B * N * Lq * Ld``.

This module holds what is shared: the ``torch.library`` ops (``fastcl::engine_maxsim`` and its
backward, with fakes, so ``torch.compile`` traces them), upcasting of 16-bit inputs, and casting
the gradients back.
"""
# No `from __future__ import annotations`: torch.library.custom_op reads evaluated annotations on
# torch < 2.5 (see primitives/__init__.py).
import torch

from .._checks import math_dtype
from . import registry
from .primitives.shared import _refuse_double_backward


def _prepare(backend: str, t: torch.Tensor) -> torch.Tensor:
    """As the backend's kernels take it: contiguous, upcast to the math dtype unless they take its
    dtype natively (none takes 16-bit tokens)."""
    native = registry.native_dtypes(backend, "maxsim")
    return t.detach().to(t.dtype if t.dtype in native else math_dtype(t.dtype)).contiguous()


def _mask(m):
    return None if m is None else m.contiguous()


@torch.library.custom_op("fastcl::engine_maxsim", mutates_args=())
def _maxsim_op(backend: str, q: torch.Tensor, d: torch.Tensor, q_mask: torch.Tensor | None,
               d_mask: torch.Tensor | None) -> torch.Tensor:
    kernels = registry.kernels(backend, "maxsim")
    return kernels.maxsim_forward(_prepare(backend, q), _prepare(backend, d), _mask(q_mask), _mask(d_mask))


@_maxsim_op.register_fake
def _(backend, q, d, q_mask, d_mask):
    return q.new_empty((q.shape[0], d.shape[0]), dtype=math_dtype(q.dtype))


@torch.library.custom_op("fastcl::engine_maxsim_grad", mutates_args=())
def _maxsim_grad_op(backend: str, q: torch.Tensor, d: torch.Tensor, q_mask: torch.Tensor | None,
                    d_mask: torch.Tensor | None, g: torch.Tensor, need_q: bool,
                    need_d: bool) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = registry.kernels(backend, "maxsim")
    dq, dd = kernels.maxsim_backward(_prepare(backend, q), _prepare(backend, d), _mask(q_mask), _mask(d_mask),
                                     g.to(math_dtype(q.dtype)).contiguous(), need_q, need_d)
    return (dq.to(q.dtype) if need_q else q.new_empty(0)), (dd.to(d.dtype) if need_d else d.new_empty(0))


@_maxsim_grad_op.register_fake
def _(backend, q, d, q_mask, d_mask, g, need_q, need_d):
    return (torch.empty_like(q) if need_q else q.new_empty(0)), (torch.empty_like(d) if need_d else d.new_empty(0))


def _setup(ctx, inputs, output):
    backend, q, d, q_mask, d_mask = inputs
    ctx.backend = backend
    ctx.save_for_backward(q, d, q_mask, d_mask)


def _backward(ctx, g):
    q, d, q_mask, d_mask = ctx.saved_tensors
    need_q, need_d = ctx.needs_input_grad[1:3]
    dq, dd = _maxsim_grad_op(ctx.backend, q, d, q_mask, d_mask, g, need_q, need_d)
    return None, (dq if need_q else None), (dd if need_d else None), None, None


_maxsim_op.register_autograd(_backward, setup_context=_setup)
_maxsim_grad_op.register_autograd(_refuse_double_backward)


def maxsim_scores(backend: str, q: torch.Tensor, d: torch.Tensor, q_mask: torch.Tensor | None = None,
                  d_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``s [B, N]`` in the math dtype on a backend that declares ``maxsim``; inputs already
    validated, masks boolean or ``None`` (all tokens real)."""
    return _maxsim_op(backend, q, d, q_mask, d_mask)
