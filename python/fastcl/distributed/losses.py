"""Every loss of fastcl over the global batch of a process group, written once against ``Plan``.

Rank ``r`` of ``W`` passes its local rows; the global batch is the concatenation of all ranks'
inputs in rank order (multi-view ``[V, B, D]``: along ``B``, so the views of a sample stay on one
rank). The composition is the single-process one (see ``fastcl.losses``) with local rows against
global columns: global ids in the keys, global counts in the normalisers, and every term that is
linear in ``S`` a closed form over sums that are all-reduced (with gradient).

Reductions, chosen so that the mean over ranks of the returned values equals the single-process
loss and, once DDP averages the gradients, the gradients equal the single-process ones:
- ``mean``: the mean over this rank's anchors of their global-batch terms (SupCon: ``W`` times the
  sum of this rank's terms over the global count of anchors with a positive);
- ``sum``: ``W`` times the sum of this rank's terms (so the mean over ranks is the global sum);
- ``none``: this rank's rows of the single-process output (NT-Xent: ``[V * B_local]`` view-major
  over the local samples); these concatenate to the global output, gradients are not rescaled.
Feature gradients on each rank are therefore ``W`` times the single-process ones under
``mean``/``sum`` (DDP divides by ``W``); gradients of replicated scalars (``logit_scale``,
``logit_bias``, a tensor ``temperature`` or uniformity's ``t``) average over ranks to the
single-process ones, which is what DDP does with a parameter's gradients (``none``: they sum).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _checks as check
from ..backend import engine as _engine_of
from ..backend import resolve
from ..losses import cwcl, dcl, geometry, siglip
from ..losses._common import finish, maybe_normalize, upcast
from ..losses.dcl import _weights as _dcl_weights
from ..losses.multiview import _positive_lse
from ..losses.ntxent import _group_ids
from .comm import Context
from .plan import make_plan


def _engine(backend: str, like: torch.Tensor):
    name = resolve(backend, like)
    if name == "reference":
        raise ValueError("backend='reference' materialises S and has no distributed path; use 'auto', 'cpu' "
                         "or 'chunked' (compare a distributed run with the single-process reference instead)")
    return _engine_of(name)


def _reduce(per_row: torch.Tensor, reduction: str, world: int) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum() * world
    return per_row


def _ids(ctx: Context, n: int, like: torch.Tensor) -> torch.Tensor:
    """Global ids of this rank's ``n`` rows."""
    return torch.arange(ctx.rank * n, (ctx.rank + 1) * n, device=like.device)


# --- CLIP / InfoNCE ---------------------------------------------------------------------------

def clip_loss(x, y, logit_scale, *, labels=None, bidirectional=True, label_smoothing=0.0, extra_negatives=None,
              reduction="mean", normalize=False, backend="auto", group=None, strategy="allgather"):
    """``fastcl.clip_loss`` over the global batch. ``labels`` are global column indices (into the
    concatenation of every rank's ``y``); ``extra_negatives`` of every rank join the columns.
    Row terms meet the global ``y``; column terms of this rank's ``y`` meet the global ``x``
    (open_clip's ``local_loss=True`` formulation), so each rank returns the mean of
    ``(r_i + c_i) / 2`` over its own pairs."""
    return _clip(x, y, logit_scale, ("x", "y", "logit_scale"), labels, bidirectional, label_smoothing,
                 extra_negatives, reduction, normalize, backend, group, strategy)


def infonce_loss(query, key, temperature=0.07, *, labels=None, extra_negatives=None, reduction="mean",
                 normalize=False, backend="auto", group=None, strategy="allgather"):
    """``fastcl.infonce_loss`` over the global batch (``clip_loss(..., bidirectional=False)``)."""
    ctx = Context(group, strategy)
    scale = None
    with ctx.local_checks():
        scale = check.inverse_temperature("temperature", temperature)
    return _clip(query, key, scale, ("query", "key", "temperature"), labels, False, 0.0, extra_negatives, reduction,
                 normalize, backend, group, strategy, ctx=ctx)


