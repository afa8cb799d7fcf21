"""Wang & Isola 2020: alignment and uniformity on the hypersphere."""
from __future__ import annotations

import math

import torch

from .. import _checks as check
from ._common import arange, dispatch, finish, maybe_normalize, reduce, upcast


def uniformity_loss(z: torch.Tensor, t: float = 2.0, *, normalize: bool = False,
                    backend: str = "auto") -> torch.Tensor:
    r"""``log( (1 / (N (N - 1))) sum_{i != j} exp(-t ||z_i - z_j||^2) )``, a 0-d tensor. Needs ``N >= 2``.

    Fused like the other losses: ``-t ||z_i - z_j||^2 = 2t <z_i, z_j> - t|z_i|^2 - t|z_j|^2``, so with
    ``x_i = [z_i, 1]`` and ``y_j = [z_j, -|z_j|^2 / 2]`` it is a row log-sum-exp of ``2t x @ y.T``
    (self excluded) shifted by ``-t |z_i|^2``: no ``N x N`` distance matrix.
    """
    check.features("z", z)
    check.min_rows("z", z.shape[0], 2, "uniformity averages over pairs i != j")
    t_val = check.positive_float("t", t)
    engine = dispatch(backend, z)
    z0, z = z, maybe_normalize(z, normalize)
    za = upcast(z)
    n = z.shape[0]
    sq = (za * za).sum(-1)
    if engine is None:
        dist2 = ((za[:, None, :] - za[None, :, :]) ** 2).sum(-1)
        off_diag = ~torch.eye(n, dtype=torch.bool, device=z.device)
        total = (-t_val * dist2)[off_diag].logsumexp(0)
    else:
        ones = za.new_ones(n, 1)
        x_aug, y_aug = torch.cat([za, ones], 1), torch.cat([za, -sq[:, None] / 2], 1)
        ids = arange(n, z)
        scale = za.new_tensor(2 * t_val)
        row_lse = engine.lse(x_aug, y_aug, scale, keys=(ids, ids)).row_lse
        total = (row_lse - t_val * sq).logsumexp(0)
    return finish(total - math.log(n * (n - 1)), z0.dtype, z0)


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
