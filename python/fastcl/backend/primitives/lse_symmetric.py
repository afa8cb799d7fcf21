"""The ``lse_symmetric`` primitive: the row log-sum-exp of a symmetric S = scale z @ z.T
(``fastcl::engine_lse_symmetric`` and its backward op, fakes, autograd).

Kernels that exploit the symmetry visit half the tiles (2 GEMMs' worth instead of 4).
"""
# No `from __future__ import annotations`: torch.library.custom_op reads evaluated annotations on
# torch < 2.5 (see __init__.py).
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


@torch.library.custom_op("fastcl::engine_lse_symmetric", mutates_args=())
def _lse_symmetric_op(backend: str, z: torch.Tensor, scale: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
    za, _ = _kernel_inputs(backend, z, z, "lse_symmetric")
    return _kernels(backend, "lse_symmetric").lse_forward_symmetric(za, scale, keys)


@_lse_symmetric_op.register_fake
def _(backend, z, scale, keys):
    return z.new_empty(z.shape[0], dtype=math_dtype(z.dtype))


@torch.library.custom_op("fastcl::engine_lse_symmetric_grad", mutates_args=())
def _lse_symmetric_grad_op(backend: str, z: torch.Tensor, scale: torch.Tensor, keys: torch.Tensor | None,
                           row_lse: torch.Tensor, g_row: torch.Tensor, need_z: bool,
                           need_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    za, _ = _kernel_inputs(backend, z, z, "lse_symmetric")
    gz = _kernels(backend, "lse_symmetric").lse_backward_symmetric(za, scale, keys, _finite_shift(row_lse), g_row)
    dz, _, dscale = _pair_grads(z, z, za, scale, gz, None, need_z, False, need_scale, half=True)
    return dz, dscale


@_lse_symmetric_grad_op.register_fake
def _(backend, z, scale, keys, row_lse, g_row, need_z, need_scale):
    return (torch.empty_like(z) if need_z else z.new_empty(0),
            scale.new_empty(()) if need_scale else scale.new_empty(0))


def _lse_symmetric_setup(ctx, inputs, output):
    backend, z, scale, keys = inputs
    ctx.save_for_backward(z, scale, keys, output)
    ctx.backend = backend


def _lse_symmetric_backward(ctx, g_row):
    z, scale, keys, row_lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    dz, dscale = _lse_symmetric_grad_op(ctx.backend, z, scale, keys, row_lse, _zeros_if_none(g_row, row_lse),
                                        need[1], need[2])
    return None, _or_none(dz, need[1]), _or_none(dscale, need[2]), None


_lse_symmetric_op.register_autograd(_lse_symmetric_backward, setup_context=_lse_symmetric_setup)
_lse_symmetric_grad_op.register_autograd(_refuse_double_backward)
