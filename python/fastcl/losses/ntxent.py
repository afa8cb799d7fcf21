"""Self-similarity losses over stacked views: NT-Xent (SimCLR) and SupCon.

Both take all rows ``Z [R, D]`` (views stacked view-major: row ``v * B + b``), compare every row with
every other (self excluded), and subtract the mean similarity to the row's positives:

    l_r = lse_{j != r} S_rj - (1 / |P(r)|) sum_{p in P(r)} S_rp,      S = Z @ Z.T / temperature

Positives are rows with the same label (NT-Xent: the same sample), so their similarity sum is a
closed form: ``sum_{p in P(r)} S_rp = s <z_r, C[label_r] - z_r>`` with ``C`` the per-label sums of
``Z``. Only the log-sum-exp needs the tiled engine.
"""
from __future__ import annotations

import torch

from .. import _checks as check
from ._common import arange, dispatch, finish, maybe_normalize, reduce, upcast


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
    z = check.views("views", views)
    v, b, _ = z.shape
    sample = torch.arange(b, device=z.device).repeat(v)
    return _self_contrast(z.reshape(v * b, -1), sample, temperature, reduction, normalize, backend,
                          "views", dense_positives=True)


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
    if isinstance(features, torch.Tensor) and features.dim() == 3:
        check.features("features", features, rank=3)
        v, b, _ = features.shape
        labels = check.labels("labels", labels, length=b, high=None, device=features.device).repeat(v)
        z = features.reshape(v * b, -1)
    else:
        z = check.features("features", features)
        labels = check.labels("labels", labels, length=z.shape[0], high=None, device=z.device)
    return _self_contrast(z, labels, temperature, reduction, normalize, backend, "features",
                          dense_positives=False)


def _self_contrast(z, labels, temperature, reduction, normalize, backend, name, dense_positives):
    reduction = check.reduction(reduction)
    s = check.temperature_scale("temperature", temperature, z)
    engine = dispatch(backend, z)
    z0, z = z, maybe_normalize(z, normalize)
    groups = _group_ids(labels)
    per_row, n_pos = contrast_terms(engine, z, groups, s)
    if dense_positives:  # NT-Xent: every row has V - 1 >= 1 positives
        out = reduce(per_row, reduction)
    elif reduction == "mean":
        out = per_row.sum() / (n_pos > 0).sum().clamp(min=1)
    else:
        out = reduce(per_row, reduction)
    return finish(out, z0.dtype, z0, s)


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
    rows = arange(x.shape[0], x)
    if y is None:
        y, gy, skip, keys = x, gx, rows, (rows, rows)  # one key tensor: the symmetric kernels
    else:
        keys = None if skip is None else (skip, arange(y.shape[0], y))
    xa, ya = upcast(x), upcast(y)
    if engine is None:
        return _reference_terms(xa, gx, ya, gy, s, skip)
    row_lse = engine.lse(x, y, s, keys=keys).row_lse
    groups = x.shape[0] + y.shape[0]  # an upper bound on the group ids
    class_sums = ya.new_zeros(groups, ya.shape[1]).index_add_(0, gy, ya)
    n_pos = gy.new_zeros(groups).index_add_(0, gy, torch.ones_like(gy))[gx]
    n_cols = torch.full_like(n_pos, y.shape[0])  # the columns in each row's log-sum-exp
    positives = class_sums[gx]  # sum_{p in P(i)} y_p, then less the skipped column
    if skip is not None:
        skipped = skip >= 0
        positives = positives - ya[skip.clamp(min=0)] * skipped[:, None]
        n_pos, n_cols = n_pos - skipped.long(), n_cols - skipped.long()
    pos_sum = s * (xa * positives).sum(-1)
    # A row whose log-sum-exp holds its one positive alone is exactly 0 (e.g. two views of one
    # sample); the kernel's lse and the closed-form positive round differently, so say it outright.
    scored = (n_pos > 0) & ~((n_pos == 1) & (n_cols == 1))
    per_row = torch.where(scored, row_lse - pos_sum / n_pos.clamp(min=1), torch.zeros_like(row_lse))
    return per_row, n_pos


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
