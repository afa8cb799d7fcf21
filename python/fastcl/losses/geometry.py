"""Wang & Isola 2020: alignment and uniformity on the hypersphere."""
from __future__ import annotations

import math

import torch

from .. import _checks as check
from ..backend import resolve
from ._common import engine_for, finish, maybe_normalize, reduce, upcast
from ._plan import LOCAL


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
    return _uniformity(LOCAL, z, t, reduction=reduction, normalize=normalize, backend=backend)


def _uniformity(world, z, t, *, reduction, normalize, backend):
    """Uniformity in ``world`` (``fastcl.losses._plan``). Over a process group ``none`` gives this
    rank's rows ``u_i`` (against every rank's rows), which concatenate to the single-process output.
    ``mean`` is the log of a global mean, not a mean of per-anchor terms, so every rank returns the
    global value: its rows' log-sum-exp, combined across ranks by an all-gather with gradient. Each
    rank's feature gradients are then ``W`` times the single-process ones, as for the other losses,
    and the mean over ranks of a tensor ``t``'s gradient is the single-process one."""
    reduction, t, engine = world.checked(
        lambda: (*_validate(world, z, t, reduction), engine_for(world, backend, z, "lse")), z, z=z)
    z0, z = z, maybe_normalize(z, normalize)
    n = z.shape[0]
    plan, n_all = world.plan(engine), world.size * n
    if engine is None:
        row_lse = _uniformity_reference(z, t)
    else:
        ids = plan.ids(n, z)
        za = upcast(z)
        sq = (za * za).sum(-1)
        x_aug, y_aug = torch.cat([za, za.new_ones(n, 1)], 1), torch.cat([za, -sq[:, None] / 2], 1)
        row_lse = plan.lse(x_aug, y_aug, 2 * t, (ids, ids), n).row_lse - t * sq
    per_row = row_lse - math.log(n_all - 1)  # u_i
    if reduction == "none":
        return finish(per_row, z0.dtype, z0, t)
    total = plan.gather(per_row.logsumexp(0).reshape(1)).logsumexp(0)
    return finish(total - math.log(n_all), z0.dtype, z0, t)


def _validate(world, z, t, reduction):
    """``(reduction, t as a 0-d tensor)``."""
    check.features("z", z)
    check.min_rows("z", z.shape[0] * world.size, 2, "uniformity averages over pairs i != j")
    reduction = check.reduction(reduction)
    if reduction == "sum":
        raise ValueError("uniformity_loss takes reduction='mean' or 'none', not 'sum': the loss is the log of a "
                         "mean over pairs, not a sum of per-row terms (reduction='none' gives the per-row terms)")
    return reduction, check.scalar_param("t", t, z, positive=True)


def _uniformity_reference(z, t):
    za = upcast(z)
    dist2 = ((za[:, None, :] - za[None, :, :]) ** 2).sum(-1)
    self_pair = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return (-t * dist2).masked_fill(self_pair, float("-inf")).logsumexp(1)


def alignment_loss(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0, *, reduction: str = "mean",
                   normalize: bool = False, backend: str = "auto") -> torch.Tensor:
    r"""``mean_i ||x_i - y_i||^alpha``; ``none`` gives ``[N]``. O(N D): every backend computes it the
    same way (``backend`` is still validated)."""
    return _alignment(LOCAL, x, y, alpha, reduction=reduction, normalize=normalize, backend=backend)


def _alignment(world, x, y, alpha, *, reduction, normalize, backend):
    """Alignment in ``world``: per pair, so local; a process group only agrees on the inputs, and
    ``sum`` is ``W`` times this rank's share."""
    def validate():
        check.features("x", x)
        check.features("y", y)
        check.same_kind(("x", "y"), (x, y))
        check.paired(("x", "y"), x, y)
        resolve(backend, x)  # validated, then unused
        return check.positive_float("alpha", alpha), check.reduction(reduction)

    alpha, reduction = world.checked(validate, x, x=x, y=y)
    xa, ya = upcast(maybe_normalize(x, normalize)), upcast(maybe_normalize(y, normalize))
    per_row = (xa - ya).norm(dim=1).pow(alpha)
    return finish(reduce(per_row, reduction, world.size), x.dtype, x, y)
