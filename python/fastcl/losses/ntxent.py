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
    if engine is None:
        per_row, has_pos = _reference(z, groups, s)
    else:
        per_row, has_pos = _fused(engine, z, groups, s)
    if dense_positives:  # NT-Xent: every row has V - 1 >= 1 positives
        out = reduce(per_row, reduction)
    elif reduction == "mean":
        out = per_row.sum() / has_pos.sum().clamp(min=1)
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


def _fused(engine, z, groups, s):
    ids = arange(z.shape[0], z)
    row_lse = engine.lse(z, z, s, keys=(ids, ids)).row_lse
    za = upcast(z)
    n = za.shape[0]  # at most n groups
    class_sums = za.new_zeros(n, za.shape[1]).index_add_(0, groups, za)
    n_pos = groups.new_zeros(n).index_add_(0, groups, torch.ones_like(groups))[groups] - 1
    pos_sum = s * (za * (class_sums[groups] - za)).sum(-1)
    has_pos = n_pos > 0
    per_row = torch.where(has_pos, row_lse - pos_sum / n_pos.clamp(min=1), torch.zeros_like(row_lse))
    return per_row, has_pos


def _reference(z, groups, s):
    za = upcast(z)
    S = s * za @ za.T
    self_mask = torch.eye(S.shape[0], dtype=torch.bool, device=S.device)
    pos = (groups[:, None] == groups[None, :]) & ~self_mask
    lse = S.masked_fill(self_mask, float("-inf")).logsumexp(1)
    n_pos = pos.sum(1)
    mean_pos = (S * pos).sum(1) / n_pos.clamp(min=1)
    has_pos = n_pos > 0
    return torch.where(has_pos, lse - mean_pos, torch.zeros_like(lse)), has_pos
