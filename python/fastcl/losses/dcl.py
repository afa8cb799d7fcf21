"""Decoupled contrastive learning (Yeh et al. 2022): the positive leaves the denominator."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _checks as check
from ._common import engine_for, finish, maybe_normalize, upcast
from ._plan import LOCAL, LocalPlan

Weighting = None | str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dcl_loss(
    view0: torch.Tensor,
    view1: torch.Tensor,
    temperature: float | torch.Tensor = 0.1,
    *,
    weighting: Weighting = None,
    sigma: float = 0.5,
    reduction: str = "mean",
    normalize: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    r"""DCL / DCLW. With ``a = view0``, ``b = view1`` ``[B, D]`` and ``S(u, v) = <u, v> / temperature``:

    ``l0_i = -w_i S(a_i, b_i) + lse({S(a_i, a_j)}_{j != i} U {S(a_i, b_j)}_{j != i})``

    and ``l1`` the same with the views swapped; ``loss = (mean l0 + mean l1) / 2``, ``none`` gives
    ``(l0_i + l1_i) / 2``. ``weighting``: ``None`` (``w = 1``, lightly ``DCLLoss``), ``"vmf"``
    (``w = 2 - B softmax_i(<a_i, b_i> / sigma)``, computed without gradient, lightly ``DCLWLoss``), or a
    callable ``weighting(u, v) -> [B]`` called as ``(a, b)`` for ``l0`` and ``(b, a)`` for ``l1``
    (lightly's ``weight_fn``). lightly normalises: compare with ``normalize=True``. Needs ``B >= 2``
    (with one sample the denominator is empty).

    ``temperature`` is a positive number (Python or NumPy) or a one-element floating tensor: a
    tensor (an ``nn.Parameter``, or ``log_t.exp()`` to keep it positive) is learned, its gradient
    flowing on every backend and in ``fastcl.distributed``. Tensor values are not range-checked
    (reading one would cost a device sync every step); a non-finite one gives a NaN loss.
    """
    return _dcl(LOCAL, view0, view1, temperature, weighting=weighting, sigma=sigma, reduction=reduction,
                normalize=normalize, backend=backend)


def _dcl(world, view0, view1, temperature, *, weighting, sigma, reduction, normalize, backend):
    """DCL in ``world`` (``fastcl.losses._plan``). Over a process group ``weighting="vmf"`` takes its
    softmax over the global batch; a callable is called on this rank's rows, as lightly does, so
    row-wise weightings match the single-process loss."""
    reduction, s, sigma, engine = world.checked(
        lambda: (*validate(view0, view1, temperature, weighting, sigma, reduction, world.size),
                 engine_for(world, backend, view0, "lse")), view0, view0=view0, view1=view1)
    a, b = maybe_normalize(view0, normalize), maybe_normalize(view1, normalize)
    n = a.shape[0]
    plan = world.plan(engine)  # engine None (reference): the local plan's collectives, no primitives
    if weighting == "vmf":
        w0 = w1 = _vmf_weights(plan, a, b, sigma)
    else:
        w0, w1 = _weights(weighting, a, b, sigma)
    if engine is None:
        neg0, neg1 = _reference(a, b, s)
    else:  # rows [a; b] against columns [a; b]: keyed by sample, a row meets neither view of its own sample
        z, sample = torch.cat([a, b]), plan.ids(n, a).repeat(2)
        row_lse = plan.lse(z, z, s, (sample, sample), n).row_lse
        neg0, neg1 = row_lse[:n], row_lse[n:]
    pos = s * (upcast(a) * upcast(b)).sum(-1)
    per_sample = (neg0 - w0 * pos + neg1 - w1 * pos) / 2
    return finish(plan.reduce(per_sample, reduction), view0.dtype, view0, view1, s)


def validate(view0, view1, temperature, weighting, sigma, reduction, ranks: int = 1):
    """``(reduction, scale, sigma)``; ``ranks`` shards of ``view0``'s size make the batch."""
    check.features("view0", view0)
    check.features("view1", view1)
    check.same_kind(("view0", "view1"), (view0, view1))
    check.paired(("view0", "view1"), view0, view1)
    check.min_rows("view0", view0.shape[0] * ranks, 2, "the denominator excludes the sample's own pair")
    s = check.temperature_scale("temperature", temperature, view0)
    if weighting is not None and weighting != "vmf" and not callable(weighting):
        raise ValueError(f"weighting must be None, 'vmf' or a callable, got {weighting!r}")
    return check.reduction(reduction), s, check.positive_float("sigma", sigma)


def negative_mises_fisher_weights(out0: torch.Tensor, out1: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    r"""DCLW's weights ``w = 2 - B softmax_i(<out0_i, out1_i> / sigma)`` ``[B]``, without gradient:
    lightly's function of that name (``DCLLoss(weight_fn=negative_mises_fisher_weights)`` is
    ``DCLWLoss()``), in ``out0``'s dtype. ``dcl_loss(weighting="vmf")`` uses the same rule."""
    check.features("out0", out0)
    check.features("out1", out1)
    check.same_kind(("out0", "out1"), (out0, out1))
    check.paired(("out0", "out1"), out0, out1)
    return _vmf_weights(LocalPlan(None), out0, out1, check.positive_float("sigma", sigma)).to(out0.dtype)


def _vmf_weights(plan, a, b, sigma):
    """This rank's weights, the softmax over the global batch (lightly's distributed ``DCLWLoss``
    takes it over the local one, which does not equal the single-process loss)."""
    logits = plan.gather_nograd((upcast(a) * upcast(b)).sum(-1).detach() / sigma)
    return plan.own(2 - logits.shape[0] * torch.softmax(logits, 0), a.shape[0])


def _weights(weighting, a, b, sigma):
    if weighting is None:
        return 1.0, 1.0
    return upcast(weighting(a, b)), upcast(weighting(b, a))


def _reference(a, b, s):
    aa, bb = upcast(a), upcast(b)
    eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)

    def negatives(u, v):
        within, across = s * u @ u.T, s * u @ v.T
        return torch.cat([within.masked_fill(eye, float("-inf")), across.masked_fill(eye, float("-inf"))], 1)

    return negatives(aa, bb).logsumexp(1), negatives(bb, aa).logsumexp(1)
