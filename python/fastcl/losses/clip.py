"""CLIP / InfoNCE: softmax cross-entropy over the similarity matrix, in one or both directions."""
from __future__ import annotations

import torch

from .. import _checks as check
from ._common import dispatch, engine_for, finish, maybe_normalize, upcast
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
        backend: ``"auto"``, ``"reference"``, ``"chunked"``, ... (see ``fastcl.backends()``).
    """
    return _clip(LOCAL, x, y, logit_scale, labels=labels, bidirectional=bidirectional, label_smoothing=label_smoothing,
                 extra_negatives=extra_negatives, reduction=reduction, normalize=normalize, row_keys=row_keys,
                 col_keys=col_keys, backend=backend)


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
    """
    return _infonce(LOCAL, query, key, temperature, labels=labels, extra_negatives=extra_negatives,
                    reduction=reduction, normalize=normalize, row_keys=row_keys, col_keys=col_keys, backend=backend)


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
             row_keys=None, col_keys=None):
    """InfoNCE in ``world``: CLIP's row direction, with a temperature."""
    return _clip(world, query, key, temperature, labels=labels, bidirectional=False, label_smoothing=0.0,
                 extra_negatives=extra_negatives, reduction=reduction, normalize=normalize, row_keys=row_keys,
                 col_keys=col_keys, backend=backend, names=("query", "key", "temperature"))


def _clip(world, x, y, scale, *, labels, bidirectional, label_smoothing, extra_negatives, reduction, normalize,
          backend, row_keys=None, col_keys=None, names=("x", "y", "logit_scale")):
    """The CLIP loss in ``world`` (``fastcl.losses._plan``), ``clip_loss``'s arguments by keyword (its
    signature holds the defaults); ``names``: what the caller calls ``x``, ``y`` and the scale, for
    its errors (a ``temperature`` is inverted). Over a process group (``fastcl.distributed``)
    ``labels`` are global column indices (into every rank's ``y`` in rank order), every rank's
    ``extra_negatives`` join the columns, and the column terms of this rank's ``y`` meet every rank's
    ``x`` (open_clip's ``local_loss=True``): each rank returns the mean of ``(r_i + c_i) / 2`` over
    its own pairs."""
    xn, yn, sn = names
    eps, negs = label_smoothing, extra_negatives

    def validate():
        check.features(xn, x)
        check.features(yn, y)
        tensors = [x, y] if negs is None else [x, y, check.features("extra_negatives", negs)]
        check.same_kind([xn, yn, "extra_negatives"][:len(tensors)], tensors)
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
        keys = check.key_pair(row_keys, col_keys, m, n + (0 if negs is None else negs.shape[0]), x.device)
        if keys is not None and eps:
            raise ValueError("label_smoothing must be 0 with row_keys/col_keys: its average over the columns "
                             "is not defined once false negatives leave them")
        return (check.reduction(reduction), check.unit_interval("label_smoothing", eps), targets,
                check.scalar_param(sn, s, x, positive=True), engine_for(world, backend, x, "lse"), keys)

    reduction, eps, targets, s, engine, keys = world.checked(
        validate, x, **{xn: x, yn: y, "extra_negatives": negs, "labels": labels, "row_keys": row_keys,
                        "col_keys": col_keys})
    x0, y0, negs0 = x, y, negs
    x, y = maybe_normalize(x, normalize), maybe_normalize(y, normalize)
    negs = None if negs is None else maybe_normalize(negs, normalize)
    plan = world.plan(engine)
    false_negatives = None if keys is None else FalseNegatives(world, plan, *keys, y.shape[0], targets,
                                                                bidirectional)
    if engine is None:
        per_row = _reference(x, y if negs is None else torch.cat([y, negs]), s, targets, bidirectional, eps,
                             keys)
    else:
        per_row = _fused(plan, x, y, negs, s, targets, bidirectional, eps, false_negatives)
    return finish(plan.reduce(per_row, reduction), x0.dtype, x0, y0, negs0, s)


