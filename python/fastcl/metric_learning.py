"""pytorch-metric-learning drop-ins, ``NTXentLoss`` and ``SupConLoss``, on the fused engine.

    from fastcl.metric_learning import NTXentLoss, SupConLoss  # for pytorch_metric_learning.losses'

Same constructors (``temperature`` first, then pml's keywords), the same
``forward(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)``, the same
values, and the class names pml's wrappers look up, so ``SelfSupervisedLoss`` (either
``symmetric``) and ``CrossBatchMemory`` wrap them. pml's computation, restated (version 2.x):

- Similarities: cosine (the default ``CosineSimilarity``: rows L2-normalised, then dot products)
  divided by ``temperature``; rows are ``embeddings``, columns ``ref_emb`` (default: the rows).
- Pairs: ``(i, j)`` is positive when ``labels[i] == ref_labels[j]``, negative otherwise. Without
  ``ref_emb``, or when ``ref_labels`` *is* the ``labels`` object, a row does not pair with itself.
  An ``indices_tuple`` may only restate that set, less at most one positive column per row (what
  ``CrossBatchMemory`` passes: the batch's own slots in the memory removed).
- Terms: SupCon one per row (``fastcl.supcon_loss``'s ``l_r`` over the reference columns),
  NT-Xent one per positive pair (``losses/pairs.py``).
- The loss is ``sum(embeddings * 0)`` (zero, with a zero gradient) when there is no positive pair,
  no negative pair, or at most one of each, e.g. a batch of one class. Otherwise the default
  reducers: SupCon averages the row terms that are > 0 (``AvgNonZeroReducer``: rows without a
  positive, whose term is 0, are left out; so is a row whose term pml computes as exactly 0 by
  rounding, which fastcl's arithmetic can count differently), NT-Xent averages the pair terms
  (``MeanReducer``). A ``reducer=`` of pml's gets the same loss dictionary pml would give it.

The functional ``fastcl.supcon_loss`` keeps SPEC.md's math instead: in a batch of one class every
row still has its positives, and its term ``lse_P S - mean_P S >= log |P(r)|`` counts (0.693 for
three identical rows, where pml returns 0).

Not supported (``UnsupportedFeatureError``): distances that are not dot products (``LpDistance``,
``SNRDistance``, ``power != 1``), ``embedding_regularizer``, and an ``indices_tuple`` that is a
miner's subset of pairs or a triplet tuple. ``collect_stats`` is accepted and records nothing.
Input with NaN or Inf gives a NaN loss (pml's ``AvgNonZeroReducer`` drops NaN rows instead).
Under ``torch.autocast`` the loss has pml's dtype there (``_autocast.py``): the autocast dtype on
CPU, float32 on CUDA, cast once from fastcl's float32 math.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from . import _checks as check
from ._autocast import as_peer_under_autocast
from ._checks import UnsupportedFeatureError
from .losses._common import arange, dispatch, finish, maybe_normalize
from .losses.ntxent import _group_ids, contrast_terms
from .losses.pairs import pair_ntxent_terms

# pml distances that are dot products of (optionally normalised) rows: what the engine computes
_DOT_PRODUCTS = ("CosineSimilarity", "DotProductSimilarity")


def _normalizes(owner: str, distance) -> bool:
    """Whether pml's ``distance`` normalises the rows first; raises for one that is not a dot product."""
    if distance is None:
        return True
    name = type(distance).__name__
    if (name in _DOT_PRODUCTS and getattr(distance, "is_inverted", False) and getattr(distance, "power", 1) == 1
            and getattr(distance, "p", 2) == 2):
        return bool(distance.normalize_embeddings)
    raise UnsupportedFeatureError(
        f"{owner}(distance={name}(...)): fastcl's fused kernels compute dot-product similarities only "
        f"(CosineSimilarity, or DotProductSimilarity, with power=1 and p=2); {name} is not one")


def _on(t, like: Tensor):
    """pml moves labels to the features' device; anything else is left for the checks to name."""
    return t.to(like.device) if isinstance(t, Tensor) else t


