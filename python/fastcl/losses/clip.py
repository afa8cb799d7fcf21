"""CLIP / InfoNCE: softmax cross-entropy over the similarity matrix, in one or both directions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks as check
from ._common import dispatch, engine_for, finish, maybe_normalize, reduce, scaled_scores, upcast
from ._denominator import FalseNegatives, check_negatives_left, guide_exclusions, positive_columns
from ._matryoshka import fused_clip, over_prefixes
from ._plan import LOCAL


def clip_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    bidirectional: bool = True,
    label_smoothing: float = 0.0,
    extra_negatives: torch.Tensor | None = None,
    reduction: str = "mean",
    normalize: bool = False,
    row_keys: torch.Tensor | None = None,
    col_keys: torch.Tensor | None = None,
    positives: torch.Tensor | None = None,
    multi_positive: str | None = None,
    matryoshka_dims: tuple[int, ...] | None = None,
    matryoshka_weights: tuple[float, ...] | None = None,
    guide: tuple[torch.Tensor, torch.Tensor] | None = None,
    guide_margin: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    r"""CLIP / ALIGN / BASIC image-text InfoNCE, never materialising ``S``.

    ``S = logit_scale * x @ y.T`` with ``x [M, D]``, ``y [N, D]``; ``logit_scale`` is already
    exponentiated (as open_clip passes it). Row ``i`` targets column ``t(i) = labels[i]``, or ``i``.

    ``r_i = lse_j S_ij - [(1 - eps) S_{i,t(i)} + (eps / N') sum_j S_ij]``   (``N'`` columns)
    ``c_j = lse_i S_ij - [(1 - eps) S_jj + (eps / M) sum_i S_ij]``          (bidirectional only)

    ``mean``: ``(mean r + mean c) / 2`` (or ``mean r``); ``none``: ``(r_i + c_i) / 2`` per row
    (or ``r_i``); ``sum``: the sum of those. With ``label_smoothing=0`` this equals open_clip's
    ``ClipLoss()(x, y, logit_scale)``; each row term equals ``F.cross_entropy(S, t, label_smoothing=eps)``.

    Args:
        x, y: ``[M, D]`` and ``[N, D]`` features of one dtype and device.
        logit_scale: positive number, or a one-element floating tensor (its gradient is returned if it
            requires one). A tensor is not range-checked: reading its value would cost a device sync
            every step. A negative or zero one is still well-defined math, just a scale: it flips (or
            flattens) every logit, so the loss then rewards dissimilar pairs. Pass ``log_scale.exp()``,
            as open_clip does, to keep a learned one positive.
        labels: ``[M]`` target columns in ``[0, N)``. Needs ``bidirectional=False``.
        bidirectional: add the column (text-to-image) direction; needs ``M == N``, no labels,
            no extra negatives.
        label_smoothing: ``eps`` in ``[0, 1]``.
        extra_negatives: ``[K, D]`` more columns for the row direction only (a MoCo queue, mined
            hard negatives); they get a gradient only if they require one.
        normalize: L2-normalise ``x``, ``y`` (and ``extra_negatives``) first.
        row_keys, col_keys: false negatives (e.g. document or class ids), integer tensors ``[M]`` and
            ``[N']`` (``y``'s rows, then ``extra_negatives``'), both or neither: column ``j`` leaves
            row ``i``'s log-sum-exp when ``row_keys[i] == col_keys[j]`` and ``j`` is not ``t(i)``
            (the target always stays); in the column direction row ``i`` leaves column ``j``'s
            when the keys are equal and ``i != j``. Every row (and column) must keep a negative;
            ``label_smoothing`` must be 0 (its average over the columns is not defined with them).
        positives, multi_positive: more positives per row (row direction only: ``bidirectional=False``):
            ``positives [M, P]`` integer column indices into ``y``, padded with ``-1``;
            ``P_i = {t(i)} U {positives[i] >= 0}`` (duplicates count once). ``multi_positive`` must
            be given with them: ``"joint"`` (SupCon's L_out over the row, every positive in the
            denominator): ``l_i = (1 / |P_i|) sum_{p in P_i} [lse_{j kept} S_ij - S_ip]``, a keyed
            positive staying kept; ``"decoupled"`` (DEXML: each positive against the negatives only):
            ``l_i = (1 / |P_i|) sum_{p in P_i} [log(e^{S_ip} + sum_{n kept, not in P_i} e^{S_in}) - S_ip]``,
            the positives left out inside the tiles (op ``lse_exclude``: ``cpu``, ``chunked``,
            ``triton`` and ``cuda``).
        matryoshka_dims, matryoshka_weights: nested embedding sizes ``d_1 < ... < d_K <= D`` and their
            weights (default 1): ``sum_k w_k loss(x[:, :d_k], y[:, :d_k])`` (``extra_negatives`` cut
            alike); with ``normalize=True`` each prefix is normalised by its own norm (truncate,
            then normalise). The ``cpu`` and ``chunked`` backends take all K from one pass over the
            features (op ``lse_prefixes``: a prefix dot product is a partial sum of the full one, so
            the GEMM work is one loss's); with keys, positives or a guide, over a process group and
            on the other backends it is that sum of K losses (exact either way).
        guide, guide_margin: GISTEmbed's false negatives, row direction only: ``guide=(gx [M, Dg],
            gy [N', Dg])`` (a guide model's embeddings of the rows and of the columns, ``y`` then
            ``extra_negatives``, used as given) drops column ``j`` from row ``i``'s log-sum-exp when
            ``gx_i . gy_j > gx_i . gy_{t(i)} - guide_margin`` and ``j`` is not a positive (strict:
            ties stay). The guide's similarities are taken a column chunk at a time, the dropped
            pairs listed and left out inside the tiles (op ``lse_exclude``, as decoupled positives).
        backend: ``"auto"``, ``"reference"``, ``"chunked"``, ... (see ``fastcl.backends()``).
    """
    return _clip(LOCAL, x, y, logit_scale, labels=labels, bidirectional=bidirectional, label_smoothing=label_smoothing,
                 extra_negatives=extra_negatives, reduction=reduction, normalize=normalize, row_keys=row_keys,
                 col_keys=col_keys, positives=positives, multi_positive=multi_positive,
                 matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights, guide=guide,
                 guide_margin=guide_margin, backend=backend)


def infonce_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    temperature: float | torch.Tensor = 0.07,
    *,
    labels: torch.Tensor | None = None,
    extra_negatives: torch.Tensor | None = None,
    reduction: str = "mean",
    normalize: bool = False,
    row_keys: torch.Tensor | None = None,
    col_keys: torch.Tensor | None = None,
    positives: torch.Tensor | None = None,
    multi_positive: str | None = None,
    matryoshka_dims: tuple[int, ...] | None = None,
    matryoshka_weights: tuple[float, ...] | None = None,
    guide: tuple[torch.Tensor, torch.Tensor] | None = None,
    guide_margin: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    r"""One-directional InfoNCE (MoCo, retrieval with hard negatives).

    ``l_i = lse_j S_ij - S_{i,t(i)}`` with ``S = query @ key.T / temperature``, ``t(i) = labels[i]``
    or ``i``; ``extra_negatives [K, D]`` are appended as more columns (a MoCo queue).
    Equals ``clip_loss(query, key, 1 / temperature, bidirectional=False, ...)``.

    ``temperature`` is a positive number (Python or NumPy) or a one-element floating tensor: a
    tensor (an ``nn.Parameter``, or ``log_t.exp()`` to keep it positive) is learned, its gradient
    flowing on every backend and in ``fastcl.distributed``. Tensor values are not range-checked
    (reading one would cost a device sync every step); a non-finite one gives a NaN loss.

    ``row_keys [M]`` and ``col_keys [N']`` (``key``'s rows, then ``extra_negatives``') drop false
    negatives: column ``j`` leaves row ``i``'s log-sum-exp when the keys are equal and ``j`` is not
    ``t(i)`` (e.g. other passages of the query's own document); every row must keep a negative.
    ``positives [M, P]`` (``-1`` padded indices into ``key``) with ``multi_positive="joint"``: more
    positives per row, as ``clip_loss`` takes them. ``matryoshka_dims``/``matryoshka_weights``: the
    weighted sum of the loss at each prefix of the features, as ``clip_loss`` takes them.
    ``guide=(gq, gk)``, ``guide_margin``: GISTEmbed's guided false negatives, as ``clip_loss`` takes them.
    """
    return _infonce(LOCAL, query, key, temperature, labels=labels, extra_negatives=extra_negatives,
                    reduction=reduction, normalize=normalize, row_keys=row_keys, col_keys=col_keys,
                    positives=positives, multi_positive=multi_positive, matryoshka_dims=matryoshka_dims,
                    matryoshka_weights=matryoshka_weights, guide=guide, guide_margin=guide_margin, backend=backend)


def queue_infonce_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    queue: torch.Tensor,
    temperature: float | torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    r"""MoCo's InfoNCE, as lightly's ``NTXentLoss`` computes it with a memory bank: row ``i`` meets
    its own key and the queue only (the batch's other keys are not its negatives):

    ``l_i = lse({S(q_i, k_i)} U {S(q_i, n_j)}_j) - S(q_i, k_i) = softplus(lse_j S(q_i, n_j) - S(q_i, k_i))``

    with ``S(u, v) = <u, v> / temperature``, ``queue [K, D]``; the mean over ``i``. The queue goes
    through the fused engine's log-sum-exp (as ``infonce_loss``'s ``extra_negatives`` do, whose
    rows also meet every key of the batch); it gets a gradient only if it requires one.
    """
    for name, t in (("query", query), ("key", key), ("queue", queue)):
        check.features(name, t)
    check.same_kind(("query", "key", "queue"), (query, key, queue))
    check.paired(("query", "key"), query, key)
    s = check.temperature_scale("temperature", temperature, query)
    engine = dispatch(backend, query, "lse")
    qa, ka = upcast(query), upcast(key)
    pos = s * (qa * ka).sum(-1)
    if engine is None:
        queue_lse = (s * qa @ upcast(queue).T).logsumexp(1)
    else:
        queue_lse = engine.lse(query, queue, s).row_lse
    return finish(torch.nn.functional.softplus(queue_lse - pos).mean(), query.dtype, query, key, queue, s)


def _infonce(world, query, key, temperature, *, labels, extra_negatives, reduction, normalize, backend,
             row_keys=None, col_keys=None, positives=None, multi_positive=None, matryoshka_dims=None,
             matryoshka_weights=None, guide=None, guide_margin=0.0):
    """InfoNCE in ``world``: CLIP's row direction, with a temperature."""
    return _clip(world, query, key, temperature, labels=labels, bidirectional=False, label_smoothing=0.0,
                 extra_negatives=extra_negatives, reduction=reduction, normalize=normalize, row_keys=row_keys,
                 col_keys=col_keys, positives=positives, multi_positive=multi_positive,
                 matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights, guide=guide,
                 guide_margin=guide_margin, backend=backend, names=("query", "key", "temperature"))


def _clip(world, x, y, scale, *, labels, bidirectional, label_smoothing, extra_negatives, reduction, normalize,
          backend, row_keys=None, col_keys=None, positives=None, multi_positive=None, matryoshka_dims=None,
          matryoshka_weights=None, guide=None, guide_margin=0.0, names=("x", "y", "logit_scale")):
    """The CLIP loss in ``world`` (``fastcl.losses._plan``), ``clip_loss``'s arguments by keyword (its
    signature holds the defaults); ``names``: what the caller calls ``x``, ``y`` and the scale, for
    its errors (a ``temperature`` is inverted). Over a process group (``fastcl.distributed``)
    ``labels`` are global column indices (into every rank's ``y`` in rank order), every rank's
    ``extra_negatives`` join the columns, and the column terms of this rank's ``y`` meet every rank's
    ``x`` (open_clip's ``local_loss=True``): each rank returns the mean of ``(r_i + c_i) / 2`` over
    its own pairs."""
    xn, yn, sn = names
    eps, negs = label_smoothing, extra_negatives
    matryoshka = matryoshka_dims is not None or matryoshka_weights is not None

    # Neither keys, positives nor a guide: their checks are skipped, as they would return None (at small
    # N every Python step of a call is a visible share of its time).
    plain = row_keys is None and col_keys is None and positives is None and multi_positive is None and guide is None

    def exclusions(m, n):
        """(keys, positives, guide), checked."""
        keys = check.key_pair(row_keys, col_keys, m, n + (0 if negs is None else negs.shape[0]), x.device)
        if keys is not None and eps:
            raise ValueError("label_smoothing must be 0 with row_keys/col_keys: its average over the columns "
                             "is not defined once false negatives leave them")
        pos = check.positives("positives", positives, multi_positive, rows=m, high=n * world.size,
                              device=x.device)
        if pos is not None and (bidirectional or eps):
            raise ValueError("positives need bidirectional=False (a column's positives are not defined by "
                             "the rows' lists) and label_smoothing=0")
        guided = check.guide(guide, guide_margin, rows=m, cols=n + (0 if negs is None else negs.shape[0]),
                             device=x.device)
        if guided is not None and (bidirectional or eps):
            raise ValueError("guide needs bidirectional=False (its rule is a row's: the guide similarity of its "
                             "target) and label_smoothing=0")
        return keys, pos, guided

    def validate():
        check.features(xn, x)
        check.features(yn, y)
        tensors = [x, y] if negs is None else [x, y, check.features("extra_negatives", negs)]
        check.same_kind([xn, yn, "extra_negatives"][:len(tensors)], tensors)
        prefixes = check.matryoshka(matryoshka_dims, matryoshka_weights, x.shape[-1]) if matryoshka else None
        m, n = x.shape[0], y.shape[0]
        if bidirectional:
            if labels is not None or negs is not None:
                raise ValueError("bidirectional=True supports neither labels nor extra_negatives (the column "
                                 "direction has no targets for them); pass bidirectional=False")
            check.paired((xn, yn), x, y)
        if labels is None:
            if m != n:
                raise ValueError(f"{xn} has {m} rows but {yn} has {n}: without labels row i targets column i, "
                                 f"so they must match (or pass labels=[{m}] target columns)")
            targets = None  # the diagonal
        else:
            targets = check.labels("labels", labels, length=m, high=n * world.size, device=x.device)
        s = check.inverse_temperature(sn, scale) if sn == "temperature" else scale
        keys = pos = guided = None
        if not plain:
            keys, pos, guided = exclusions(m, n)
        op = "lse_exclude" if guided is not None or (pos is not None and multi_positive == "decoupled") else "lse"
        pairs = m * (n + (0 if negs is None else negs.shape[0]))  # "auto" materialises a small S
        return (check.reduction(reduction), check.unit_interval("label_smoothing", eps), targets,
                check.scalar_param(sn, s, x, positive=True), engine_for(world, backend, x, op, pairs=pairs), keys,
                pos, guided, prefixes)

    if world is LOCAL:  # nothing to agree on (LocalWorld.checked), and no dict of the tensors to build
        checked = validate()
    else:
        gx, gy = guide if isinstance(guide, (tuple, list)) and len(guide) == 2 else (None, None)
        checked = world.checked(
            validate, x, **{xn: x, yn: y, "extra_negatives": negs, "labels": labels, "row_keys": row_keys,
                            "col_keys": col_keys, "positives": positives, "guide[0]": gx, "guide[1]": gy})
    reduction, eps, targets, s, engine, keys, pos, guided, prefixes = checked
    if prefixes is not None:
        if world is LOCAL and engine is not None and engine.provides("lse_prefixes") and keys is None \
                and pos is None and guided is None:  # all K from one pass over the features
            columns = y if negs is None else torch.cat([y, negs])
            out = fused_clip(engine, x, columns, s, targets, bidirectional=bidirectional, eps=eps,
                             normalize=normalize, prefixes=prefixes,
                             reduce=lambda per_row: LOCAL.plan(engine).reduce(per_row, reduction))
            return finish(out, x.dtype, x, y, negs, s)
        return over_prefixes(prefixes, lambda d: _clip(
            world, x[:, :d], y[:, :d], scale, labels=labels, bidirectional=bidirectional, label_smoothing=eps,
            extra_negatives=None if negs is None else negs[:, :d], reduction=reduction, normalize=normalize,
            backend=backend, row_keys=row_keys, col_keys=col_keys, positives=positives,
            multi_positive=multi_positive, guide=guide, guide_margin=guide_margin, names=names))
    x0, y0, negs0 = x, y, negs
    x, y = maybe_normalize(x, normalize), maybe_normalize(y, normalize)
    negs = None if negs is None else maybe_normalize(negs, normalize)
    if engine is None and keys is None and pos is None and guided is None:  # one target per row, none left out
        S = _scores(x, y, negs, s)
        return finish(_cross_entropy(S, targets, bidirectional, eps, reduction), x0.dtype, x0, y0, negs0, s,
                      scores=S)
    plan = world.plan(engine)
    columns = positive_columns(plan.ids(x.shape[0], x) if targets is None else targets, pos)  # global indices
    false_negatives = None
    if keys is not None:
        false_negatives = FalseNegatives(world, plan, *keys, y.shape[0], columns, bidirectional)
    elif pos is not None:
        n_all = plan.count(y.shape[0] + (0 if negs is None else negs.shape[0]))
        world.checked(lambda: check_negatives_left(n_all - columns.count), x)
    decoupled = pos is not None and multi_positive == "decoupled"
    guide_out = None
    if guided is not None:
        guide_out, left = guide_exclusions(plan, *guided, y.shape[0], columns, false_negatives)
        world.checked(lambda: check_negatives_left(left, "guide (with the keys and positives)"), x)
    if engine is None:
        S = _scores(x, y, negs, s)
        return finish(plan.reduce(_reference(S, columns, bidirectional, keys, decoupled, guided), reduction),
                      x0.dtype, x0, y0, negs0, s, scores=S)
    per_row = _fused(plan, x, y, negs, s, targets, columns, bidirectional, eps, false_negatives, decoupled, guide_out)
    return finish(plan.reduce(per_row, reduction), x0.dtype, x0, y0, negs0, s)


def _fused(plan, x, y, negs, s, targets, columns, bidirectional, eps, false_negatives=None, decoupled=False,
           guide_out=None):
    """Only the log-sum-exps need the tiled engine: every other term is linear in S, so it is a
    closed form in O((M + N) * D): ``sum_j S_ij = s <x_i, sum_j y_j>``. The target logits
    ``S_{i,t(i)}`` come from the plan too (a single-process engine folds their gradient into its own);
    more positives' logits from their rows of ``y`` (``plan.take``), O(M P D)."""
    fn = false_negatives
    exclude = None
    if decoupled:  # every positive leaves the row's log-sum-exp: as indices into every rank's columns
        exclude = columns.in_columns(y.shape[0], y.shape[0] + (0 if negs is None else negs.shape[0]))
    if guide_out is not None:  # GISTEmbed's false negatives, listed by the guide
        exclude = guide_out if exclude is None else torch.cat([exclude, guide_out], 1)
    stats = plan.lse(x, y, s, keys=None if fn is None else fn.keys, stride=None, cols=bidirectional,
                     pair_cols="diagonal" if targets is None else targets, extra=negs, exclude=exclude)
    logits = stats.pair_logit[:, None]  # [M, P']: the target, then the listed positives
    if columns.more is not None:
        xa, picked = upcast(x), upcast(plan.take(y, columns.more.clamp(min=0).reshape(-1)))
        more = s * (xa[:, None, :] * picked.view(*columns.more.shape, -1)).sum(-1)
        logits = torch.cat([logits, more], 1)
    row_lse, col_lse = stats.row_lse, stats.col_lse
    if decoupled:  # each positive against the negatives only: log(e^{S_ip} + e^{lse_neg}) - S_ip
        terms = torch.nn.functional.softplus(row_lse[:, None] - logits)
        return torch.where(columns.use, terms, 0.0).sum(1) / columns.count
    if fn is not None:
        row_lse = fn.restore(row_lse, logits, fn.row_keyed)
        col_lse = fn.restore(col_lse, stats.pair_logit[:, None], fn.col_keyed) if bidirectional else None
    if columns.more is not None:  # joint: every positive against the whole (kept) row
        return row_lse - torch.where(columns.use, logits, 0.0).sum(1) / columns.count
    r = row_lse - (1 - eps) * stats.pair_logit
    xa, ya = upcast(x), upcast(y)
    if eps:
        columns = ya if negs is None else torch.cat([ya, upcast(negs)])
        r = r - (eps / plan.count(columns.shape[0])) * s * (xa @ plan.all_sum(columns.sum(0)))
    if not bidirectional:
        return r
    c = col_lse - (1 - eps) * stats.pair_logit  # the diagonal: no labels here
    if eps:
        c = c - (eps / plan.count(x.shape[0])) * s * (ya @ plan.all_sum(xa.sum(0)))
    return (r + c) / 2


def _scores(x, y, negs, s):
    """The materialised ``S [M, N']`` of the reference path: ``y``'s columns, then ``extra_negatives``'."""
    return scaled_scores(upcast(x), upcast(y if negs is None else torch.cat([y, negs])), s)


def _cross_entropy(S, targets, bidirectional, eps, reduction):
    """The reference with one target per row and no column left out: torch's cross-entropy, which
    takes the reduction itself (``mean``: the mean of ``(r_i + c_i) / 2`` is ``(mean r + mean c) / 2``),
    as naive PyTorch writes CLIP: the fewest ops per call where S is small. The diagonal targets
    without smoothing read each direction's log-softmax on the diagonal instead: the same terms,
    and 5-13% less time forward+backward than the two cross-entropies at N = 128-512, D = 256, 1
    thread (timed interleaved in one process; the column one runs on ``S.T``, a strided view)."""
    if targets is None and not eps:
        r = F.log_softmax(S, 1).diagonal()
        if not bidirectional:
            return -reduce(r, reduction)
        c = F.log_softmax(S, 0).diagonal()
        return -(r + c) / 2 if reduction == "none" else -(reduce(r, reduction) + reduce(c, reduction)) / 2
    rows = torch.arange(S.shape[0], device=S.device) if targets is None or bidirectional else None
    r = F.cross_entropy(S, rows if targets is None else targets, label_smoothing=eps, reduction=reduction)
    return r if not bidirectional else (r + F.cross_entropy(S.T, rows, label_smoothing=eps, reduction=reduction)) / 2


def _reference(S, columns, bidirectional, keys=None, decoupled=False, guided=None):
    """The math on the materialised ``S [M, N']`` with more positives, keys or a guide (label
    smoothing is 0 with them); per row."""
    rows = torch.arange(S.shape[0], device=S.device)
    targets = columns.all[:, 0]
    kept_rows = kept_cols = S
    positive = torch.zeros(S.shape, dtype=torch.bool, device=S.device)
    positive[rows[:, None].expand_as(columns.all)[columns.use], columns.all[columns.use]] = True
    if guided is not None:  # GISTEmbed: more similar to the row than its target, by the guide
        gx, gy, margin = guided
        sims = gx @ gy.T
        kept_rows = S.masked_fill((sims > sims[rows, targets][:, None] - margin) & ~positive, float("-inf"))
    if keys is not None:  # false negatives leave the log-sum-exps; the positives stay
        keyed = keys[0][:, None] == keys[1][None, :]
        kept_rows = kept_rows.masked_fill(keyed & ~positive, float("-inf"))
        if bidirectional:
            kept_cols = S.masked_fill(keyed & ~torch.eye(*S.shape, dtype=torch.bool, device=S.device), float("-inf"))
    if decoupled:  # each positive against the kept columns that are not positives
        negatives = kept_rows.masked_fill(positive, float("-inf")).logsumexp(1)
        terms = torch.nn.functional.softplus(negatives[:, None] - S)
        return torch.where(positive, terms, 0.0).sum(1) / positive.sum(1)
    if columns.more is not None:  # joint
        return kept_rows.logsumexp(1) - torch.where(positive, S, 0.0).sum(1) / positive.sum(1)
    r = F.cross_entropy(kept_rows, targets, reduction="none")  # keys and a guide refuse label smoothing
    return r if not bidirectional else (r + F.cross_entropy(kept_cols.T, rows, reduction="none")) / 2
