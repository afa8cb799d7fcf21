"""Wang & Isola 2020: alignment and uniformity on the hypersphere."""
from __future__ import annotations

import math

import torch

from .. import _checks as check
from ._common import arange, dispatch, finish, maybe_normalize, reduce, upcast


def uniformity_loss(z: torch.Tensor, t: float | torch.Tensor = 2.0, *, reduction: str = "mean",
                    normalize: bool = False, backend: str = "auto") -> torch.Tensor:
    r"""Wang & Isola's uniformity. Needs ``N >= 2`` rows. With ``G_ij = exp(-t ||z_i - z_j||^2)``:

    ``mean`` (default): ``log( (1 / (N (N - 1))) sum_{i != j} G_ij )``, a 0-d tensor (SPEC.md).
    ``none``: the per-row terms ``u_i = log( (1 / (N - 1)) sum_{j != i} G_ij )``, ``[N]``. The loss is
    the log of a mean, not a mean of per-row terms: ``mean`` equals ``logsumexp(u) - log N``, which
    is not ``u.mean()`` (that is smaller, by Jensen).
    ``sum`` raises ``ValueError``: no sum of per-row terms is this loss.

    ``t`` is a Python or NumPy number (checked positive and finite) or a one-element floating tensor
    (learnable: it gets a gradient; not range-checked, which would cost a device sync per step).

    Fused like the other losses: ``-t ||z_i - z_j||^2 = 2t <z_i, z_j> - t|z_i|^2 - t|z_j|^2``, so with
    ``x_i = [z_i, 1]`` and ``y_j = [z_j, -|z_j|^2 / 2]`` it is a row log-sum-exp of ``2t x @ y.T``
    (self excluded) shifted by ``-t |z_i|^2``: no ``N x N`` distance matrix.
    """
    reduction, t = validate_uniformity(z, t, reduction)
    engine = dispatch(backend, z)
    z0, z = z, maybe_normalize(z, normalize)
    n = z.shape[0]
    if engine is None:
        row_lse = _uniformity_reference(z, t)
    else:
        row_lse = _uniformity_fused(engine, z, t)
    per_row = row_lse - math.log(n - 1)  # u_i
    out = per_row if reduction == "none" else per_row.logsumexp(0) - math.log(n)
    return finish(out, z0.dtype, z0, t)


def validate_uniformity(z, t, reduction, ranks: int = 1):
    """Checks shared with ``fastcl.distributed`` (``ranks`` shards of ``z``'s size make the batch):
    ``(reduction, t as a 0-d tensor)``."""
    check.features("z", z)
    check.min_rows("z", z.shape[0] * ranks, 2, "uniformity averages over pairs i != j")
    reduction = check.reduction(reduction)
    if reduction == "sum":
        raise ValueError("uniformity_loss takes reduction='mean' or 'none', not 'sum': the loss is the log of a "
                         "mean over pairs, not a sum of per-row terms (reduction='none' gives the per-row terms)")
    return reduction, check.scalar_param("t", t, z, positive=True)


def uniformity_row_lse(lse_of, z: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log sum_{j != i} exp(-t ||z_i - z_j||^2)`` per row from a row log-sum-exp primitive
    ``lse_of(x, y, scale, keys)`` (the engine's, or a distributed plan's over global columns)."""
    za = upcast(z)
    sq = (za * za).sum(-1)
    x_aug, y_aug = torch.cat([za, za.new_ones(za.shape[0], 1)], 1), torch.cat([za, -sq[:, None] / 2], 1)
    return lse_of(x_aug, y_aug, 2 * t, (ids, ids)) - t * sq


def _uniformity_fused(engine, z, t):
    def lse_of(x, y, scale, keys):
        return engine.lse(x, y, scale, keys=keys).row_lse

    return uniformity_row_lse(lse_of, z, t, arange(z.shape[0], z))


def _uniformity_reference(z, t):
    za = upcast(z)
    dist2 = ((za[:, None, :] - za[None, :, :]) ** 2).sum(-1)
    self_pair = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return (-t * dist2).masked_fill(self_pair, float("-inf")).logsumexp(1)


def alignment_loss(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0, *, reduction: str = "mean",
                   normalize: bool = False, backend: str = "auto") -> torch.Tensor:
    r"""``mean_i ||x_i - y_i||^alpha``; ``none`` gives ``[N]``. O(N D): every backend computes it the
    same way (``backend`` is still validated)."""
    check.features("x", x)
    check.features("y", y)
    check.same_kind(("x", "y"), (x, y))
    check.paired(("x", "y"), x, y)
    alpha = check.positive_float("alpha", alpha)
    reduction = check.reduction(reduction)
    dispatch(backend, x)
    xa, ya = upcast(maybe_normalize(x, normalize)), upcast(maybe_normalize(y, normalize))
    per_row = (xa - ya).norm(dim=1).pow(alpha)
    return finish(reduce(per_row, reduction), x.dtype, x, y)
