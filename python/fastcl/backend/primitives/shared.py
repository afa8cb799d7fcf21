"""What every primitive op shares: the kernels a backend supplies (``Kernels``, ``POINTWISE_KINDS``),
its inputs as they take them, the gradients from their ``G @ y`` and ``G.T @ x`` (``scale_grad``,
``feature_grad``), the ``LSE`` result and the refusal of double backward."""
from typing import NamedTuple, Protocol

import torch

from ..._checks import math_dtype
from .. import registry

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