def _clip(x, y, scale, names, labels, bidirectional, eps, negs, reduction, normalize, backend, group, strategy,
          ctx=None):
    ctx = ctx or Context(group, strategy)
    xn, yn, sn = names
    with ctx.local_checks():
        check.features(xn, x)
        check.features(yn, y)
        tensors, tensor_names = [x, y], [xn, yn]
        if negs is not None:
            check.features("extra_negatives", negs)
            tensors.append(negs)
            tensor_names.append("extra_negatives")
        check.same_kind(tensor_names, tensors)
        reduction = check.reduction(reduction)
        eps = check.unit_interval("label_smoothing", eps)
        m, n = x.shape[0], y.shape[0]
        if bidirectional:
            if labels is not None or negs is not None:
                raise ValueError("bidirectional=True supports neither labels nor extra_negatives; pass "
                                 "bidirectional=False")
            check.paired((xn, yn), x, y)
        if labels is None:
            if m != n:
                raise ValueError(f"{xn} has {m} rows but {yn} has {n}: without labels row i targets column i")
            targets = None
        else:  # global column indices
            targets = check.labels("labels", labels, length=m, high=n * ctx.world, device=x.device)
        s = check.scalar_param(sn, scale, x, positive=True)
        engine = _engine(backend, x)
    ctx.agree(x, **{xn: x, yn: y, "extra_negatives": negs, "labels": labels})
    plan = make_plan(ctx, engine)
    x0 = x
    x, y = maybe_normalize(x, normalize), maybe_normalize(y, normalize)
    negs = None if negs is None else maybe_normalize(negs, normalize)
    cols = y if negs is None else torch.cat([y, negs])
    xa, ya = upcast(x), upcast(y)
    paired = y if targets is None else plan.take(y, targets)  # y_{t(i)}
    pair = s * (xa * upcast(paired)).sum(-1)
    r = plan.lse(x, cols, s) - (1 - eps) * pair
    if eps:
        r = r - (eps / (cols.shape[0] * ctx.world)) * s * (xa @ ctx.all_sum(upcast(cols).sum(0)))
    per_row = r
    if bidirectional:
        c = plan.lse(y, x, s) - (1 - eps) * pair
        if eps:
            c = c - (eps / (m * ctx.world)) * s * (ya @ ctx.all_sum(xa.sum(0)))
        per_row = (r + c) / 2
    return finish(_reduce(per_row, reduction, ctx.world), x0.dtype, *tensors, s)


# --- SigLIP -----------------------------------------------------------------------------------

def siglip_loss(x, y, logit_scale, logit_bias, *, reduction="mean", normalize=False, backend="auto", group=None,
                strategy="allgather"):
    """``fastcl.siglip_loss`` over the global batch: each rank's rows against every column. Only
    this rank's own block holds positives; every other block is negatives only (big_vision's and
    open_clip's distributed SigLIP). ``none``: this rank's rows' sums over all global columns."""
    ctx = Context(group, strategy)
    with ctx.local_checks():
        reduction, s, b = siglip.validate(x, y, logit_scale, logit_bias, reduction)
        engine = _engine(backend, x)
    ctx.agree(x, x=x, y=y)
    plan = make_plan(ctx, engine)
    x0, y0 = x, y
    x, y = maybe_normalize(x, normalize), maybe_normalize(y, normalize)
    m = x.shape[0]
    ids = _ids(ctx, m, x)
    out = plan.pointwise(x, y, s, b.expand(m), (ids, ids), m, "siglip", reduction != "none")
    if reduction == "mean":
        out = out / m
    elif reduction == "sum":
        out = out * ctx.world
    return finish(out, x0.dtype, x0, y0, s, b)


# --- NT-Xent / SupCon -------------------------------------------------------------------------

def ntxent_loss(views, temperature=0.5, *, reduction="mean", normalize=False, backend="auto", group=None,
                strategy="allgather"):
    """``fastcl.ntxent_loss`` over the global batch; ``views [V, B_local, D]``: a sample's views stay
    on its rank, so its positives are local and only the log-sum-exp meets the global batch.
    ``none`` gives ``[V * B_local]``, view-major over this rank's samples."""
    ctx, z = Context(group, strategy), None
    with ctx.local_checks():
        z = check.views("views", views)
        reduction = check.reduction(reduction)
        s = check.temperature_scale("temperature", temperature, z)
        engine = _engine(backend, z)
    ctx.agree(z, views=z)
    plan = make_plan(ctx, engine)
    z0, z = z, maybe_normalize(z, normalize)
    v, b, _ = z.shape
    flat = z.reshape(v * b, -1)
    ids = _ids(ctx, v * b, z)
    row_lse = plan.lse(flat, flat, s, (ids, ids), v * b)
    za = upcast(z)
    pos_sum = s * (za * (za.sum(0, keepdim=True) - za)).sum(-1).reshape(-1)
    return finish(_reduce(row_lse - pos_sum / (v - 1), reduction, ctx.world), z0.dtype, z0, s)


