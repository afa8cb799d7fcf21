"""The two primitives every loss is composed of, with their autograd, shared by all engine backends.

    S = scale * x @ y.T                  x [M, D] rows, y [N, D] columns, scale a 0-d tensor
    keys = (row_keys [M], col_keys [N])  pairs with equal keys are "keyed": excluded from the
                                         log-sum-exp, SigLIP's positives, MW's excluded targets

    lse(x, y, scale, keys, rows, cols, pair_cols)
                                        -> row and/or column log-sum-exp over the non-keyed pairs,
                                           and optionally the logits S_{i, p(i)} of one column per row
    pointwise(x, y, scale, row_bias, keys, kind, reduce)
                                        -> sum_j loss(S_ij + row_bias_i) per row [M], or its total

A backend supplies raw kernels over contiguous inputs (``Kernels`` in ``shared.py``) in the modules its
declaration (``registry.py``) names for the ``lse`` and ``pointwise`` ops; this package does the rest
once: upcasting 16-bit inputs, saving only x, y and O(M + N) statistics for backward, turning the
kernels' ``G @ y`` and ``G.T @ x`` into dx, dy, dscale, and casting the gradients back to the input
dtype.

Callers that merge statistics over blocks of columns themselves (``fastcl.distributed``'s turns)
use the same kernels one block at a time through ``Engine.operands``, ``block_lse``,
``block_lse_grads``, ``block_pointwise``, and turn their sums into gradients with ``scale_grad``
and ``feature_grad``: 16-bit inputs reach the kernels that take them as they are, statistics and
gradient terms come back in the math dtype.
"""
# No `from __future__ import annotations` in this package's op modules: before torch 2.5,
# torch.library.custom_op infers each op's schema from evaluated annotations and rejects strings
# (fastcl supports torch >= 2.4); for the same reason int lists are typing.Sequence[int] (list[int]
# is known from torch 2.6 on).
#
# The files: shared.py (the kernels' protocol and what every op uses), one module per op (lse,
# lse_symmetric, pointwise, lse_prefixes, pointwise_prefixes: the torch.library op, its fake, its backward
# op and their autograd, registered when the module is imported) and engine.py (``Engine``, which
# imports every op module). Op modules import shared.py, never this package: no import cycle.
from .engine import Engine

__all__ = ["Engine"]
