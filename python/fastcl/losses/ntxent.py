"""Self-similarity losses over stacked views: NT-Xent (SimCLR) and SupCon.

Both take all rows ``Z [R, D]`` (views stacked view-major: row ``v * B + b``), compare every row with
every other (self excluded), and subtract the mean similarity to the row's positives:

    l_r = lse_{j != r} S_rj - (1 / |P(r)|) sum_{p in P(r)} S_rp,      S = Z @ Z.T / temperature

Positives are rows with the same label (NT-Xent: the same sample), so their similarity sum is a
closed form: ``sum_{p in P(r)} S_rp = s <z_r, C[label_r] - z_r>`` with ``C`` the per-label sums of
``Z``. Only the log-sum-exp needs the tiled engine.
"""
from __future__ import annotations

from operator import itemgetter

import torch

from .. import _checks as check
from ._common import arange, engine_for, finish, maybe_normalize, upcast
from ._plan import LOCAL, LocalPlan


def ntxent_loss(
    views,
    temperature: float | torch.Tensor = 0.5,
    *,
    reduction: str = "mean",
    normalize: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    r"""SimCLR NT-Xent for ``V >= 2`` views.

    ``views``: ``[V, B, D]`` or a sequence of ``V`` tensors ``[B, D]``. Rows ``r = (v, b)``;
    ``A(r)`` all ``V * B`` rows but ``r``; ``P(r) = {(w, b) : w != v}``:

    ``l_r = lse_{j in A(r)} S_rj - (1 / (V - 1)) sum_{p in P(r)} S_rp``, ``S = Z Z^T / temperature``

    ``mean`` over the ``V * B`` rows; ``none`` gives ``[V * B]`` in view-major order. For ``V = 2``
    with ``normalize=True`` this is lightly's and pytorch-metric-learning's ``NTXentLoss``.

    ``temperature`` is a positive number (Python or NumPy) or a one-element floating tensor: a
    tensor (an ``nn.Parameter``, or ``log_t.exp()`` to keep it positive) is learned, its gradient
    flowing on every backend and in ``fastcl.distributed``. Tensor values are not range-checked
    (reading one would cost a device sync every step); a non-finite one gives a NaN loss.
    """
    return _ntxent(LOCAL, views, temperature, reduction=reduction, normalize=normalize, backend=backend)


def _ntxent(world, views, temperature, *, reduction, normalize, backend):
    """NT-Xent in ``world`` (``fastcl.losses._plan``). Over a process group ``views [V, B_local, D]``:
    a sample's views stay on its rank, so its positives are local and only the log-sum-exp meets
    the global batch; ``none`` gives ``[V * B_local]``, view-major over this rank's samples."""
    def validate():
        z = check.views("views", views)
        return (z, check.reduction(reduction), check.temperature_scale("temperature", temperature, z),
                engine_for(world, backend, z, "lse"))

    z, reduction, s, engine = world.checked(validate, _first, views=_first)
    z0, z = z, maybe_normalize(z, normalize)
    v, b, _ = z.shape
    flat = z.reshape(v * b, -1)
    plan = world.plan(engine)
    if engine is None:
        per_row, _ = contrast_terms(None, flat, arange(b, z).repeat(v), s)
    else:
        ids = plan.ids(v * b, z)
        row_lse = plan.lse(flat, flat, s, (ids, ids), v * b).row_lse
        za = upcast(z)
        pos_sum = s * (za * (za.sum(0, keepdim=True) - za)).sum(-1).reshape(-1)  # the sample's other views
        per_row = _row_terms(row_lse, pos_sum, torch.full_like(ids, v - 1), plan.count(v * b) - 1)
    return finish(plan.reduce(per_row, reduction), z0.dtype, z0, s)


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float | torch.Tensor = 0.1,
    *,
    reduction: str = "mean",
    normalize: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Supervised contrastive loss (Khosla et al. 2020, "L_out").

    ``features [N, D]`` with ``labels [N]``, or ``[V, B, D]`` with ``labels [B]`` (every view of a
    sample inherits its label). ``P(r) = {j != r : label_j == label_r}``:

    ``l_r = lse_{j != r} S_rj - (1 / |P(r)|) sum_{p in P(r)} S_rp``, ``S = F F^T / temperature``

    Rows without a positive contribute 0 and are left out of the mean (as pytorch-metric-learning's
    ``SupConLoss`` does; the mean is 0 if no row has a positive); ``none`` returns 0 for them.

    ``temperature`` is a positive number (Python or NumPy) or a one-element floating tensor: a
    tensor (an ``nn.Parameter``, or ``log_t.exp()`` to keep it positive) is learned, its gradient
    flowing on every backend and in ``fastcl.distributed``. Tensor values are not range-checked
    (reading one would cost a device sync every step); a non-finite one gives a NaN loss.
    """
    return _supcon(LOCAL, features, labels, temperature, reduction=reduction, normalize=normalize, backend=backend)


def _supcon(world, features, labels, temperature, *, reduction, normalize, backend):
    """SupCon in ``world`` (``fastcl.losses._plan``). Over a process group (``[N_local, D]`` with
    ``labels [N_local]``, or ``[V, B_local, D]`` with ``labels [B_local]``) positives anywhere in the
    global batch enter through per-class feature sums ``[classes, D]``, all-reduced with gradient
    (on the ring the one ``O(classes * D)`` buffer); ``mean`` divides by the global number of anchors
    that have a positive: rank ``r`` returns ``W * sum_r l / count``."""
    def validate():
        three_d = isinstance(features, torch.Tensor) and features.dim() == 3
        check.features("features", features, rank=3 if three_d else 2)
        views, length = (features.shape[0], features.shape[1]) if three_d else (1, features.shape[0])
        return (check.labels("labels", labels, length=length, high=None, device=features.device), views,
                check.reduction(reduction), check.temperature_scale("temperature", temperature, features),
                engine_for(world, backend, features, "lse"))

    labels, v, reduction, s, engine = world.checked(validate, features, features=features, labels=labels)
    z0, z = features, maybe_normalize(features, normalize).reshape(-1, features.shape[-1])
    plan = world.plan(engine)
    groups = _group_ids(plan.gather_nograd(labels))  # over the global samples, the same on every rank
    # one process: the default static bound on the group ids (torch.compile traces no data-dependent
    # size); a group: the number of classes, the size of the all-reduced class sums
    bound = None if plan.size == 1 else int(groups.max()) + 1
    per_row, n_pos = _terms(plan, z, plan.own(groups, labels.shape[0]).repeat(v), s, bound=bound)
    if reduction == "mean":  # over the anchors with a positive
        out = per_row.sum() * plan.size / plan.all_sum((n_pos > 0).sum()).clamp(min=1)
    else:
        out = plan.reduce(per_row, reduction)
    return finish(out, z0.dtype, z0, s)


_first = itemgetter(0)  # the views the checks stacked (from a sequence of tensors): what ranks agree on


def _row_terms(row_lse, pos_sum, n_pos, n_cols):
    """``l_r = lse_r - pos_sum_r / |P(r)|``; 0 for a row without a positive. A row whose log-sum-exp
    holds its one positive alone (a batch without a negative pair: two views of one sample) is
    exactly 0, as pytorch-metric-learning returns it; the kernel's lse and the closed-form positive
    round differently, so it is said outright."""
    scored = (n_pos > 0) & ~((n_pos == 1) & (n_cols == 1))
    return torch.where(scored, row_lse - pos_sum / n_pos.clamp(min=1), torch.zeros_like(row_lse))


def _group_ids(labels: torch.Tensor) -> torch.Tensor:
    """Labels renumbered 0, 1, ... in sorted order, with static shapes (torch.unique's output size
    depends on the data, which torch.compile cannot trace without a graph break)."""
    sorted_labels, order = labels.sort()
    starts = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    return torch.empty_like(labels).scatter_(0, order, starts.cumsum(0) - 1)


def contrast_terms(engine, x, gx, s, y=None, gy=None, skip=None):
    """SupCon's row terms ``l_i`` and positive counts ``|P(i)|`` of rows ``x`` (group ids ``gx``)
    against columns ``y`` (group ids ``gy``, numbered with ``gx``); ``engine=None``: the reference.

    ``y=None``: the rows against themselves, each leaving itself out (``supcon_loss``). Otherwise
    ``skip [M]`` names the one column row ``i`` leaves out of both its log-sum-exp and its
    positives (its own copy among the columns, always a positive), ``-1`` for none; ``skip=None``:
    none at all. Rows without a positive get ``l_i = 0``.
    """
    return _terms(LocalPlan(engine), x, gx, s, y, gy, skip)


def _terms(plan, x, gx, s, y=None, gy=None, skip=None, bound=None):
    """``contrast_terms`` against the plan's global columns; ``bound`` on the group ids (default:
    the rows and columns)."""
    if y is None:
        ids = plan.ids(x.shape[0], x)
        y, gy, skip, keys = x, gx, arange(x.shape[0], x), (ids, ids)  # one key tensor: the symmetric kernels
    else:
        keys = None if skip is None else (skip, arange(y.shape[0], y))
    xa, ya = upcast(x), upcast(y)
    if plan.engine is None:
        return _reference_terms(xa, gx, ya, gy, s, skip)
    row_lse = plan.lse(x, y, s, keys, x.shape[0]).row_lse
    groups = bound or x.shape[0] + y.shape[0]
    class_sums = plan.all_sum(ya.new_zeros(groups, ya.shape[1]).index_add_(0, gy, ya))
    n_pos = plan.all_sum(gy.new_zeros(groups).index_add_(0, gy, torch.ones_like(gy)))[gx]
    n_cols = torch.full_like(n_pos, plan.count(y.shape[0]))  # the columns in each row's log-sum-exp
    positives = class_sums[gx]  # sum_{p in P(i)} y_p, then less the skipped column
    if skip is not None:
        skipped = skip >= 0
        positives = positives - ya[skip.clamp(min=0)] * skipped[:, None]
        n_pos, n_cols = n_pos - skipped.long(), n_cols - skipped.long()
    return _row_terms(row_lse, s * (xa * positives).sum(-1), n_pos, n_cols), n_pos


def _reference_terms(xa, gx, ya, gy, s, skip):
    """``contrast_terms`` on the materialised ``S``."""
    S = s * xa @ ya.T
    kept = torch.ones_like(S, dtype=torch.bool)
    if skip is not None:
        rows = torch.arange(S.shape[0], device=S.device)[skip >= 0]
        kept[rows, skip[skip >= 0]] = False
    pos = (gx[:, None] == gy[None, :]) & kept
    lse = S.masked_fill(~kept, float("-inf")).logsumexp(1)
    n_pos = pos.sum(1)
    mean_pos = (S * pos).sum(1) / n_pos.clamp(min=1)
    return torch.where(n_pos > 0, lse - mean_pos, torch.zeros_like(lse)), n_pos