def supcon_loss(features, labels, temperature=0.1, *, reduction="mean", normalize=False, backend="auto",
                group=None, strategy="allgather"):
    """``fastcl.supcon_loss`` over the global batch (``[N_local, D]`` with ``labels [N_local]``, or
    ``[V, B_local, D]`` with ``labels [B_local]``). Positives anywhere in the global batch enter
    through per-class feature sums ``[classes, D]``, all-reduced with gradient (with the ring this is
    the one ``O(classes * D)`` buffer). ``mean`` divides by the global number of anchors that have a
    positive: rank ``r`` returns ``W * sum_r l / count``."""
    ctx = Context(group, strategy)
    with ctx.local_checks():
        three_d = isinstance(features, torch.Tensor) and features.dim() == 3
        if three_d:
            check.features("features", features, rank=3)
            v = features.shape[0]
            length = features.shape[1]
        else:
            check.features("features", features)
            v, length = 1, features.shape[0]
        labels = check.labels("labels", labels, length=length, high=None, device=features.device)
        reduction = check.reduction(reduction)
        s = check.temperature_scale("temperature", temperature, features)
        engine = _engine(backend, features)
    ctx.agree(features, features=features, labels=labels)
    plan = make_plan(ctx, engine)
    z0 = features
    z = maybe_normalize(features, normalize).reshape(-1, features.shape[-1])
    rows = z.shape[0]
    # group ids over the global samples, identical on every rank
    groups_all = _group_ids(ctx.gather_nograd(labels))
    n_groups = int(groups_all.max()) + 1
    per_group = torch.bincount(groups_all, minlength=n_groups) * v  # rows per group, globally
    groups = groups_all[ctx.rank * length:(ctx.rank + 1) * length].repeat(v)
    ids = _ids(ctx, rows, z)
    row_lse = plan.lse(z, z, s, (ids, ids), rows)
    za = upcast(z)
    class_sums = ctx.all_sum(za.new_zeros(n_groups, za.shape[1]).index_add(0, groups, za))
    n_pos = per_group[groups] - 1
    pos_sum = s * (za * (class_sums[groups] - za)).sum(-1)
    has_pos = n_pos > 0
    per_row = torch.where(has_pos, row_lse - pos_sum / n_pos.clamp(min=1), torch.zeros_like(row_lse))
    if reduction == "mean":
        anchors = (per_group * (per_group > 1)).sum().clamp(min=1)
        out = per_row.sum() * ctx.world / anchors
    else:
        out = _reduce(per_row, reduction, ctx.world)
    return finish(out, z0.dtype, z0, s)


# --- DCL --------------------------------------------------------------------------------------

def dcl_loss(view0, view1, temperature=0.1, *, weighting=None, sigma=0.5, reduction="mean", normalize=False,
             backend="auto", group=None, strategy="allgather"):
    """``fastcl.dcl_loss`` over the global batch. ``weighting="vmf"`` takes its softmax over the
    global batch (lightly's distributed ``DCLWLoss`` takes it over the local one, which does not
    equal the single-process loss); a callable is called on this rank's rows, as lightly does, so
    row-wise weightings match the single-process loss."""
    ctx = Context(group, strategy)
    with ctx.local_checks():
        reduction, s, sigma = dcl.validate(view0, view1, temperature, weighting, sigma, reduction, ctx.world)
        engine = _engine(backend, view0)
    ctx.agree(view0, view0=view0, view1=view1)
    plan = make_plan(ctx, engine)
    a, b = maybe_normalize(view0, normalize), maybe_normalize(view1, normalize)
    n = a.shape[0]
    if weighting == "vmf":
        with torch.no_grad():
            logits = ctx.gather_nograd((upcast(a) * upcast(b)).sum(-1) / sigma)
            w0 = w1 = (2 - logits.shape[0] * torch.softmax(logits, 0))[ctx.rank * n:(ctx.rank + 1) * n]
    else:
        w0, w1 = _dcl_weights(weighting, a, b, sigma)
    z = torch.cat([a, b])
    sample = _ids(ctx, n, a).repeat(2)
    row_lse = plan.lse(z, z, s, (sample, sample), n)
    pos = s * (upcast(a) * upcast(b)).sum(-1)
    per_sample = (row_lse[:n] - w0 * pos + row_lse[n:] - w1 * pos) / 2
    return finish(_reduce(per_sample, reduction, ctx.world), view0.dtype, view0, view1, s)