class _PairLoss(nn.Module):
    """What pml's ``GenericPairLoss`` does around the loss: pairs, the zero loss, the reducer."""

    def __init__(self, temperature: float | Tensor, *, distance=None, reducer=None, embedding_regularizer=None,
                 embedding_reg_weight: float = 1, collect_stats=None, backend: str = "auto"):
        super().__init__()
        owner = type(self).__name__
        if embedding_regularizer is not None:
            raise UnsupportedFeatureError(f"{owner}(embedding_regularizer=...): add the regulariser's loss to "
                                          "fastcl's yourself")
        self.normalize = _normalizes(owner, distance)
        self.distance = distance
        self.reducer = copy.deepcopy(reducer)  # as pml: a reducer keeps per-call statistics
        self.temperature, self.backend = temperature, backend
        self.embedding_reg_weight, self.collect_stats = embedding_reg_weight, collect_stats

    def extra_repr(self) -> str:
        return f"temperature={self.temperature!r}, backend={self.backend!r}"

    # pml's loss under autocast (its source, torch.amp's op lists): on CPU it stays in the autocast
    # dtype (matmul, then exp / logsumexp); on CUDA exp, log and sum autocast to float32.
    AUTOCAST_RESULT = {"cpu": "autocast", "cuda": "float32"}

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if not isinstance(embeddings, Tensor):  # the checks name it
            return self._forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        with as_peer_under_autocast(self, embeddings):
            return self._forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _forward(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        owner = type(self).__name__
        if labels is None:
            if indices_tuple is None:
                raise ValueError(f"{owner}: labels and indices_tuple cannot both be None")
            raise UnsupportedFeatureError(f"{owner}(indices_tuple=...) without labels: fastcl builds the pairs from "
                                          "labels")
        same_labels = ref_labels is labels  # pml's test for "the reference is the batch"
        x, labels = _rows(embeddings, labels)
        s = check.temperature_scale("temperature", self.temperature, x)
        engine = dispatch(self.backend, x, "lse")
        y = skip = None  # y=None: the rows against themselves, each skipping itself
        if ref_emb is None:
            gx = gy = _group_ids(labels)
        else:
            y = check.features("ref_emb", ref_emb)
            check.same_kind(("embeddings", "ref_emb"), (x, y))
            if ref_labels is None:
                raise ValueError(f"{owner}: ref_emb needs ref_labels (the labels of its rows)")
            ref_labels = check.labels("ref_labels", _on(ref_labels, x), length=y.shape[0], high=None, device=x.device)
            groups = _group_ids(torch.cat([labels, ref_labels]))
            gx, gy = groups[:x.shape[0]], groups[x.shape[0]:]
            skip = arange(x.shape[0], x) if same_labels else None  # pml: the diagonal, rows == columns here
        if indices_tuple is not None:
            y = x if y is None else y
            skip = _skip_from_pairs(owner, indices_tuple, gx, gy)
        if not _enough_pairs(gx, gy, y is None, skip):
            return torch.sum(embeddings * 0)  # pml's zero loss: zero, with a (zero) gradient
        xn = maybe_normalize(x, self.normalize)
        yn = None if y is None else maybe_normalize(y, self.normalize)
        terms, indices, kind = self._terms(engine, xn, gx, yn, gy, s, skip)
        if self.reducer is not None:  # it gets the terms in the dtype pml's would
            terms = terms.to(x.dtype)
            out = self.reducer({"loss": {"losses": terms, "indices": indices, "reduction_type": kind}},
                               embeddings, labels)
        else:
            out = self._reduce(terms, embeddings)
        return finish(out, x.dtype, x, y, s)

    def _terms(self, engine, x, gx, y, gy, s, skip):
        raise NotImplementedError

    def _reduce(self, terms, embeddings):
        raise NotImplementedError


class SupConLoss(_PairLoss):
    """pytorch-metric-learning ``SupConLoss(temperature=0.1)`` drop-in (module docstring: the rules).

    A fastcl extension: ``embeddings`` may also be ``[V, B, D]`` views with ``labels [B]``, as
    ``fastcl.supcon_loss`` takes them (rows stacked view-major).
    """

    def __init__(self, temperature: float | Tensor = 0.1, **options):
        super().__init__(temperature, **options)

    def _terms(self, engine, x, gx, y, gy, s, skip):
        per_row, _ = contrast_terms(engine, x, gx, s, y, gy, skip)
        return per_row, arange(x.shape[0], x), "element"

    def _reduce(self, terms, embeddings):
        kept = terms[terms > 0]  # AvgNonZeroReducer
        return kept.mean() if kept.numel() else torch.sum(embeddings * 0)


class NTXentLoss(_PairLoss):
    """pytorch-metric-learning ``NTXentLoss(temperature=0.07)`` drop-in (module docstring: the rules).

    One term per positive pair, its denominator the pair and the anchor's negatives (not its other
    positives); ``mean`` over the pairs. Two views of ``B`` samples (labels ``arange(B)`` twice)
    give SimCLR's loss, ``fastcl.ntxent_loss``. The lightly drop-in of the same name, with a
    ``forward(out0, out1)``, is ``fastcl.nn.NTXentLoss``.
    """

    def __init__(self, temperature: float | Tensor = 0.07, **options):
        super().__init__(temperature, **options)

    def _terms(self, engine, x, gx, y, gy, s, skip):
        terms, rows, cols = pair_ntxent_terms(engine, x, gx, y, gy, s, skip, torch.finfo(x.dtype).tiny)
        return terms, (rows, cols), "pos_pair"

    def _reduce(self, terms, embeddings):
        return terms.mean()  # MeanReducer; there is at least one pair here


def _rows(embeddings, labels):
    """``(rows [N, D], labels [N])``; ``[V, B, D]`` views with ``labels [B]`` are stacked view-major."""
    if isinstance(embeddings, Tensor) and embeddings.dim() == 3:
        check.features("embeddings", embeddings, rank=3)
        v, b, d = embeddings.shape
        labels = check.labels("labels", _on(labels, embeddings), length=b, high=None, device=embeddings.device)
        return embeddings.reshape(v * b, d), labels.repeat(v)
    x = check.features("embeddings", embeddings)
    return x, check.labels("labels", _on(labels, x), length=x.shape[0], high=None, device=x.device)


def _enough_pairs(gx, gy, self_contrast: bool, skip) -> bool:
    """pml's conditions for a non-zero loss: a positive and a negative pair, and more than one of either."""
    rows, cols = gx.shape[0], gy.shape[0]
    n_match = torch.bincount(gy, minlength=rows + cols)[gx]
    skipped = rows if self_contrast else 0 if skip is None else (skip >= 0).sum()
    positives, negatives = (int(v) for v in (n_match.sum() - skipped, rows * cols - n_match.sum()))
    return positives > 0 and negatives > 0 and (positives > 1 or negatives > 1)


def _skip_from_pairs(owner: str, indices_tuple, gx, gy):
    """The positive column each row leaves out (``-1``: none), when ``indices_tuple`` is the complete
    set of pairs less at most one positive per row; ``UnsupportedFeatureError`` otherwise.

    The fused kernels take every pair; a subset chosen pair by pair (a miner's) would need the
    ``M x N`` mask they exist to avoid. The check costs ``O(P log P)`` for the ``P`` pairs of the
    tuple, which its maker has already spent building it.
    """
    unsupported = UnsupportedFeatureError(
        f"{owner}(indices_tuple=...): fastcl computes over all pairs of labels and reference labels, less at most "
        "one positive per row (what get_all_pairs_indices gives, and CrossBatchMemory passes without a miner); a "
        "miner's subset of pairs or triplets needs pytorch-metric-learning's own loss")
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) != 4:
        raise unsupported
    rows, cols = gx.shape[0], gy.shape[0]
    a1, p, a2, n = (_index_vector(f"indices_tuple[{k}]", t, bound, gx.device)
                    for k, (t, bound) in enumerate(zip(indices_tuple, (rows, cols, rows, cols))))
    if a1.shape != p.shape or a2.shape != n.shape:
        raise ValueError(f"{owner}: indices_tuple's anchors and partners differ in length "
                         f"({a1.numel()}, {p.numel()}, {a2.numel()}, {n.numel()})")
    per_group = torch.bincount(gy, minlength=rows + cols)
    n_match = per_group[gx]
    labelled_right = bool((gx[a1] == gy[p]).all()) and bool((gx[a2] != gy[n]).all())
    all_negatives = a2.numel() == int((cols - n_match).sum()) and _distinct(a2 * cols + n)
    short = n_match - torch.bincount(a1, minlength=rows)  # positives a row lacks: 0 or 1
    all_but_one_positive = _distinct(a1 * cols + p) and bool(((short >= 0) & (short <= 1)).all())
    if not (labelled_right and all_negatives and all_but_one_positive):
        raise unsupported
    # The missing column is the sum of the row's class columns less the sum of those it has.
    class_col_sums = torch.zeros_like(per_group).index_add_(0, gy, arange(cols, gy))
    row_col_sums = torch.zeros_like(n_match).index_add_(0, a1, p)
    return torch.where(short == 1, class_col_sums[gx] - row_col_sums, torch.full_like(short, -1))


def _index_vector(name: str, t, bound: int, device) -> Tensor:
    t = torch.as_tensor(t, device=device)
    if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor, got {t.dtype} of shape {tuple(t.shape)}")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
        raise ValueError(f"{name} must lie in [0, {bound}), got values from {int(t.min())} to {int(t.max())}")
    return t


def _distinct(keys: Tensor) -> bool:
    return torch.unique(keys).numel() == keys.numel()


__all__ = ["NTXentLoss", "SupConLoss", "UnsupportedFeatureError"]
