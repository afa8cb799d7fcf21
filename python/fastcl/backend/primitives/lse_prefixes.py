"""The ``lse_prefixes`` primitive: lse at K nested feature prefixes, for Matryoshka
(``fastcl::engine_lse_prefixes`` and its backward op, fakes, autograd).

S^k = scale * a^k b^k.T * (x[:, :d_k] @ y[:, :d_k].T) for per-prefix row and column factors a, b
(None: 1). One pass over the features forms every S^k; the factors' gradients come back as the
kernels' row / column sums of G^k * S^k, divided by the factors here.
"""
# No `from __future__ import annotations`: torch.library.custom_op reads evaluated annotations on
# torch < 2.5 (see __init__.py).
from typing import Sequence  # noqa: UP035

import torch

from ..._checks import math_dtype
from .shared import (
    _finite_shift,
    _kernel_inputs,
    _kernels,
    _or_none,
    _pair_grads,
    _refuse_double_backward,
    _zeros_if_none,
)


@torch.library.custom_op("fastcl::engine_lse_prefixes", mutates_args=())
def _lse_prefixes_op(backend: str, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, dims: Sequence[int],
                     row_scale: torch.Tensor | None, col_scale: torch.Tensor | None, rows: bool,
                     cols: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xa, ya = _kernel_inputs(backend, x, y, "lse_prefixes")
    return _kernels(backend, "lse_prefixes").lse_forward_prefixes(xa, ya, scale, dims, row_scale, col_scale,
                                                                   rows, cols)


@_lse_prefixes_op.register_fake
def _(backend, x, y, scale, dims, row_scale, col_scale, rows, cols):
    acc = math_dtype(x.dtype)
    return (x.new_empty(len(dims), x.shape[0] if rows else 0, dtype=acc),
            x.new_empty(len(dims), y.shape[0] if cols else 0, dtype=acc))


@torch.library.custom_op("fastcl::engine_lse_prefixes_grad", mutates_args=())
def _lse_prefixes_grad_op(backend: str, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, dims: Sequence[int],
                          row_scale: torch.Tensor | None, col_scale: torch.Tensor | None, row_lse: torch.Tensor,
                          col_lse: torch.Tensor, g_row: torch.Tensor, g_col: torch.Tensor, rows: bool, cols: bool,
                          need_x: bool, need_y: bool, need_scale: bool, need_row_scale: bool,
                          need_col_scale: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
    xa, ya = _kernel_inputs(backend, x, y, "lse_prefixes")
    gy, gx, row_gs, col_gs = _kernels(backend, "lse_prefixes").lse_backward_prefixes(
        xa, ya, scale, dims, row_scale, col_scale, _finite_shift(row_lse), _finite_shift(col_lse), g_row, g_col,
        rows, cols)
    dx, dy, dscale = _pair_grads(x, y, xa, scale, gy, gx, need_x, need_y, need_scale)
    # d S^k_ij / d a^k_i = S^k_ij / a^k_i: the factors are inverse norms, never 0
    d_row = row_gs / row_scale if need_row_scale else row_gs.new_empty(0)
    d_col = col_gs / col_scale if need_col_scale else col_gs.new_empty(0)
    return dx, dy, dscale, d_row, d_col


@_lse_prefixes_grad_op.register_fake
def _(backend, x, y, scale, dims, row_scale, col_scale, row_lse, col_lse, g_row, g_col, rows, cols, need_x, need_y,
      need_scale, need_row_scale, need_col_scale):
    acc = math_dtype(x.dtype)
    return (torch.empty_like(x) if need_x else x.new_empty(0), torch.empty_like(y) if need_y else y.new_empty(0),
            scale.new_empty(()) if need_scale else scale.new_empty(0),
            x.new_empty((len(dims), x.shape[0]) if need_row_scale else (0,), dtype=acc),
            x.new_empty((len(dims), y.shape[0]) if need_col_scale else (0,), dtype=acc))


def _lse_prefixes_setup(ctx, inputs, output):
    backend, x, y, scale, dims, row_scale, col_scale, rows, cols = inputs
    ctx.save_for_backward(x, y, scale, row_scale, col_scale, *output)
    ctx.backend, ctx.dims, ctx.flags = backend, dims, (rows, cols)


def _lse_prefixes_backward(ctx, g_row, g_col):
    x, y, scale, row_scale, col_scale, row_lse, col_lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = _lse_prefixes_grad_op(
        ctx.backend, x, y, scale, ctx.dims, row_scale, col_scale, row_lse, col_lse, _zeros_if_none(g_row, row_lse),
        _zeros_if_none(g_col, col_lse), *ctx.flags, need[1], need[2], need[3], need[5] and row_scale is not None,
        need[6] and col_scale is not None)
    dx, dy, dscale, d_row, d_col = grads
    return (None, _or_none(dx, need[1]), _or_none(dy, need[2]), _or_none(dscale, need[3]), None,
            _or_none(d_row, need[5] and row_scale is not None), _or_none(d_col, need[6] and col_scale is not None),
            None, None)


_lse_prefixes_op.register_autograd(_lse_prefixes_backward, setup_context=_lse_prefixes_setup)
_lse_prefixes_grad_op.register_autograd(_refuse_double_backward)
