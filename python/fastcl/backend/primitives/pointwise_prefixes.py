"""The ``pointwise_prefixes`` primitive: pointwise at K nested feature prefixes, for Matryoshka SigLIP
(``fastcl::engine_pointwise_prefixes`` and its backward op, fakes, autograd).

S^k = scale * a^k b^k.T * (x[:, :d_k] @ y[:, :d_k].T) + row_bias, the loss sum_k w_k sum_j loss(S^k_ij)
per row (or its total). As ``pointwise``, with ``reduce`` the gradients are formed in the forward
pass, so the K weights w_k enter the kernels (as g_row^k = w_k); per-row output recomputes them in
backward with g_row^k_i = w_k g_i. The factors' gradients are the kernels' row / column sums of
D^k * T^k, divided by the factors here, as for ``lse_prefixes``.
"""
# No `from __future__ import annotations`: torch.library.custom_op reads evaluated annotations on
# torch < 2.5 (see __init__.py).
from typing import Sequence  # noqa: UP035

import torch

from ..._checks import math_dtype
from .shared import _kernel_inputs, _kernels, _or_none, _pair_grads, _refuse_double_backward


def _prefix_factor_grads(row_gs, col_gs, row_scale, col_scale, need_row_scale: bool, need_col_scale: bool):
    """``(d a, d b)``: d S^k_ij / d a^k_i = T^k_ij / a^k_i (the factors are inverse norms, never 0); empty
    where not needed."""
    return (row_gs / row_scale if need_row_scale else row_gs.new_empty(0),
            col_gs / col_scale if need_col_scale else col_gs.new_empty(0))


def _pointwise_prefixes_grads(x, y, xa, scale, grads, row_scale, col_scale, need):
    """``(dx, dy, dscale, d_bias, d_row_scale, d_col_scale)`` from the kernels' gradient sums ``grads``
    (``need``: the six flags)."""
    gy, gx, d_bias, row_gs, col_gs = grads
    need_x, need_y, need_scale, need_bias, need_row_scale, need_col_scale = need
    dx, dy, dscale = _pair_grads(x, y, xa, scale, gy, gx, need_x, need_y, need_scale)
    return (dx, dy, dscale, d_bias if need_bias else d_bias.new_empty(0),
            *_prefix_factor_grads(row_gs, col_gs, row_scale, col_scale, need_row_scale, need_col_scale))


def _pointwise_prefixes_fake_grads(x, y, scale, dims, need, wanted: bool = True):
    acc = math_dtype(x.dtype)
    need_x, need_y, need_scale, need_bias, need_row_scale, need_col_scale = (n and wanted for n in need)
    return (torch.empty_like(x) if need_x else x.new_empty(0), torch.empty_like(y) if need_y else y.new_empty(0),
            scale.new_empty(()) if need_scale else scale.new_empty(0),
            x.new_empty(x.shape[0] if need_bias else 0, dtype=acc),
            x.new_empty((len(dims), x.shape[0]) if need_row_scale else (0,), dtype=acc),
            x.new_empty((len(dims), y.shape[0]) if need_col_scale else (0,), dtype=acc))


@torch.library.custom_op("fastcl::engine_pointwise_prefixes", mutates_args=())
def _pointwise_prefixes_op(backend: str, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                           row_bias: torch.Tensor | None, dims: Sequence[int], row_scale: torch.Tensor | None,
                           col_scale: torch.Tensor | None, row_keys: torch.Tensor | None,
                           col_keys: torch.Tensor | None, kind: int, weights: Sequence[float], reduce: bool,
                           need_x: bool, need_y: bool, need_scale: bool, need_bias: bool, need_row_scale: bool,
                           need_col_scale: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor, torch.Tensor]:
    xa, ya = _kernel_inputs(backend, x, y, "pointwise_prefixes")
    bias = None if row_bias is None else row_bias.contiguous()
    need = (need_x, need_y, need_scale, need_bias, need_row_scale, need_col_scale)
    want = reduce and any(need)
    w = torch.tensor(list(weights), dtype=math_dtype(x.dtype), device=x.device)
    g_row = w[:, None].expand(len(dims), x.shape[0]).contiguous() if want else None
    row_sum, *grads = _kernels(backend, "pointwise_prefixes").pointwise_prefixes(
        xa, ya, scale, bias, dims, row_scale, col_scale, row_keys, col_keys, kind, g_row, want)
    per_row = w @ row_sum  # [M]: sum_k w_k sum_j loss(S^k_ij)
    out = per_row.sum() if reduce else per_row
    if not want:
        return out, *_pointwise_prefixes_fake_grads(x, y, scale, dims, need, wanted=False)
    return out, *_pointwise_prefixes_grads(x, y, xa, scale, grads, row_scale, col_scale, need)