# --- multi-view -------------------------------------------------------------------------------

def mv_infonce_loss(views, temperature=0.1, *, reduction="mean", normalize=False, backend="auto", group=None,
                    strategy="allgather"):
    """``fastcl.mv_infonce_loss`` over the global batch (``views [V, B_local, D]``)."""
    return _multiview(views, temperature, reduction, normalize, backend, group, strategy, dhel=False)


def mv_dhel_loss(views, temperature=0.1, *, reduction="mean", normalize=False, backend="auto", group=None,
                 strategy="allgather"):
    """``fastcl.mv_dhel_loss`` over the global batch (``views [V, B_local, D]``; one pass per view)."""
    return _multiview(views, temperature, reduction, normalize, backend, group, strategy, dhel=True)


def _multiview(views, temperature, reduction, normalize, backend, group, strategy, dhel):
    ctx, z = Context(group, strategy), None
    with ctx.local_checks():
        z = check.views("views", views)
        if dhel:
            check.min_rows("views", z.shape[1] * ctx.world, 2, "MV-DHEL's negatives are the other samples of the "
                           "same view")
        reduction = check.reduction(reduction)
        s = check.temperature_scale("temperature", temperature, z)
        engine = _engine(backend, z)
    ctx.agree(z, views=z)
    plan = make_plan(ctx, engine)
    z0, z = z, maybe_normalize(z, normalize)
    v, b, _ = z.shape
    if dhel:
        ids = _ids(ctx, b, z)
        negatives = sum(plan.lse(z[i], z[i], s, (ids, ids), b) for i in range(v))
    else:
        flat = z.reshape(v * b, -1)
        ids = _ids(ctx, v * b, z)
        negatives = plan.lse(flat, flat, s, (ids, ids), v * b).view(v, b).logsumexp(0)
    per_sample = negatives - _positive_lse(z, s, dhel)
    return finish(_reduce(per_sample, reduction, ctx.world), z0.dtype, z0, s)


# --- CWCL -------------------------------------------------------------------------------------

def cwcl_loss(x, y, logit_scale, weight_features, *, bidirectional=True, reduction="mean", normalize=False,
              backend="auto", group=None, strategy="allgather"):
    """``fastcl.cwcl_loss`` over the global batch: ``W_ij`` spans every rank's ``weight_features``
    through the all-reduced sums ``sum_j U_j``, ``sum_j y_j`` and ``y^T U`` (``[D, Du]``)."""
    ctx = Context(group, strategy)
    with ctx.local_checks():
        reduction, s = cwcl.validate(x, y, logit_scale, weight_features, reduction)
        engine = _engine(backend, x)
    ctx.agree(x, x=x, y=y, weight_features=weight_features)
    plan = make_plan(ctx, engine)
    x0, y0 = x, y
    x, y = maybe_normalize(x, normalize), maybe_normalize(y, normalize)
    unit = F.normalize(upcast(weight_features.detach()), dim=-1).to(upcast(x).dtype)
    xa, ya = upcast(x), upcast(y)
    unit_sum = ctx.all_sum(unit.sum(0))
    weight_sum = (unit.shape[0] * ctx.world + unit @ unit_sum) / 2

    def weighted_target(rows, cols):  # sum_j W_ij S_ij / sum_j W_ij over the global columns
        col_sum, mixed = ctx.all_sum(cols.sum(0)), ctx.all_sum(cols.T @ unit)
        return s / 2 * (rows @ col_sum + ((rows @ mixed) * unit).sum(-1)) / weight_sum

    per_row = plan.lse(x, y, s) - weighted_target(xa, ya)
    if bidirectional:
        per_row = (per_row + plan.lse(y, x, s) - weighted_target(ya, xa)) / 2
    return finish(_reduce(per_row, reduction, ctx.world), x0.dtype, x0, y0, s, weight_features)


