"""The AUC / Mann-Whitney loss ("Optimizing What Matters"): a smooth count of mis-ranked negatives."""
from __future__ import annotations

import torch

from .. import _checks as check
from ._common import arange, dispatch, finish, maybe_normalize, reduce, upcast


def mw_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    temperature: float | torch.Tensor = 0.05,
    *,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    normalize: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    r"""MW (AUC) loss. ``S = query @ key.T / temperature``, target ``t(i) = labels[i]`` or ``i``:

    ``l_i = (1 / (N - 1)) sum_{j != t(i)} softplus(S_ij - S_{i,t(i)})``

    ``mean`` over rows; ``none`` gives ``[M]``. Needs ``N >= 2`` keys (one target, one negative).
    Under ``mean``/``sum`` the gradients are computed in the forward pass.

    ``temperature`` is a positive number (Python or NumPy) or a one-element floating tensor: a
    tensor (an ``nn.Parameter``, or ``log_t.exp()`` to keep it positive) is learned, its gradient
    flowing on every backend and in ``fastcl.distributed``. Tensor values are not range-checked
    (reading one would cost a device sync every step); a non-finite one gives a NaN loss.
    """
    check.features("query", query)
    check.features("key", key)
    check.same_kind(("query", "key"), (query, key))
    m, n = query.shape[0], key.shape[0]
    check.min_rows("key", n, 2, "every query needs a target and at least one negative")
    if labels is None:
        check.paired(("query", "key"), query, key)
        targets = torch.arange(m, device=query.device)
    else:
        targets = check.labels("labels", labels, length=m, high=n, device=query.device)
    reduction = check.reduction(reduction)
    s = check.temperature_scale("temperature", temperature, query)
    engine = dispatch(backend, query)
    x, y = maybe_normalize(query, normalize), maybe_normalize(key, normalize)
    if engine is None:
        out = reduce(_reference(x, y, s, targets), reduction)
    else:
        target = s * (upcast(x) * upcast(y)[targets]).sum(-1)
        out = engine.pointwise(x, y, s, -target, keys=(targets, arange(n, x)), kind="mw",
                               reduce=reduction != "none") / (n - 1)
        if reduction == "mean":
            out = out / m
    return finish(out, query.dtype, query, key, s)


def _reference(x, y, s, targets):
    S = s * upcast(x) @ upcast(y).T
    rows = torch.arange(S.shape[0], device=S.device)
    margin = S - S[rows, targets][:, None]
    is_target = torch.zeros_like(S, dtype=torch.bool)
    is_target[rows, targets] = True
    # softplus(m) = log(1 + e^m), written exactly (F.softplus linearises above a threshold)
    return torch.logaddexp(margin, torch.zeros_like(margin)).masked_fill(is_target, 0.0).sum(1) / (S.shape[1] - 1)
