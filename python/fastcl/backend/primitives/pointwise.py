"""The ``pointwise`` primitive: SigLIP's and MW's sums of a loss of each logit
(``fastcl::engine_pointwise`` and its backward op, fakes, autograd).

With ``reduce`` the upstream gradient is one scalar, so the gradients are computed in the forward
pass (3 GEMMs' worth instead of 4) and returned beside the loss; backward only rescales them.
Per-row output has per-row upstream gradients, so backward recomputes the tiles with them.
"""
# No `from __future__ import annotations`: torch.library.custom_op reads evaluated annotations on
# torch < 2.5 (see __init__.py).
import torch

from ..._checks import math_dtype
from .shared import _kernel_inputs, _kernels, _or_none, _pair_grads, _refuse_double_backward


@torch.library.custom_op("fastcl::engine_pointwise", mutates_args=())
def _pointwise_op(backend: str, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                  row_bias: torch.Tensor | None, row_keys: torch.Tensor | None, col_keys: torch.Tensor | None,
                  kind: int, reduce: bool, need_x: bool, need_y: bool, need_scale: bool,
                  need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    xa, ya = _kernel_inputs(backend, x, y, "pointwise")
    bias = None if row_bias is None else row_bias.contiguous()
    want = reduce and (need_x or need_y or need_scale or need_bias)
    row_sum, gy, gx, d_bias = _kernels(backend, "pointwise").pointwise(xa, ya, scale, bias, row_keys, col_keys, kind,
                                                                       None, want)
    out = row_sum.sum() if reduce else row_sum
    if not want:
        return out, x.new_empty(0), y.new_empty(0), scale.new_empty(0), x.new_empty(0, dtype=math_dtype(x.dtype))
    return out, *_pair_grads(x, y, xa, scale, gy, gx, need_x, need_y, need_scale), \
        d_bias if need_bias else x.new_empty(0, dtype=math_dtype(x.dtype))


@_pointwise_op.register_fake
def _(backend, x, y, scale, row_bias, row_keys, col_keys, kind, reduce, need_x, need_y, need_scale, need_bias):
    acc = math_dtype(x.dtype)
    want = reduce and (need_x or need_y or need_scale or need_bias)
    out = x.new_empty((), dtype=acc) if reduce else x.new_empty(x.shape[0], dtype=acc)
    return (out, torch.empty_like(x) if want and need_x else x.new_empty(0),
            torch.empty_like(y) if want and need_y else y.new_empty(0),
            scale.new_empty(()) if want and need_scale else scale.new_empty(0),
            x.new_empty(x.shape[0], dtype=acc) if want and need_bias else x.new_empty(0, dtype=acc))


@torch.library.custom_op("fastcl::engine_pointwise_grad", mutates_args=())
def _pointwise_grad_op(backend: str, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                       row_bias: torch.Tensor | None, row_keys: torch.Tensor | None, col_keys: torch.Tensor | None,
                       kind: int, g_row: torch.Tensor, need_x: bool, need_y: bool, need_scale: bool,
                       need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    xa, ya = _kernel_inputs(backend, x, y, "pointwise")
    bias = None if row_bias is None else row_bias.contiguous()
    _, gy, gx, d_bias = _kernels(backend, "pointwise").pointwise(xa, ya, scale, bias, row_keys, col_keys, kind, g_row,
                                                                 True)
    no_bias = x.new_empty(0, dtype=math_dtype(x.dtype))
    return *_pair_grads(x, y, xa, scale, gy, gx, need_x, need_y, need_scale), d_bias if need_bias else no_bias


@_pointwise_grad_op.register_fake
def _(backend, x, y, scale, row_bias, row_keys, col_keys, kind, g_row, need_x, need_y, need_scale, need_bias):
    return (torch.empty_like(x) if need_x else x.new_empty(0), torch.empty_like(y) if need_y else y.new_empty(0),
            scale.new_empty(()) if need_scale else scale.new_empty(0),
            x.new_empty(x.shape[0] if need_bias else 0, dtype=math_dtype(x.dtype)))


def _pointwise_setup(ctx, inputs, output):
    backend, x, y, scale, row_bias, row_keys, col_keys, kind, reduce, *_ = inputs
    ctx.backend, ctx.kind, ctx.reduce = backend, kind, reduce
    if reduce:
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(x, y, scale, row_bias, row_keys, col_keys)


def _pointwise_backward(ctx, g, *_unused):
    need = ctx.needs_input_grad[1:5]
    if ctx.reduce:
        # The gradients were computed in the forward pass: constants here, so a graph built
        # through them (create_graph=True) would carry wrong, zero second derivatives.
        if torch.is_grad_enabled():
            _refuse_double_backward(ctx)
        grads = [t * g.to(t.dtype) for t in ctx.saved_tensors]
    else:
        x, y, scale, row_bias, row_keys, col_keys = ctx.saved_tensors
        grads = _pointwise_grad_op(ctx.backend, x, y, scale, row_bias, row_keys, col_keys, ctx.kind,
                                   g.contiguous(), *need)
    return (None, *(_or_none(t, wanted) for t, wanted in zip(grads, need)), None, None, None, None, None, None,
            None, None)


_pointwise_op.register_autograd(_pointwise_backward, setup_context=_pointwise_setup)
_pointwise_grad_op.register_autograd(_refuse_double_backward)