class FalseNegatives:
    """``row_keys``/``col_keys`` in a plan: the keyed pairs leave the engine's log-sum-exps (its keys,
    compared as they are, every rank's columns with their own), and the target of each row (column:
    the diagonal) comes back in when it is keyed: ``lse = logaddexp(lse over non-keyed, S_{i,t(i)})``.
    Checks (on every rank, agreed) that each row and column keeps a negative: counted from sorted
    keys in O((M + N') log N'), never from the pairs."""

    def __init__(self, world, plan, row_keys, col_keys, n_y: int, targets, bidirectional: bool):
        sizes = plan.gather_nograd(torch.tensor([col_keys.shape[0]], device=col_keys.device)).tolist()
        all_cols = plan.gather_nograd(col_keys)  # every rank's columns (y, then extra negatives), rank order
        all_y = plan.gather_nograd(col_keys[:n_y])
        all_rows = plan.gather_nograd(row_keys) if bidirectional else None
        self.keys = (row_keys, list(all_cols.split(sizes)) if plan.size > 1 else col_keys)
        target_keys = col_keys[:row_keys.shape[0]] if targets is None else all_y[targets]
        self.row_target = row_keys == target_keys
        self.col_target = (row_keys == col_keys[:row_keys.shape[0]]) if bidirectional else None
        world.checked(lambda: self._check(row_keys, col_keys[:n_y], all_cols, all_rows), row_keys)

    def _check(self, row_keys, y_keys, all_cols, all_rows) -> None:
        if torch.compiler.is_compiling():
            return
        left = all_cols.shape[0] - _equal_count(all_cols, row_keys) - (~self.row_target).long()
        if left.numel() and int(left.min()) < 1:
            i = int(left.argmin())
            raise ValueError(f"row_keys/col_keys leave row {i} no negative (every other column shares its key "
                             f"{int(row_keys[i])}): its loss would be 0 with no gradient")
        if all_rows is not None:
            left = all_rows.shape[0] - _equal_count(all_rows, y_keys) - (~self.col_target).long()
            if left.numel() and int(left.min()) < 1:
                j = int(left.argmin())
                raise ValueError(f"row_keys/col_keys leave column {j} no negative in the column direction "
                                 f"(every other row shares its key {int(y_keys[j])})")

    @staticmethod
    def restore(lse, pair_logit, keyed_target):
        """The log-sum-exp over the kept columns: the non-keyed ones and the (keyed) target."""
        return torch.where(keyed_target, torch.logaddexp(lse, pair_logit), lse)


def _equal_count(pool: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """For each of ``values``, how many entries of ``pool`` equal it."""
    ordered = pool.sort().values
    return torch.searchsorted(ordered, values, right=True) - torch.searchsorted(ordered, values)


def _fused(plan, x, y, negs, s, targets, bidirectional, eps, false_negatives=None):
    """Only the log-sum-exps need the tiled engine: every other term is linear in S, so it is a
    closed form in O((M + N) * D): ``sum_j S_ij = s <x_i, sum_j y_j>``. The target logits
    ``S_{i,t(i)}`` come from the plan too (a single-process engine folds their gradient into its own)."""
    fn = false_negatives
    stats = plan.lse(x, y, s, keys=None if fn is None else fn.keys, stride=None, cols=bidirectional,
                     pair_cols="diagonal" if targets is None else targets, extra=negs)
    row_lse, col_lse = stats.row_lse, stats.col_lse
    if fn is not None:
        row_lse = fn.restore(row_lse, stats.pair_logit, fn.row_target)
        col_lse = fn.restore(col_lse, stats.pair_logit, fn.col_target) if bidirectional else None
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


def _reference(x, cols, s, targets, bidirectional, eps, keys=None):
    """The math on the materialised ``S [M, N']``."""
    S = s * upcast(x) @ upcast(cols).T
    rows = torch.arange(S.shape[0], device=S.device)
    targets = rows if targets is None else targets
    kept_rows = kept_cols = S
    if keys is not None:  # false negatives leave the log-sum-exps; the positive stays
        keyed = keys[0][:, None] == keys[1][None, :]
        positive = torch.zeros_like(keyed)
        positive[rows, targets] = True
        kept_rows = S.masked_fill(keyed & ~positive, float("-inf"))
        if bidirectional:
            kept_cols = S.masked_fill(keyed & ~torch.eye(*S.shape, dtype=torch.bool, device=S.device), float("-inf"))
    r = kept_rows.logsumexp(1) - ((1 - eps) * S[rows, targets] + eps * S.mean(1))
    if not bidirectional:
        return r
    return (r + kept_cols.logsumexp(0) - ((1 - eps) * S.diagonal() + eps * S.mean(0))) / 2
