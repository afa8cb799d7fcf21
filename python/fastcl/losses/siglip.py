"""SigLIP: an independent binary (sigmoid) loss on every pair; no global statistic needed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks as check
from ._common import dispatch, engine_for, finish, maybe_normalize, scaled_scores, total, upcast
from ._matryoshka import fused_siglip, over_prefixes
from ._plan import LOCAL


def siglip_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
    *,
    reduction: str = "mean",
    normalize: bool = False,
    matryoshka_dims: tuple[int, ...] | None = None,
    matryoshka_weights: tuple[float, ...] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""SigLIP sigmoid loss (Zhai et al. 2023).

    ``S_ij = s <x_i, y_j> + b``, ``z_ij = +1`` if ``i == j`` else ``-1``, ``M == N``:

    ``loss = -(1 / M) sum_ij log sigmoid(z_ij S_ij)``

    ``none`` gives the per-row sums ``[M]`` (not divided by ``M``); ``sum`` their total. Equals
    open_clip's ``SigLipLoss()(x, y, s, b)``. ``logit_scale`` (already exponentiated) and
    ``logit_bias`` are numbers or one-element floating tensors; tensors get gradients. A tensor
    ``logit_scale`` is not range-checked (reading its value would cost a device sync every step): a
    negative one is still well-defined math, just a scale that flips every logit's sign before the
    bias, so the loss then rewards dissimilar positives. Pass ``log_scale.exp()`` to keep it positive.
    Under ``mean``/``sum`` the gradients are computed in the forward pass (the loss is a sum of
    independent terms), so backward only rescales them. ``matryoshka_dims``/``matryoshka_weights``:
    ``sum_k w_k siglip(x[:, :d_k], y[:, :d_k])``, as ``clip_loss`` takes them. The ``cpu`` and
    ``chunked`` backends take all K from one pass over the features (op ``pointwise_prefixes``: the
    GEMM work is one loss's at ``d_K``); over a process group and on the other backends it is that
    sum of K losses (exact either way).
    """
    return _siglip(LOCAL, x, y, logit_scale, logit_bias, reduction=reduction, normalize=normalize,
                   matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights, backend=backend)


def _siglip(world, x, y, logit_scale, logit_bias, *, reduction, normalize, backend, matryoshka_dims=None,
            matryoshka_weights=None):
    """SigLIP in ``world`` (``fastcl.losses._plan``). Over a process group each rank's rows meet every
    rank's columns; only its own block holds positives (big_vision's and open_clip's distributed
    SigLIP); ``none``: this rank's rows' sums over all global columns."""
    if matryoshka_dims is not None or matryoshka_weights is not None:
        def prefixes():  # checked on every rank, agreed, before any prefix's collectives
            check.same_kind(("x", "y"), [check.features("x", x), check.features("y", y)])
            return check.matryoshka(matryoshka_dims, matryoshka_weights, x.shape[-1])

        checked = world.checked(prefixes, x, x=x, y=y)
        if world is LOCAL:
            reduction_, s, b, engine = _validated(world, x, y, logit_scale, logit_bias, reduction, backend)
            if engine is not None and engine.provides("pointwise_prefixes"):  # all K from one pass over D
                out = fused_siglip(engine, x, y, s, b, normalize=normalize, prefixes=checked,
                                   reduce=reduction_ != "none")
                return finish(total(out, reduction_, x.shape[0], 1), x.dtype, x, y, s, b)
        return over_prefixes(checked, lambda d: _siglip(
            world, x[:, :d], y[:, :d], logit_scale, logit_bias, reduction=reduction, normalize=normalize,
            backend=backend))
    reduction, s, b, engine = _validated(world, x, y, logit_scale, logit_bias, reduction, backend)
    return _sigmoid_loss(world, engine, x, y, s, b, reduction=reduction, normalize=normalize, positives=True)


def _validated(world, x, y, logit_scale, logit_bias, reduction, backend):
    """``(reduction, scale, bias, engine)``, checked in ``world``."""
    return world.checked(
        lambda: (*validate(x, y, logit_scale, logit_bias, reduction),
                 engine_for(world, backend, x, "pointwise", pairs=x.shape[0] * y.shape[0])), x,
        x=x, y=y)


def siglip_negatives_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    r"""SigLIP on a block without positives: ``-(1 / M) sum_ij log sigmoid(-S_ij)`` for ``x [M, D]``
    against ``y [N, D]`` (any ``N``). open_clip's ``SigLipLoss._loss(..., negative_only=True)``: the
    term of another rank's texts in its distributed loss."""
    _, s, b = validate(x, y, logit_scale, logit_bias, "mean", paired=False)
    engine = dispatch(backend, x, "pointwise", pairs=x.shape[0] * y.shape[0])
    return _sigmoid_loss(LOCAL, engine, x, y, s, b, reduction="mean", normalize=False,
                         positives=False)


def _sigmoid_loss(world, engine, x, y, s, b, *, reduction, normalize, positives: bool):
    x0, y0 = x, y
    x, y = maybe_normalize(x, normalize), maybe_normalize(y, normalize)
    m = x.shape[0]
    plan = world.plan(engine)
    if engine is None:
        zS = scaled_scores(upcast(x), upcast(y), -s) - b  # -S: as finite as S, one [M, N] pass fewer
        out = _reference(zS, positives, per_row=reduction == "none")
        return finish(total(out, reduction, m, plan.size), x0.dtype, x0, y0, s, b, scores=zS)
    ids = plan.ids(m, x)
    keys = (ids, ids) if positives else None  # keyed pairs are the positives
    out = plan.pointwise(x, y, s, b.expand(m), keys, m, "siglip", reduction != "none")
    return finish(total(out, reduction, m, plan.size), x0.dtype, x0, y0, s, b)


def validate(x, y, logit_scale, logit_bias, reduction, *, paired: bool = True):
    """``(reduction, scale, bias)`` as 0-d tensors."""
    check.features("x", x)
    check.features("y", y)
    check.same_kind(("x", "y"), (x, y))
    if paired:
        check.paired(("x", "y"), x, y)
    return (check.reduction(reduction), check.scalar_param("logit_scale", logit_scale, x, positive=True),
            check.scalar_param("logit_bias", logit_bias, x, positive=False))


def _reference(zS, positives: bool, per_row: bool):
    """The definition on the materialised ``-S`` (``zS``, changed in place): the per-row sums, or
    (``per_row=False``) their total."""
    if positives:  # z S: z = -1 for the negatives, as given, and +1 for the positives, the diagonal
        zS.diagonal().neg_()  # (no [N, N] label matrix)
    terms = F.logsigmoid(zS)
    return -(terms.sum(1) if per_row else terms.sum())
