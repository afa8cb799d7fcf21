"""Continuously weighted contrastive loss (Srinivasa et al. 2023, CWCL)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks as check
from ._common import engine_for, finish, maybe_normalize, upcast
from ._plan import LOCAL


def cwcl_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    logit_scale: float | torch.Tensor,
    weight_features: torch.Tensor,
    *,
    bidirectional: bool = True,
    reduction: str = "mean",
    normalize: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    r"""CWCL: every pair is a soft positive with weight ``W_ij = (1 + cos(u_i, u_j)) / 2``.

    ``u = weight_features [N, Du]`` are embeddings from the frozen, pre-trained modality (no
    gradient flows into them). With ``S = logit_scale * x @ y.T`` (``M == N``):

    ``r_i = sum_j W_ij (lse_k S_ik - S_ij) / sum_j W_ij``, ``c_j`` the same on ``S.T``;
    ``mean``: ``(mean r + mean c) / 2`` (or ``mean r``), ``none``: ``(r_i + c_i) / 2`` (or ``r_i``).

    ``logit_scale`` is a positive number or a one-element floating tensor (it gets a gradient). A
    tensor is not range-checked (reading its value would cost a device sync every step): a negative
    one is still well-defined math, just a scale that flips every logit, so the loss then rewards
    dissimilar pairs. Pass ``log_scale.exp()`` to keep it positive.

    ``W`` is never materialised: with ``U`` the unit rows of ``u``, ``sum_j W_ij = (N + <U_i, sum_j U_j>) / 2``
    and ``sum_j W_ij S_ij = (s / 2) (<x_i, sum_j y_j> + x_i^T (y^T U) U_i)``, both O(N D Du).
    """
    return _cwcl(LOCAL, x, y, logit_scale, weight_features, bidirectional=bidirectional, reduction=reduction,
                 normalize=normalize, backend=backend)


def _cwcl(world, x, y, logit_scale, weight_features, *, bidirectional, reduction, normalize, backend):
    """CWCL in ``world`` (``fastcl.losses._plan``). Over a process group ``W_ij`` spans every rank's
    ``weight_features`` through the all-reduced sums ``sum_j U_j``, ``sum_j y_j`` and ``y^T U``."""
    reduction, s, engine = world.checked(
        lambda: (*_validate(x, y, logit_scale, weight_features, reduction), engine_for(world, backend, x, "lse")), x,
        x=x, y=y, weight_features=weight_features)
    x0, y0 = x, y
    x, y = maybe_normalize(x, normalize), maybe_normalize(y, normalize)
    unit = F.normalize(upcast(weight_features.detach()), dim=-1).to(upcast(x).dtype)
    plan = world.plan(engine)
    if engine is None:
        return finish(plan.reduce(_reference(x, y, s, unit, bidirectional), reduction), x0.dtype, x0, y0, s,
                      weight_features)
    stats = plan.lse(x, y, s, cols=bidirectional)
    xa, ya = upcast(x), upcast(y)
    weight_sum = (plan.count(unit.shape[0]) + unit @ plan.all_sum(unit.sum(0))) / 2

    def weighted_target(rows, cols):
        """``sum_j W_ij S_ij / sum_j W_ij`` for ``S = s rows @ cols.T`` over the global columns, in O(N D Du)."""
        col_sum, mixed = plan.all_sum(cols.sum(0)), plan.all_sum(cols.T @ unit)  # mixed: [D, Du]
        return s / 2 * (rows @ col_sum + ((rows @ mixed) * unit).sum(-1)) / weight_sum

    per_row = stats.row_lse - weighted_target(xa, ya)
    if bidirectional:
        per_row = (per_row + stats.col_lse - weighted_target(ya, xa)) / 2
    return finish(plan.reduce(per_row, reduction), x0.dtype, x0, y0, s, weight_features)


def _validate(x, y, logit_scale, weight_features, reduction):
    """``(reduction, scale)``."""
    check.features("x", x)
    check.features("y", y)
    check.features("weight_features", weight_features)
    check.same_kind(("x", "y"), (x, y))
    check.paired(("x", "y"), x, y)
    check.paired(("x", "weight_features"), x, weight_features)
    if weight_features.device != x.device:
        raise ValueError(f"weight_features is on {weight_features.device} but x is on {x.device}")
    return check.reduction(reduction), check.scalar_param("logit_scale", logit_scale, x, positive=True)


def _reference(x, y, s, unit, bidirectional):
    S = s * upcast(x) @ upcast(y).T
    W = (1 + unit @ unit.T) / 2
    r = (W * (S.logsumexp(1)[:, None] - S)).sum(1) / W.sum(1)
    if not bidirectional:
        return r
    return (r + (W * (S.logsumexp(0)[None, :] - S)).sum(0) / W.sum(0)) / 2
