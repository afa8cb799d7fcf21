"""The streaming top-k op every backend but ``reference`` runs (``fastcl.topk`` in ``mining.py`` is
the user-facing function and holds the definition):

    topk(x, y, scale, k, row_keys, col_keys, exclude_diagonal) -> (values [M, k], columns [M, k] int64)

the k largest ``S_ij = scale * <x_i, y_j>`` of each row over its eligible columns, descending, ties
to the lower column. Each backend that declares the ``topk`` op (``registry.py``) supplies that
kernel over contiguous inputs in a dtype it takes natively (others are upcast to the math dtype
first). This module holds what is shared: the ``torch.library`` op (``fastcl::engine_topk``, with
its fake, so ``torch.compile`` traces it) and the gradient of the values, from the picked columns.
"""
# No `from __future__ import annotations`: torch.library.custom_op reads evaluated annotations on
# torch < 2.5 (see primitives/__init__.py).
import torch

from .._checks import math_dtype
from . import registry


@torch.library.custom_op("fastcl::engine_topk", mutates_args=())
def _topk_op(backend: str, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, k: int,
             row_keys: torch.Tensor | None, col_keys: torch.Tensor | None,
             exclude_diagonal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    native = registry.native_dtypes(backend, "topk")  # the triton kernel reads 16-bit inputs as they are
    if x.dtype not in native:
        acc = math_dtype(x.dtype)
        x, y = x.to(acc), y.to(acc)
    values, indices = registry.kernels(backend, "topk").topk(x.detach().contiguous(), y.detach().contiguous(), scale,
                                                             k, row_keys, col_keys, exclude_diagonal)
    return values.to(scale.dtype), indices


@_topk_op.register_fake
def _(backend, x, y, scale, k, row_keys, col_keys, exclude_diagonal):
    return x.new_empty((x.shape[0], k), dtype=scale.dtype), x.new_empty((x.shape[0], k), dtype=torch.int64)


def _topk_setup(ctx, inputs, output):
    _, x, y, scale, *_ = inputs
    ctx.save_for_backward(x, y, scale, output[1])


def _topk_backward(ctx, g_values, _g_indices):
    """values_ic = scale <x_i, y_{j(i,c)}>: dx_i = scale sum_c g_ic y_j(i,c), dy_j = scale sum of
    g_ic x_i over the (i, c) that picked j. One column of picks at a time: O((M + N) * D) memory."""
    x, y, scale, indices = ctx.saved_tensors
    need_x, need_y = ctx.needs_input_grad[1:3]
    acc = scale.dtype
    xa, ya, g = x.to(acc), y.to(acc), g_values.to(acc)
    dx = torch.zeros_like(xa) if need_x else None
    dy = torch.zeros_like(ya) if need_y else None
    for c in range(indices.shape[1]):
        cols, gc = indices[:, c], g[:, c:c + 1]
        if need_x:
            dx.addcmul_(ya[cols], gc)
        if need_y:
            dy.index_add_(0, cols, xa * gc)
    dx = None if dx is None else (dx * scale).to(x.dtype)
    dy = None if dy is None else (dy * scale).to(y.dtype)
    return None, dx, dy, None, None, None, None, None


_topk_op.register_autograd(_topk_backward, setup_context=_topk_setup)
