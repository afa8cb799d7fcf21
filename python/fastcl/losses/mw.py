"""The AUC / Mann-Whitney loss ("Optimizing What Matters"): a smooth count of mis-ranked negatives."""
from __future__ import annotations

import torch

from .. import _checks as check
from ._common import arange, engine_for, finish, maybe_normalize, total, upcast
from ._plan import LOCAL


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
    return _mw(LOCAL, query, key, temperature, labels=labels, reduction=reduction, normalize=normalize,
               backend=backend)


def _mw(world, query, key, temperature, *, labels, reduction, normalize, backend):
    """MW in ``world`` (``fastcl.losses._plan``); over a process group ``labels`` are global key indices."""
    def validate():
        check.features("query", query)
        check.features("key", key)
        check.same_kind(("query", "key"), (query, key))
        m, n = query.shape[0], key.shape[0]
        check.min_rows("key", n * world.size, 2, "every query needs a target and at least one negative")
        if labels is None:
            check.paired(("query", "key"), query, key)
            targets = None
        else:
            targets = check.labels("labels", labels, length=m, high=n * world.size, device=query.device)
        return (targets, check.reduction(reduction), check.temperature_scale("temperature", temperature, query),
                engine_for(world, backend, query, "pointwise"))

    targets, reduction, s, engine = world.checked(validate, query, query=query, key=key, labels=labels)
    x, y = maybe_normalize(query, normalize), maybe_normalize(key, normalize)
    m, n = x.shape[0], y.shape[0]
    plan = world.plan(engine)
    if engine is None:
        out = plan.reduce(_reference(x, y, s, arange(m, x) if targets is None else targets), reduction)
    else:
        paired = y if targets is None else plan.take(y, targets)  # y_{t(i)}
        targets = plan.ids(m, x) if targets is None else targets
        target = s * (upcast(x) * upcast(paired)).sum(-1)
        out = plan.pointwise(x, y, s, -target, (targets, plan.ids(n, y)), n, "mw", reduction != "none")
        out = total(out / (plan.count(n) - 1), reduction, m, plan.size)
    return finish(out, query.dtype, query, key, s)


def _reference(x, y, s, targets):
    S = s * upcast(x) @ upcast(y).T
    rows = torch.arange(S.shape[0], device=S.device)
    margin = S - S[rows, targets][:, None]
    is_target = torch.zeros_like(S, dtype=torch.bool)
    is_target[rows, targets] = True
    # softplus(m) = log(1 + e^m), written exactly (F.softplus linearises above a threshold)
    return torch.logaddexp(margin, torch.zeros_like(margin)).masked_fill(is_target, 0.0).sum(1) / (S.shape[1] - 1)
