"""The two primitives every loss is composed of, with their autograd, shared by all engine backends.

    S = scale * x @ y.T                  x [M, D] rows, y [N, D] columns, scale a 0-d tensor
    keys = (row_keys [M], col_keys [N])  pairs with equal keys are "keyed": excluded from the
                                         log-sum-exp, SigLIP's positives, MW's excluded targets

    lse(x, y, scale, keys, rows, cols, pair_cols)
                                        -> row and/or column log-sum-exp over the non-keyed pairs,
                                           and optionally the logits S_{i, p(i)} of one column per row
    pointwise(x, y, scale, row_bias, keys, kind, reduce)
                                        -> sum_j loss(S_ij + row_bias_i) per row [M], or its total

A backend supplies three raw kernels over float32/float64 contiguous inputs (``Kernels`` below);
this module does the rest once: upcasting 16-bit inputs, saving only x, y and O(M + N) statistics
for backward, turning the kernels' ``G @ y`` and ``G.T @ x`` into dx, dy, dscale, and casting the
gradients back to the input dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from .._checks import math_dtype

POINTWISE_KINDS = {"siglip": 0, "mw": 1}


class Kernels(Protocol):
    def lse_forward(self, x, y, scale, row_keys, col_keys, rows: bool, cols: bool):
        """-> (row_lse [M] or [0], col_lse [N] or [0])"""

    def lse_backward(self, x, y, scale, row_keys, col_keys, row_shift, col_shift, g_row, g_col,
                     rows: bool, cols: bool):
        """-> (G @ y, G.T @ x) for G = d(sum g_row * row_lse + sum g_col * col_lse) / dS; the shifts
        are the saved lse with -inf replaced by 0."""

    def pointwise(self, x, y, scale, row_bias, row_keys, col_keys, kind: int, g_row, want_grads: bool):
        """-> (row sums [M], D @ y, D.T @ x, row sums of D) for D = g_row * d loss / dS (g_row None: 1);
        the last three are empty unless want_grads."""


def _math_inputs(x: torch.Tensor, y: torch.Tensor):
    acc = math_dtype(x.dtype)
    xa = x.to(acc).contiguous()
    return xa, (xa if y is x else y.to(acc).contiguous())


def _finite_shift(lse: torch.Tensor) -> torch.Tensor:
    """A fully keyed line has lse = -inf and only -inf logits: shifting by 0 gives exp(-inf) = 0
    rather than exp(-inf - -inf) = NaN."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _pair_grads(needs, x, y, xa, scale, gy, gx):
    """dx, dy, dscale from ``gy = G @ y`` and ``gx = G.T @ x`` (consumed in place).

    ``x is y`` (self-similarity) needs no special case: autograd adds the two gradients."""
    # d/dscale sum_ij G_ij scale <x_i, y_j> = sum_i <x_i, (G y)_i>
    dscale = torch.dot(gy.reshape(-1), xa.reshape(-1)).to(scale.dtype) if needs[2] else None
    dx = gy.mul_(scale).to(x.dtype) if needs[0] else None
    dy = gx.mul_(scale).to(y.dtype) if needs[1] else None
    return dx, dy, dscale


class LSE(NamedTuple):
    row_lse: torch.Tensor | None     # [M] log-sum-exp over each row's non-keyed pairs
    col_lse: torch.Tensor | None     # [N] the same over each column
    pair_logit: torch.Tensor | None  # [M] S_{i, p(i)}


def _paired_rows(ya: torch.Tensor, m: int, pair_cols) -> torch.Tensor:
    """``y[p(i)]`` for every row i: a view for the diagonal, a gather otherwise."""
    return ya[:m] if isinstance(pair_cols, str) else ya[pair_cols]


class _LSE(torch.autograd.Function):
    """The pair logits are computed here, beside the log-sum-exps, so that their gradient is added
    in place into the kernels' ``G @ y`` and ``G.T @ x``: no extra [M, D] gradient buffers."""

    @staticmethod
    def forward(ctx, kernels, x, y, scale, row_keys, col_keys, rows: bool, cols: bool, pair_cols):
        xa, ya = _math_inputs(x, y)
        row_lse, col_lse = kernels.lse_forward(xa, ya, scale, row_keys, col_keys, rows, cols)
        m = x.shape[0]
        if pair_cols is None:
            pair = xa.new_empty(0)
        else:  # row-wise dot products without an [M, D] temporary
            pair = torch.einsum("md,md->m", xa, _paired_rows(ya, m, pair_cols)) * scale
        index = pair_cols if isinstance(pair_cols, torch.Tensor) else None
        ctx.save_for_backward(x, y, scale, row_lse, col_lse, row_keys, col_keys, index)
        ctx.kernels, ctx.flags, ctx.pair_cols = kernels, (rows, cols), pair_cols if index is None else "index"
        return row_lse, col_lse, pair

    @staticmethod
    def backward(ctx, g_row, g_col, g_pair):
        x, y, scale, row_lse, col_lse, row_keys, col_keys, index = ctx.saved_tensors
        xa, ya = _math_inputs(x, y)
        gy, gx = ctx.kernels.lse_backward(
            xa, ya, scale, row_keys, col_keys, _finite_shift(row_lse), _finite_shift(col_lse),
            g_row.contiguous(), g_col.contiguous(), *ctx.flags)
        if ctx.pair_cols is not None:  # S_{i,p(i)} = scale <x_i, y_p(i)>: G gets g_pair at (i, p(i))
            pair_cols = index if ctx.pair_cols == "index" else ctx.pair_cols
            g = g_pair[:, None]
            gy.addcmul_(_paired_rows(ya, x.shape[0], pair_cols), g)
            if index is None:
                gx[: x.shape[0]].addcmul_(xa, g)
            else:
                gx.index_add_(0, index, xa * g)
        grads = _pair_grads(ctx.needs_input_grad[1:], x, y, xa, scale, gy, gx)
        return (None, *grads, None, None, None, None, None)


