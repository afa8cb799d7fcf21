"""What stays in a row's denominator: its positives (the target, and ``positives=`` lists) and the
false negatives that leave it (``row_keys``/``col_keys``), for ``clip_loss`` and ``infonce_loss``.

The engines exclude every keyed pair from their log-sum-exps (their ``keys``); a keyed positive is
then added back, ``lse = logaddexp(lse over non-keyed, lse over keyed positives)``: exact, and
O(M P) beside the engine's pass. Keys are compared as they are across ranks (each rank's column keys
gathered, ``stride=None``). Whether a row keeps a negative is counted from sorted keys in
O((M + N') log N'), never from the pairs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Columns(NamedTuple):
    """A row's positive columns, global indices into every rank's ``y``: ``all [M, P']``, the target
    first, then the listed ones (``more``, ``-1`` padded, or None); ``use``: the entries that count
    (present, and not a repeat of one before them); ``count``: ``|P_i|``."""
    all: torch.Tensor
    more: torch.Tensor | None
    use: torch.Tensor
    count: torch.Tensor

    def in_columns(self, n_y: int, n_cols: int) -> torch.Tensor:
        """``all`` as indices into every rank's columns side by side (each rank's ``n_y`` rows of ``y``
        then its extra negatives, ``n_cols`` in all), -1 where unused: what ``lse_exclude`` takes."""
        at = self.all.clamp(min=0)
        return torch.where(self.use, at // n_y * n_cols + at % n_y, -1)


def positive_columns(targets: torch.Tensor, positives: torch.Tensor | None) -> Columns:
    """``P_i = {t(i)} U {positives[i] >= 0}``, ``targets`` global column indices."""
    if positives is None:  # the target alone (no sort: this runs on every call)
        use = torch.ones_like(targets, dtype=torch.bool)[:, None]
        return Columns(targets[:, None], None, use, use.sum(1))
    cols = torch.cat([targets[:, None], positives], 1)
    ordered, order = cols.sort(dim=1, stable=True)  # equal entries next to each other, the first one first
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    use = torch.empty_like(repeat).scatter_(1, order, (ordered >= 0) & ~repeat)
    return Columns(cols, positives, use, use.sum(1))


def check_negatives_left(left: torch.Tensor, what: str = "positives", why=None) -> None:
    """Every row keeps a negative (``left [M]``: how many), else ValueError: ``what`` left row ``i``
    none, ``why(i)`` says more (default: its loss would be 0 with no gradient)."""
    if torch.compiler.is_compiling() or not left.numel():
        return
    if int(left.min()) < 1:
        i = int(left.argmin())
        raise ValueError(f"{what} leave " + (f"row {i} no negative: its loss would be 0 with no gradient"
                                             if why is None else why(i)))


class FalseNegatives:
    """``row_keys``/``col_keys`` in a plan: ``keys`` for the engine, which positives are keyed
    (``row_keyed [M, P']``; column direction: the diagonal, ``col_keyed [N, 1]``), and the check
    (on every rank, agreed) that each row and column keeps a negative."""

    def __init__(self, world, plan, row_keys, col_keys, n_y: int, columns: Columns, bidirectional: bool):
        sizes = plan.gather_nograd(torch.tensor([col_keys.shape[0]], device=col_keys.device)).tolist()
        all_cols = plan.gather_nograd(col_keys)  # every rank's columns (y, then extra negatives), rank order
        all_y = plan.gather_nograd(col_keys[:n_y])
        self.keys = (row_keys, list(all_cols.split(sizes)) if plan.size > 1 else col_keys)
        self.all_cols = all_cols
        self.row_keyed = columns.use & (row_keys[:, None] == all_y[columns.all.clamp(min=0)])
        m = row_keys.shape[0]
        self.col_keyed = (row_keys == col_keys[:m])[:, None] if bidirectional else None
        all_rows = plan.gather_nograd(row_keys) if bidirectional else None

        def check():
            # kept = the non-keyed columns and the keyed positives; negatives = kept minus positives
            left = all_cols.shape[0] - _equal_count(all_cols, row_keys) - (columns.use & ~self.row_keyed).sum(1)
            check_negatives_left(left, "row_keys/col_keys (with the positives)")
            if all_rows is not None:
                y_keys = col_keys[:n_y]
                left = all_rows.shape[0] - _equal_count(all_rows, y_keys) - (~self.col_keyed[:, 0]).long()
                check_negatives_left(left, "row_keys/col_keys", lambda j: f"column {j} no negative in the column "
                                     f"direction (every other row shares its key {int(y_keys[j])})")

        world.checked(check, row_keys)

    @staticmethod
    def restore(lse: torch.Tensor, logits: torch.Tensor, keyed: torch.Tensor) -> torch.Tensor:
        """The log-sum-exp over the kept columns: ``lse`` (the engine's, over the non-keyed ones) and
        the keyed positives' ``logits [M, P']``."""
        back = torch.where(keyed, logits, float("-inf")).logsumexp(1)
        return torch.where(keyed.any(1), torch.logaddexp(lse, back), lse)


def _equal_count(pool: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """For each of ``values``, how many entries of ``pool`` equal it."""
    ordered = pool.sort().values
    return torch.searchsorted(ordered, values, right=True) - torch.searchsorted(ordered, values)


GUIDE_TILE = 1 << 24  # guide similarities per step (M x columns): 64 MiB in float32, never [M, N]


@torch.no_grad()
def guide_exclusions(plan, gx, gy, margin: float, n_y: int, columns: Columns, false_negatives=None):
    """GISTEmbed's rule: column ``j`` leaves row ``i``'s denominator when ``gx_i . gy_j > gx_i .
    gy_{t(i)} - margin`` (strict: ties stay) and ``j`` is not one of ``i``'s positives. -> (the
    excluded columns ``[M, E]``, -1 padded, as indices into every rank's columns side by side;
    each row's negatives left: not excluded, not keyed, not positive). The guide's similarities
    are taken a column chunk at a time; ``E`` is the largest count of a row."""
    n_cols = gy.shape[0]
    all_gy = plan.gather_nograd(gy)  # every rank's columns (y, then extra negatives), in rank order
    positives = columns.in_columns(n_y, n_cols)  # the same index space
    target = all_gy[positives[:, 0]]
    threshold = (gx * target.to(gx.dtype)).sum(-1) - margin
    fn = false_negatives  # its keys: this rank's rows', every rank's columns' (gathered once, there)
    row_keys, col_keys = (None, None) if fn is None else (fn.keys[0], fn.all_cols)
    rows, cols = [], []
    left = torch.zeros(gx.shape[0], dtype=torch.long, device=gx.device)
    step = max(1, GUIDE_TILE // max(gx.shape[0], 1))
    row_of = torch.arange(gx.shape[0], device=gx.device)[:, None].expand_as(positives)
    for c0 in range(0, all_gy.shape[0], step):
        idx = torch.arange(c0, min(c0 + step, all_gy.shape[0]), device=gx.device)
        inside = (positives >= c0) & (positives < c0 + idx.numel())
        positive = torch.zeros(gx.shape[0], idx.numel(), dtype=torch.bool, device=gx.device)
        positive[row_of[inside], positives[inside] - c0] = True
        out = (gx @ all_gy[idx].T.to(gx.dtype) > threshold[:, None]) & ~positive
        kept = ~out & ~positive
        if row_keys is not None:
            kept &= row_keys[:, None] != col_keys[None, idx]
        left += kept.sum(1)
        r, c = out.nonzero(as_tuple=True)
        rows.append(r)
        cols.append(idx[c])
    r, c = torch.cat(rows), torch.cat(cols)
    counts = torch.bincount(r, minlength=gx.shape[0])
    width = int(counts.max()) if r.numel() else 0
    excluded = torch.full((gx.shape[0], max(width, 1)), -1, dtype=torch.long, device=gx.device)
    if r.numel():
        order = torch.argsort(r, stable=True)
        r, c = r[order], c[order]
        slot = torch.arange(r.numel(), device=r.device) - (torch.cumsum(counts, 0) - counts)[r]
        excluded[r, slot] = c
    return excluded, left

