"""The two primitives every loss is composed of, with their autograd, shared by all engine backends.

    S = scale * x @ y.T                  x [M, D] rows, y [N, D] columns, scale a 0-d tensor
    keys = (row_keys [M], col_keys [N])  pairs with equal keys are "keyed": excluded from the
                                         log-sum-exp, SigLIP's positives, MW's excluded targets

    lse(x, y, scale, keys, rows, cols, pair_cols)
                                        -> row and/or column log-sum-exp over the non-keyed pairs,
                                           and optionally the logits S_{i, p(i)} of one column per row
    pointwise(x, y, scale, row_bias, keys, kind, reduce)
                                        -> sum_j loss(S_ij + row_bias_i) per row [M], or its total

A backend supplies raw kernels over contiguous inputs (``Kernels`` below) in the modules its
declaration (``registry.py``) names for the ``lse`` and ``pointwise`` ops; this module does the rest
once: upcasting 16-bit inputs, saving only x, y and O(M + N) statistics for backward, turning the
kernels' ``G @ y`` and ``G.T @ x`` into dx, dy, dscale, and casting the gradients back to the input
dtype.

Callers that merge statistics over blocks of columns themselves (``fastcl.distributed``'s turns)
use the same kernels one block at a time through ``Engine.operands``, ``block_lse``,
``block_lse_grads``, ``block_pointwise``, and turn their sums into gradients with ``scale_grad``
and ``feature_grad``: 16-bit inputs reach the kernels that take them as they are, statistics and
gradient terms come back in the math dtype.
"""
# No `from __future__ import annotations` here: before torch 2.5, torch.library.custom_op infers
# each op's schema from evaluated annotations and rejects strings (fastcl supports torch >= 2.4);
# for the same reason int lists are typing.Sequence[int] (list[int] is known from torch 2.6 on).
from types import SimpleNamespace
from typing import NamedTuple, Protocol, Sequence  # noqa: UP035

import torch

from .._checks import math_dtype
from . import registry

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

    # op lse_exclude (optional): lse with each row's listed columns left out too
    def lse_forward_excluding(self, x, y, scale, row_keys, col_keys, exclude, rows: bool, cols: bool):
        """``lse_forward`` where also the pairs (i, exclude[i, e]) leave the statistics; ``exclude
        [M, E]`` holds column indices, -1 padded."""

    def lse_backward_excluding(self, x, y, scale, row_keys, col_keys, exclude, row_shift, col_shift, g_row, g_col,
                               rows: bool, cols: bool):
        """``lse_backward`` with the same pairs left out (their G is 0)."""

    # op lse_prefixes (optional): lse at K nested feature prefixes d_1 < ... < d_K, one pass over D
    def lse_forward_prefixes(self, x, y, scale, dims, row_scale, col_scale, rows: bool, cols: bool):
        """-> (row_lse [K, M] or [K, 0], col_lse [K, N] or [K, 0]) of each
        ``S^k_ij = scale * a^k_i * b^k_j * <x_i[:d_k], y_j[:d_k]>``; ``row_scale`` a [K, M], ``col_scale``
        b [K, N] (None: 1)."""

    def lse_backward_prefixes(self, x, y, scale, dims, row_scale, col_scale, row_shift, col_shift, g_row, g_col,
                              rows: bool, cols: bool):
        """-> (gy, gx, row_gs [K, M], col_gs [K, N]) for ``G^k = d(sum g_row^k row_lse^k + ...) / dS^k``:
        features ``[d_{s-1}, d_s)`` of gy hold ``sum_{k >= s} (a^k b^k.T * G^k) @ y`` there (0 past d_K),
        gx the transposes with x; row_gs and col_gs the row and column sums of ``G^k * S^k``."""

    # op pointwise_prefixes (optional): pointwise at K nested feature prefixes, one pass over D
    def pointwise_prefixes(self, x, y, scale, row_bias, dims, row_scale, col_scale, row_keys, col_keys, kind: int,
                           g_row, want_grads: bool):
        """-> (row sums [K, M], gy, gx, d_bias [M], row_gs [K, M], col_gs [K, N]) of the loss of each
        ``S^k_ij = T^k_ij + row_bias_i``, ``T^k_ij = scale * a^k_i * b^k_j * <x_i[:d_k], y_j[:d_k]>`` (factors as
        ``lse_forward_prefixes``), for ``D^k = g_row^k * d loss / dS^k`` (``g_row [K, M]``, None: 1):
        features ``[d_{s-1}, d_s)`` of gy hold ``sum_{k >= s} (a^k b^k.T * D^k) @ y`` there (0 past d_K),
        gx the transposes with x; ``d_bias`` the row sums of ``sum_k D^k``; row_gs and col_gs the row and
        column sums of ``D^k * T^k``. All but the first are empty unless want_grads."""

    # op lse_symmetric (optional): lse(z, z) over half the tiles
    def lse_forward_symmetric(self, z, scale, keys):
        """-> row_lse [M]"""

    def lse_backward_symmetric(self, z, scale, keys, shift, g_row):
        """-> (G + G.T) @ z"""


