"""The ``lse`` primitive: the forward op, its fake, its backward op (``fastcl::engine_lse``,
``fastcl::engine_lse_grad``) and their autograd; ``exclude`` takes the kernels of op ``lse_exclude``.

The pair logits are computed beside the log-sum-exps so that their gradient is added in place
into the kernels' G @ y and G.T @ x: no extra [M, D] gradient buffers.
"""
# No `from __future__ import annotations`: torch.library.custom_op reads evaluated annotations on
# torch < 2.5 (see __init__.py).
import torch

from ..._checks import math_dtype
from .shared import (
    _acc,
    _finite_shift,
    _kernel_inputs,
    _kernels,
    _or_none,
    _pair_grads,
    _refuse_double_backward,
    _zeros_if_none,
)


def _paired_rows(ya: torch.Tensor, m: int, pair_index, pair_diagonal: bool) -> torch.Tensor:
    """``y[p(i)]`` for every row i: a view for the diagonal, a gather otherwise."""
    return ya[:m] if pair_diagonal else ya[pair_index]


@torch.library.custom_op("fastcl::engine_lse", mutates_args=())
def _lse_op(backend: str, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, row_keys: torch.Tensor | None,
            col_keys: torch.Tensor | None, rows: bool, cols: bool, pair_index: torch.Tensor | None,
            pair_diagonal: bool, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xa, ya = _kernel_inputs(backend, x, y)
    if exclude is None:
        row_lse, col_lse = _kernels(backend, "lse").lse_forward(xa, ya, scale, row_keys, col_keys, rows, cols)
    else:
        row_lse, col_lse = _kernels(backend, "lse_exclude").lse_forward_excluding(xa, ya, scale, row_keys, col_keys,
                                                                                   exclude.contiguous(), rows, cols)
    if pair_index is None and not pair_diagonal:
        pair = xa.new_empty(0)
    else:  # row-wise dot products without an [M, D] temporary
        paired = _acc(_paired_rows(ya, x.shape[0], pair_index, pair_diagonal))
        pair = torch.einsum("md,md->m", _acc(xa), paired) * scale
    return row_lse, col_lse, pair


@_lse_op.register_fake
def _(backend, x, y, scale, row_keys, col_keys, rows, cols, pair_index, pair_diagonal, exclude):
    acc = math_dtype(x.dtype)
    paired = pair_index is not None or pair_diagonal
    return (x.new_empty(x.shape[0] if rows else 0, dtype=acc), x.new_empty(y.shape[0] if cols else 0, dtype=acc),
            x.new_empty(x.shape[0] if paired else 0, dtype=acc))


@torch.library.custom_op("fastcl::engine_lse_grad", mutates_args=())
def _lse_grad_op(backend: str, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                 row_keys: torch.Tensor | None, col_keys: torch.Tensor | None, row_lse: torch.Tensor,
                 col_lse: torch.Tensor, g_row: torch.Tensor, g_col: torch.Tensor, g_pair: torch.Tensor,
                 rows: bool, cols: bool, pair_index: torch.Tensor | None, pair_diagonal: bool,
                 need_x: bool, need_y: bool, need_scale: bool,
                 exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xa, ya = _kernel_inputs(backend, x, y)
    shifts = (_finite_shift(row_lse), _finite_shift(col_lse), g_row, g_col, rows, cols)
    if exclude is None:
        gy, gx = _kernels(backend, "lse").lse_backward(xa, ya, scale, row_keys, col_keys, *shifts)
    else:
        gy, gx = _kernels(backend, "lse_exclude").lse_backward_excluding(xa, ya, scale, row_keys, col_keys,
                                                                         exclude.contiguous(), *shifts)
    if pair_index is not None or pair_diagonal:  # S_{i,p(i)} = scale <x_i, y_p(i)>: G gets g_pair at (i, p(i))
        g = g_pair[:, None]
        gy.addcmul_(_acc(_paired_rows(ya, x.shape[0], pair_index, pair_diagonal)), g)
        if pair_diagonal:
            gx[: x.shape[0]].addcmul_(_acc(xa), g)
        else:
            gx.index_add_(0, pair_index, _acc(xa) * g)
    return _pair_grads(x, y, xa, scale, gy, gx, need_x, need_y, need_scale)


@_lse_grad_op.register_fake
def _(backend, x, y, scale, row_keys, col_keys, row_lse, col_lse, g_row, g_col, g_pair, rows, cols, pair_index,
      pair_diagonal, need_x, need_y, need_scale, exclude):
    return (torch.empty_like(x) if need_x else x.new_empty(0), torch.empty_like(y) if need_y else y.new_empty(0),
            scale.new_empty(()) if need_scale else scale.new_empty(0))


def _lse_setup(ctx, inputs, output):
    backend, x, y, scale, row_keys, col_keys, rows, cols, pair_index, pair_diagonal, exclude = inputs
    row_lse, col_lse, _ = output
    ctx.save_for_backward(x, y, scale, row_keys, col_keys, row_lse, col_lse, pair_index, exclude)
    ctx.backend, ctx.flags, ctx.pair_diagonal = backend, (rows, cols), pair_diagonal


def _lse_backward(ctx, g_row, g_col, g_pair):
    x, y, scale, row_keys, col_keys, row_lse, col_lse, pair_index, exclude = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dy, dscale = _lse_grad_op(
        ctx.backend, x, y, scale, row_keys, col_keys, row_lse, col_lse, _zeros_if_none(g_row, row_lse),
        _zeros_if_none(g_col, col_lse), _zeros_if_none(g_pair, row_lse if pair_index is None else x[:, 0]),
        *ctx.flags, pair_index, ctx.pair_diagonal, need[1], need[2], need[3], exclude)
    return None, _or_none(dx, need[1]), _or_none(dy, need[2]), _or_none(dscale, need[3]), None, None, None, None, \
        None, None, None


_lse_op.register_autograd(_lse_backward, setup_context=_lse_setup)
_lse_grad_op.register_autograd(_refuse_double_backward)