class _SymmetricLSE(torch.autograd.Function):
    """Row log-sum-exp of a symmetric ``S = scale * z @ z.T`` with symmetric keys: kernels that
    exploit the symmetry visit half the tiles (2 GEMMs' worth instead of 4)."""

    @staticmethod
    def forward(ctx, kernels, z, scale, keys):
        za, _ = _math_inputs(z, z)
        row_lse = kernels.lse_forward_symmetric(za, scale, keys)
        ctx.save_for_backward(z, scale, row_lse, keys)
        ctx.kernels = kernels
        return row_lse

    @staticmethod
    def backward(ctx, g_row):
        z, scale, row_lse, keys = ctx.saved_tensors
        za, _ = _math_inputs(z, z)
        gz = ctx.kernels.lse_backward_symmetric(za, scale, keys, _finite_shift(row_lse), g_row.contiguous())
        # gz = (G + G.T) z, so sum_ij G_ij <z_i, z_j> = <z, gz> / 2
        dscale = torch.dot(gz.reshape(-1), za.reshape(-1)).div_(2).to(scale.dtype) if ctx.needs_input_grad[2] else None
        dz = gz.mul_(scale).to(z.dtype) if ctx.needs_input_grad[1] else None
        return None, dz, dscale, None


class _Pointwise(torch.autograd.Function):
    """With ``reduce`` the upstream gradient is one scalar, so the gradients are computed in the
    forward pass (3 GEMMs' worth instead of 4) and backward only rescales them. Per-row output has
    per-row upstream gradients, so backward recomputes the tiles with them."""

    @staticmethod
    def forward(ctx, kernels, x, y, scale, row_bias, row_keys, col_keys, kind: str, reduce: bool):
        xa, ya = _math_inputs(x, y)
        bias = None if row_bias is None else row_bias.contiguous()
        needs = ctx.needs_input_grad[1:5]
        want = reduce and any(needs)
        row_sum, gy, gx, d_bias = kernels.pointwise(xa, ya, scale, bias, row_keys, col_keys,
                                                    POINTWISE_KINDS[kind], None, want)
        ctx.kernels, ctx.kind, ctx.reduce = kernels, kind, reduce
        if reduce:
            grads = _pair_grads(needs, x, y, xa, scale, gy, gx) if want else (None, None, None)
            ctx.save_for_backward(*grads, d_bias if want and needs[3] else None)
            return row_sum.sum()
        ctx.save_for_backward(x, y, scale, bias, row_keys, col_keys)
        return row_sum

    @staticmethod
    def backward(ctx, g):
        if ctx.reduce:
            grads = [None if t is None else t * g.to(t.dtype) for t in ctx.saved_tensors]
        else:
            x, y, scale, bias, row_keys, col_keys = ctx.saved_tensors
            xa, ya = _math_inputs(x, y)
            _, gy, gx, d_bias = ctx.kernels.pointwise(xa, ya, scale, bias, row_keys, col_keys,
                                                      POINTWISE_KINDS[ctx.kind], g.contiguous(), True)
            needs = ctx.needs_input_grad[1:5]
            grads = [*_pair_grads(needs, x, y, xa, scale, gy, gx), d_bias if needs[3] else None]
        return (None, *grads, None, None, None, None)


class Engine:
    """The primitives over one backend's kernels. ``symmetric``: the kernels also have
    ``lse_forward_symmetric(z, scale, keys) -> row_lse`` and
    ``lse_backward_symmetric(z, scale, keys, shift, g) -> (G + G.T) @ z``, used for ``lse(z, z)``."""

    def __init__(self, name: str, kernels: Kernels, *, symmetric: bool = False):
        self.name, self.kernels, self.symmetric = name, kernels, symmetric

    def lse(self, x, y, scale, *, keys=None, rows: bool = True, cols: bool = False, pair_cols=None) -> LSE:
        """Row (``[M]``) and column (``[N]``) log-sum-exp of ``scale * x @ y.T`` over non-keyed pairs,
        in the math dtype. ``pair_cols``: ``"diagonal"`` (``p(i) = i``) or an index tensor ``[M]``
        asks for the logits ``S_{i, p(i)}`` too (a loss's targets)."""
        if isinstance(pair_cols, str) and pair_cols != "diagonal":
            raise ValueError(f"pair_cols must be None, 'diagonal' or an index tensor, got {pair_cols!r}")
        row_keys, col_keys = (None, None) if keys is None else keys
        if self.symmetric and x is y and row_keys is col_keys and rows and not cols and pair_cols is None:
            return LSE(_SymmetricLSE.apply(self.kernels, x, scale, row_keys), None, None)
        row_lse, col_lse, pair = _LSE.apply(self.kernels, x, y, scale, row_keys, col_keys, rows, cols, pair_cols)
        return LSE(row_lse if rows else None, col_lse if cols else None, None if pair_cols is None else pair)

    def pointwise(self, x, y, scale, row_bias=None, *, keys=None, kind: str, reduce: bool):
        """``sum_j loss(scale <x_i, y_j> + row_bias_i)`` per row ``[M]``, or its total if ``reduce``."""
        row_keys, col_keys = (None, None) if keys is None else keys
        return _Pointwise.apply(self.kernels, x, y, scale, row_bias, row_keys, col_keys, kind, reduce)