@_pointwise_prefixes_op.register_fake
def _(backend, x, y, scale, row_bias, dims, row_scale, col_scale, row_keys, col_keys, kind, weights, reduce, need_x,
      need_y, need_scale, need_bias, need_row_scale, need_col_scale):
    acc = math_dtype(x.dtype)
    need = (need_x, need_y, need_scale, need_bias, need_row_scale, need_col_scale)
    out = x.new_empty((), dtype=acc) if reduce else x.new_empty(x.shape[0], dtype=acc)
    return out, *_pointwise_prefixes_fake_grads(x, y, scale, dims, need, wanted=reduce and any(need))


@torch.library.custom_op("fastcl::engine_pointwise_prefixes_grad", mutates_args=())
def _pointwise_prefixes_grad_op(backend: str, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                                row_bias: torch.Tensor | None, dims: Sequence[int], row_scale: torch.Tensor | None,
                                col_scale: torch.Tensor | None, row_keys: torch.Tensor | None,
                                col_keys: torch.Tensor | None, kind: int, g_row: torch.Tensor, need_x: bool,
                                need_y: bool, need_scale: bool, need_bias: bool, need_row_scale: bool,
                                need_col_scale: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                               torch.Tensor, torch.Tensor]:
    xa, ya = _kernel_inputs(backend, x, y, "pointwise_prefixes")
    bias = None if row_bias is None else row_bias.contiguous()
    _, *grads = _kernels(backend, "pointwise_prefixes").pointwise_prefixes(
        xa, ya, scale, bias, dims, row_scale, col_scale, row_keys, col_keys, kind, g_row, True)
    need = (need_x, need_y, need_scale, need_bias, need_row_scale, need_col_scale)
    return _pointwise_prefixes_grads(x, y, xa, scale, grads, row_scale, col_scale, need)


@_pointwise_prefixes_grad_op.register_fake
def _(backend, x, y, scale, row_bias, dims, row_scale, col_scale, row_keys, col_keys, kind, g_row, need_x, need_y,
      need_scale, need_bias, need_row_scale, need_col_scale):
    return _pointwise_prefixes_fake_grads(x, y, scale, dims,
                                          (need_x, need_y, need_scale, need_bias, need_row_scale, need_col_scale))


def _pointwise_prefixes_setup(ctx, inputs, output):
    backend, x, y, scale, row_bias, dims, row_scale, col_scale, row_keys, col_keys, kind, weights, reduce, *_ = inputs
    ctx.backend, ctx.dims, ctx.kind, ctx.weights, ctx.reduce = backend, dims, kind, weights, reduce
    if reduce:
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(x, y, scale, row_bias, row_scale, col_scale, row_keys, col_keys)


# the differentiable inputs' positions in _pointwise_prefixes_op's arguments
_PREFIX_GRAD_INPUTS = (1, 2, 3, 4, 6, 7)


def _pointwise_prefixes_backward(ctx, g, *_unused):
    need = [ctx.needs_input_grad[i] for i in _PREFIX_GRAD_INPUTS]
    if ctx.reduce:
        if torch.is_grad_enabled():  # constants from the forward pass: see _pointwise_backward
            _refuse_double_backward(ctx)
        grads = [t * g.to(t.dtype) for t in ctx.saved_tensors]
    else:
        x, y, scale, row_bias, row_scale, col_scale, row_keys, col_keys = ctx.saved_tensors
        need[4] = need[4] and row_scale is not None
        need[5] = need[5] and col_scale is not None
        w = torch.tensor(list(ctx.weights), dtype=g.dtype, device=g.device)
        grads = _pointwise_prefixes_grad_op(ctx.backend, x, y, scale, row_bias, ctx.dims, row_scale, col_scale,
                                            row_keys, col_keys, ctx.kind, (w[:, None] * g[None, :]).contiguous(),
                                            *need)
    out = [None] * 19
    for i, t, wanted in zip(_PREFIX_GRAD_INPUTS, grads, need):
        out[i] = _or_none(t, wanted)
    return tuple(out)


_pointwise_prefixes_op.register_autograd(_pointwise_prefixes_backward, setup_context=_pointwise_prefixes_setup)
_pointwise_prefixes_grad_op.register_autograd(_refuse_double_backward)