# --- MW ---------------------------------------------------------------------------------------

def mw_loss(query, key, temperature=0.05, *, labels=None, reduction="mean", normalize=False, backend="auto",
            group=None, strategy="allgather"):
    """``fastcl.mw_loss`` over the global batch; ``labels`` are global key indices."""
    ctx = Context(group, strategy)
    with ctx.local_checks():
        check.features("query", query)
        check.features("key", key)
        check.same_kind(("query", "key"), (query, key))
        m, n = query.shape[0], key.shape[0]
        check.min_rows("key", n * ctx.world, 2, "every query needs a target and at least one negative")
        if labels is None:
            check.paired(("query", "key"), query, key)
            targets = _ids(ctx, m, query)
        else:
            targets = check.labels("labels", labels, length=m, high=n * ctx.world, device=query.device)
        reduction = check.reduction(reduction)
        s = check.temperature_scale("temperature", temperature, query)
        engine = _engine(backend, query)
    ctx.agree(query, query=query, key=key, labels=labels)
    plan = make_plan(ctx, engine)
    x, y = maybe_normalize(query, normalize), maybe_normalize(key, normalize)
    paired = y if labels is None else plan.take(y, targets)
    target = s * (upcast(x) * upcast(paired)).sum(-1)
    out = plan.pointwise(x, y, s, -target, (targets, _ids(ctx, n, y)), n, "mw", reduction != "none")
    out = out / (n * ctx.world - 1)
    if reduction == "mean":
        out = out / m
    elif reduction == "sum":
        out = out * ctx.world
    return finish(out, query.dtype, query, key, s)


# --- uniformity / alignment -------------------------------------------------------------------

def uniformity_loss(z, t=2.0, *, reduction="mean", normalize=False, backend="auto", group=None,
                    strategy="allgather"):
    """``fastcl.uniformity_loss`` of the global batch. ``none``: this rank's rows ``u_i`` (against
    every rank's rows), which concatenate to the single-process output. ``mean`` is not a mean of
    per-anchor terms (the log of a global mean), so every rank returns the global value: its local
    rows' log-sum-exp, combined across ranks by an all-gather with gradient. The mean over ranks is
    the global value; each rank's feature gradients are ``W`` times the single-process ones, as
    elsewhere, and the mean over ranks of a tensor ``t``'s gradient is the single-process one."""
    ctx = Context(group, strategy)
    with ctx.local_checks():
        reduction, t = geometry.validate_uniformity(z, t, reduction, ctx.world)
        engine = _engine(backend, z)
    ctx.agree(z, z=z)
    plan = make_plan(ctx, engine)
    z0, z = z, maybe_normalize(z, normalize)
    n, n_all = z.shape[0], z.shape[0] * ctx.world

    def lse_of(x, y, scale, keys):
        return plan.lse(x, y, scale, keys, n)

    per_row = geometry.uniformity_row_lse(lse_of, z, t, _ids(ctx, n, z)) - math.log(n_all - 1)
    if reduction == "none":
        return finish(per_row, z0.dtype, z0, t)
    total = ctx.gather(per_row.logsumexp(0).reshape(1)).logsumexp(0)
    return finish(total - math.log(n_all), z0.dtype, z0, t)


def alignment_loss(x, y, alpha=2.0, *, reduction="mean", normalize=False, backend="auto", group=None,
                   strategy="allgather"):
    """``fastcl.alignment_loss``: per pair, so local; only the agreement and ``sum``'s factor ``W``
    are distributed."""
    ctx = Context(group, strategy)
    with ctx.local_checks():
        check.features("x", x)
        check.features("y", y)
        check.same_kind(("x", "y"), (x, y))
        check.paired(("x", "y"), x, y)
        alpha = check.positive_float("alpha", alpha)
        reduction = check.reduction(reduction)
        resolve(backend, x)
    ctx.agree(x, x=x, y=y)
    xa, ya = upcast(maybe_normalize(x, normalize)), upcast(maybe_normalize(y, normalize))
    per_row = (xa - ya).norm(dim=1).pow(alpha)
    return finish(_reduce(per_row, reduction, ctx.world), x.dtype, x, y)