def _kernels(backend: str, op: str):
    return registry.kernels(backend, op)


def _prepared(native: tuple[torch.dtype, ...], *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor contiguous, in its own dtype where the kernels compute on it natively (``native``:
    16-bit on triton and cuda, accumulated in float32 by the kernels), else upcast to the math dtype.
    Prepared tensors come back as they are; one passed twice is prepared once."""
    done: dict[int, torch.Tensor] = {}
    for t in tensors:
        if id(t) not in done:
            done[id(t)] = (t if t.dtype in native else t.to(math_dtype(t.dtype))).contiguous()
    return [done[id(t)] for t in tensors]


def _kernel_inputs(backend: str, x: torch.Tensor, y: torch.Tensor, op: str = "lse"):
    """x, y as the backend's kernels for ``op`` take them (``_prepared``)."""
    return _prepared(registry.native_dtypes(backend, op), x, y)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """In the math dtype, for the O((M + N) * D) work done here beside the kernels."""
    return t.to(math_dtype(t.dtype))


def _finite_shift(lse: torch.Tensor) -> torch.Tensor:
    """A fully keyed line has lse = -inf and only -inf logits: shifting by 0 gives exp(-inf) = 0
    rather than exp(-inf - -inf) = NaN."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def scale_grad(gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``d/dscale sum_ij G_ij scale <x_i, y_j> = sum_i <x_i, (G y)_i>`` from ``gy = G @ y`` (0-d, math dtype).
    The same from ``gx = G.T @ x`` and ``y``."""
    return torch.dot(gy.reshape(-1), _acc(x).reshape(-1))


def feature_grad(g: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``dx = scale * G @ y`` from ``g = G @ y`` (consumed in place), in ``like``'s dtype; ``dy`` likewise."""
    return g.mul_(scale).to(like.dtype)


def _pair_grads(x, y, xa, scale, gy, gx, need_x: bool, need_y: bool, need_scale: bool, half: bool = False):
    """dx, dy, dscale from ``gy = G @ y`` and ``gx = G.T @ x`` (consumed in place); empty where not
    needed (custom ops return tensors, never None)."""
    dscale = scale_grad(gy, xa) * (0.5 if half else 1.0) if need_scale else None  # half: gy held (G + G.T) y
    dx = feature_grad(gy, scale, x) if need_x else x.new_empty(0)
    dy = feature_grad(gx, scale, y) if need_y and gx is not None else y.new_empty(0)
    return dx, dy, dscale.to(scale.dtype) if need_scale else scale.new_empty(0)


def _or_none(t: torch.Tensor, wanted: bool):
    return t if wanted else None


def _zeros_if_none(g, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g.contiguous()


def _paired_rows(ya: torch.Tensor, m: int, pair_index, pair_diagonal: bool) -> torch.Tensor:
    """``y[p(i)]`` for every row i: a view for the diagonal, a gather otherwise."""
    return ya[:m] if pair_diagonal else ya[pair_index]


class LSE(NamedTuple):
    row_lse: torch.Tensor | None     # [M] log-sum-exp over each row's non-keyed pairs
    col_lse: torch.Tensor | None     # [N] the same over each column
    pair_logit: torch.Tensor | None  # [M] S_{i, p(i)}


# --- no double backward ---------------------------------------------------------------------
# The backward ops compute first derivatives from recomputed tiles; their own derivative would
# need second-order kernels. Backward through them raises instead of PyTorch's internal "no
# autograd formula" message (or, for SigLIP/MW's saved gradients, silently zero derivatives).

def _refuse_double_backward(ctx, *grads):
    raise NotImplementedError(
        "fastcl's fused backends (chunked, cpu, triton, cuda) compute first derivatives only; a backward "
        "through a gradient (torch.autograd.grad(..., create_graph=True): gradient penalties, Hessian-vector "
        "products, MAML) needs backend='reference', which materialises S")


# --- lse: the forward op, its fake, its backward op ------------------------------------------
# The pair logits are computed beside the log-sum-exps so that their gradient is added in place
# into the kernels' G @ y and G.T @ x: no extra [M, D] gradient buffers.

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


# --- lse of a symmetric S = scale z @ z.T --------------------------------------------------------
# Kernels that exploit the symmetry visit half the tiles (2 GEMMs' worth instead of 4).

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


# --- pointwise --------------------------------------------------------------------------------
# With ``reduce`` the upstream gradient is one scalar, so the gradients are computed in the forward
# pass (3 GEMMs' worth instead of 4) and returned beside the loss; backward only rescales them.
# Per-row output has per-row upstream gradients, so backward recomputes the tiles with them.

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


# --- lse at K nested feature prefixes (Matryoshka) ----------------------------------------------
# S^k = scale * a^k b^k.T * (x[:, :d_k] @ y[:, :d_k].T) for per-prefix row and column factors a, b
# (None: 1). One pass over the features forms every S^k; the factors' gradients come back as the
# kernels' row / column sums of G^k * S^k, divided by the factors here.

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


# --- pointwise at K nested feature prefixes (Matryoshka SigLIP) ---------------------------------
# S^k = scale * a^k b^k.T * (x[:, :d_k] @ y[:, :d_k].T) + row_bias, the loss sum_k w_k sum_j loss(S^k_ij)
# per row (or its total). As ``pointwise``, with ``reduce`` the gradients are formed in the forward
# pass, so the K weights w_k enter the kernels (as g_row^k = w_k); per-row output recomputes them in
# backward with g_row^k_i = w_k g_i. The factors' gradients are the kernels' row / column sums of
# D^k * T^k, divided by the factors here, as for ``lse_prefixes``.

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


class Engine:
    """The primitives over one backend's kernels, as its declaration (``registry.py``) names them:
    ``lse`` and ``pointwise``, and ``lse(z, z)`` over half the tiles where it declares ``lse_symmetric``.
    16-bit inputs reach kernels that take them natively as they are; the kernels' statistics and
    gradient accumulators are always in the math dtype.

    The primitives run as ``torch.library`` custom ops (``fastcl::engine_*``) with fake
    implementations and registered autograd, so ``torch.compile`` traces them without graph breaks.
    """

    def __init__(self, name: str):
        self.name = name

    @property
    def symmetric(self) -> bool:
        return registry.provides(self.name, "lse_symmetric")

    def provides(self, op: str) -> bool:
        """Whether this backend declares ``op`` (``registry.OPS``)."""
        return registry.provides(self.name, op)

    @property
    def native_dtypes(self) -> tuple[torch.dtype, ...]:
        return registry.native_dtypes(self.name, "lse")

    @property
    def kernels(self) -> Kernels:
        """The raw kernels of the ops this backend declares, as one namespace (imported on first use)."""
        found = {}
        for op in ("lse", "lse_symmetric", "lse_exclude", "lse_prefixes", "pointwise", "pointwise_prefixes"):
            if registry.provides(self.name, op):
                module = registry.kernels(self.name, op)
                found.update({f: getattr(module, f) for f in registry.OPS[op].functions})
        return SimpleNamespace(**found)

    def lse(self, x, y, scale, *, keys=None, rows: bool = True, cols: bool = False, pair_cols=None,
            exclude=None) -> LSE:
        """Row (``[M]``) and column (``[N]``) log-sum-exp of ``scale * x @ y.T`` over non-keyed pairs,
        in the math dtype. ``pair_cols``: ``"diagonal"`` (``p(i) = i``) or an index tensor ``[M]``
        asks for the logits ``S_{i, p(i)}`` too (a loss's targets). ``exclude [M, E]``: each row's
        columns (``-1`` padded) left out too (op ``lse_exclude``)."""
        diagonal = isinstance(pair_cols, str)
        if diagonal and pair_cols != "diagonal":
            raise ValueError(f"pair_cols must be None, 'diagonal' or an index tensor, got {pair_cols!r}")
        row_keys, col_keys = (None, None) if keys is None else keys
        if self.symmetric and x is y and row_keys is col_keys and rows and not cols and pair_cols is None \
                and exclude is None:
            return LSE(_lse_symmetric_op(self.name, x, scale, row_keys), None, None)
        row_lse, col_lse, pair = _lse_op(self.name, x, y, scale, row_keys, col_keys, rows, cols,
                                         None if diagonal else pair_cols, diagonal, exclude)
        return LSE(row_lse if rows else None, col_lse if cols else None, None if pair_cols is None else pair)

    def lse_prefixes(self, x, y, scale, dims, row_scale=None, col_scale=None, *, cols: bool = False):
        """``(row_lse [K, M], col_lse [K, N] or None)`` of ``S^k = scale * a^k b^k.T * x[:, :d_k] @ y[:, :d_k].T``
        for each of the increasing ``dims`` (op ``lse_prefixes``), all K from one pass over the features.
        ``row_scale [K, M]`` and ``col_scale [K, N]`` are the factors ``a``, ``b`` (None: 1; given: both,
        nonzero), in the math dtype, differentiable."""
        row_scale, col_scale = (None if f is None else f.contiguous() for f in (row_scale, col_scale))
        row_lse, col_lse = _lse_prefixes_op(self.name, x, y, scale, [int(d) for d in dims], row_scale, col_scale,
                                            True, cols)
        return row_lse, col_lse if cols else None

    def pointwise(self, x, y, scale, row_bias=None, *, keys=None, kind: str, reduce: bool):
        """``sum_j loss(scale <x_i, y_j> + row_bias_i)`` per row ``[M]``, or its total if ``reduce``."""
        row_keys, col_keys = (None, None) if keys is None else keys
        grad_on = torch.is_grad_enabled()
        needs = [grad_on and t is not None and t.requires_grad for t in (x, y, scale, row_bias)]
        return _pointwise_op(self.name, x, y, scale, row_bias, row_keys, col_keys, POINTWISE_KINDS[kind], reduce,
                             *needs)[0]

    def pointwise_prefixes(self, x, y, scale, row_bias, dims, row_scale=None, col_scale=None, *, keys=None,
                           kind: str, weights, reduce: bool):
        """``sum_k w_k sum_j loss(S^k_ij + row_bias_i)`` per row ``[M]``, or its total if ``reduce``, for
        ``S^k = scale * a^k b^k.T * x[:, :d_k] @ y[:, :d_k].T`` at each of the increasing ``dims`` with their
        ``weights`` (op ``pointwise_prefixes``), all K from one pass over the features. ``row_scale [K, M]``,
        ``col_scale [K, N]``: as ``lse_prefixes`` takes them, differentiable."""
        row_keys, col_keys = (None, None) if keys is None else keys
        row_scale, col_scale = (None if f is None else f.contiguous() for f in (row_scale, col_scale))
        grad_on = torch.is_grad_enabled()
        needs = [grad_on and t is not None and t.requires_grad for t in (x, y, scale, row_bias, row_scale, col_scale)]
        return _pointwise_prefixes_op(self.name, x, y, scale, row_bias, [int(d) for d in dims], row_scale, col_scale,
                                      row_keys, col_keys, POINTWISE_KINDS[kind], [float(w) for w in weights], reduce,
                                      *needs)[0]

    # --- one block of columns at a time, for callers that merge blocks themselves ----------------
    # The kernels as the ops above call them, without autograd (fastcl.distributed's turns: a rank's
    # rows meet every rank's columns block by block). Statistics and gradient terms are in the math
    # dtype; x and y are best passed through ``operands`` once.

    def operands(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor as this backend's kernels take it (``_prepared`` with ``native_dtypes``)."""
        return _prepared(self.native_dtypes, *tensors)

    def block_lse(self, x, y, scale, *, keys=None, rows: bool = True, cols: bool = False, exclude=None):
        """``(row_lse [M] or [0], col_lse [N] or [0])`` of ``scale * x @ y.T`` over the block's non-keyed pairs
        (and not listed in ``exclude``: the block's column indices)."""
        x, y = self.operands(x, y)
        row_keys, col_keys = (None, None) if keys is None else keys
        if exclude is not None:
            return self.kernels.lse_forward_excluding(x, y, scale, row_keys, col_keys, exclude.contiguous(), rows,
                                                      cols)
        return self.kernels.lse_forward(x, y, scale, row_keys, col_keys, rows, cols)

    def block_lse_grads(self, x, y, scale, row_lse, col_lse, g_row, g_col, *, keys=None, rows: bool = True,
                        cols: bool = False, exclude=None):
        """``(G @ y, G.T @ x)`` for this block's part of ``G = d(sum g_row * row_lse + sum g_col * col_lse) / dS``;
        ``row_lse``, ``col_lse`` are the lines' totals over every block (what ``block_lse`` merged)."""
        x, y = self.operands(x, y)
        row_keys, col_keys = (None, None) if keys is None else keys
        shifts = (_finite_shift(row_lse), _finite_shift(col_lse), g_row, g_col, rows, cols)
        if exclude is not None:
            return self.kernels.lse_backward_excluding(x, y, scale, row_keys, col_keys, exclude.contiguous(), *shifts)
        return self.kernels.lse_backward(x, y, scale, row_keys, col_keys, *shifts)

    def block_pointwise(self, x, y, scale, row_bias=None, *, keys=None, kind: str, g_row=None, grads: bool = False):
        """``(row sums [M], D @ y, D.T @ x, row sums of D)`` of ``loss(scale <x_i, y_j> + row_bias_i)`` over
        the block, ``D = g_row * d loss / dS`` (``g_row`` None: 1); the last three are empty unless ``grads``."""
        x, y = self.operands(x, y)
        row_keys, col_keys = (None, None) if keys is None else keys
        return self.kernels.pointwise(x, y, scale, row_bias, row_keys, col_keys, POINTWISE_KINDS[kind], g_row, grads)
