"""fastcl.integrations.colpali and .pylate against the originals' formulas, loss and gradients in float64.

Neither colpali-engine nor PyLate is installed in the test environment (PyLate 1.6.0 pins
sentence-transformers 5.3.0, colpali-engine 0.3.18 brings torchvision, whose CUDA ops do not load
against a CPU torch): tests/test_late_interaction_packages.py runs the released classes themselves in
the venv tools/late_interaction_venv.sh layers on it. The references below restate their code, op for
op, from the files read, so that these checks run everywhere:
- colpali: ``colpali_engine/loss/late_interaction_losses.py`` at illuin-tech/colpali ``9be8f1972d6d``
  (last changed by ``350ea5e``, "fix: index and sign fixed (#382)");
- PyLate: ``pylate/losses/contrastive.py``, ``cached_contrastive.py``, ``pylate/scores/colbert.py``
  (``colbert_scores``, ``ColBERTScores``) and ``ColBERT.skiplist_mask`` at lightonai/pylate ``1f1f47cee5df``.
Checked once by hand against the released classes too (``pip install --no-deps --target`` outside the
environment, the loss files loaded without their packages' ``__init__``): colpali-engine 0.3.18, all
36 configurations of the test below equal; PyLate 1.6.0's ``Contrastive`` equal, its
``CachedContrastive`` equal in value and, with ``size_average=False``, in gradients; with
``size_average=True`` PyLate's cached gradients are ``B`` times those of the loss it returns (it
backpropagates the per-chunk sums before dividing by ``B``), which fastcl does not copy.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcl
from fastcl.integrations import colpali, pylate
from fastcl.nn import UnsupportedFeatureError
from tolerances import assert_close, tol

BACKENDS = [*fastcl.backends("cpu", torch.float64, op="maxsim"), "reference"]
backends = pytest.mark.parametrize("backend", BACKENDS)
D = 6


def close(actual, expected, what=""):
    assert_close(actual, expected, tol("peer"), what)


# --- colpali, restated ----------------------------------------------------------------------------

class ColpaliReference:
    """``ColbertModule`` and its losses, on the materialised ``einsum("bnd,csd->bcns")``."""

    def __init__(self, temperature, normalize_scores=True, pos_aware_negative_filtering=False,
                 in_batch_term_weight=0.5, filter_threshold=0.95, filter_factor=0.5):
        self.t, self.norm, self.filter = temperature, normalize_scores, pos_aware_negative_filtering
        self.w, self.threshold, self.factor = in_batch_term_weight, filter_threshold, filter_factor

    def _normalization(self, scores, lengths):
        return scores / lengths.unsqueeze(1) if scores.ndim == 2 else scores / lengths

    def _in_batch(self, q, d, offset):
        lengths = (q[:, :, 0] != 0).sum(dim=1)
        scores = torch.einsum("bnd,csd->bcns", q, d).amax(dim=3).sum(dim=2)
        if self.norm:
            scores = self._normalization(scores, lengths)
        idx = torch.arange(scores.size(0))
        pos_idx = idx + offset
        if self.filter:
            scores = scores.clone()
            thresh = self.threshold * scores[idx, pos_idx].unsqueeze(1)
            mask = scores > thresh
            mask[idx, pos_idx] = False
            scores[mask] *= self.factor
        return scores, pos_idx

    def colbert(self, q, d, offset=0):
        scores, pos_idx = self._in_batch(q, d, offset)
        return F.cross_entropy(scores / self.t, pos_idx)

    def pairwise(self, q, d, offset=0):
        scores, _ = self._in_batch(q, d, offset)
        pos = scores.diagonal(offset=offset)
        top2 = scores.topk(2, dim=1).values
        neg = torch.where(top2[:, 0] == pos, top2[:, 1], top2[:, 0])
        return F.softplus((neg - pos) / self.t).mean()

    def sigmoid(self, q, d, offset=0):
        scores, pos_idx = self._in_batch(q, d, offset)
        b = scores.size(0)
        pos_mask = -torch.ones(b * b)
        pos_mask[pos_idx * (b + 1)] = 1.0
        return F.softplus(-(scores.view(-1) / self.t) * pos_mask).mean()

    def _negatives(self, q, d, neg, offset, pos_pattern, neg_pattern):
        lengths = (q[:, :, 0] != 0).sum(dim=1)
        pos = torch.einsum(pos_pattern, q, d[offset:offset + q.size(0)]).amax(dim=2).sum(dim=1)
        negs = torch.einsum(neg_pattern, q, neg).amax(dim=3).sum(dim=2)
        if self.norm:
            pos, negs = self._normalization(pos, lengths), self._normalization(negs, lengths)
        return F.softplus((negs - pos.unsqueeze(1)) / self.t).mean()

    def negative_ce(self, q, d, neg, offset=0):
        loss = self._negatives(q, d, neg, offset, "bnd,bsd->bns", "bnd,blsd->blns")
        return loss * (1 - self.w) + self.colbert(q, d, offset) * self.w if self.w > 0 else loss

    def pairwise_negative(self, q, d, neg, offset=0):
        loss = self._negatives(q, d, neg, offset, "bnd,bld->bnl", "bnd,bsld->bsnl")
        return loss * (1 - self.w) + self.pairwise(q, d, offset) * self.w if self.w > 0 else loss


def padded_tokens(rows, tokens, seed, *shape):
    """Unit-ish token embeddings with trailing padding as zero vectors (colpali's models multiply by
    the attention mask), as a leaf and the masked tensor built from it."""
    g = torch.Generator().manual_seed(seed)
    leaf = torch.randn(*shape, rows, tokens, D, generator=g, dtype=torch.float64).requires_grad_()
    lengths = torch.randint(2, tokens + 1, (*shape, rows), generator=g)
    mask = torch.arange(tokens) < lengths.unsqueeze(-1)
    return leaf, mask


def colpali_inputs(b=4, c=6, lq=5, ld=7, negs=2, seed=0):
    """Queries, documents (``c >= b`` for offsets) and hard negatives; documents ``2, 3`` are near
    copies of ``0, 1`` so that positive-aware filtering has negatives above the threshold."""
    q, qm = padded_tokens(b, lq, seed)
    d, dm = padded_tokens(c, ld, seed + 1)
    n, nm = padded_tokens(negs, ld, seed + 2, b)  # [B, negs, Ld, D]

    def build(q, d, n):
        near = torch.cat([d[:2], d[:2] + 0.01 * d[2:4], d[4:]])
        return (F.normalize(q, dim=-1) * qm.unsqueeze(-1), F.normalize(near, dim=-1) * dm.unsqueeze(-1),
                F.normalize(n, dim=-1) * nm.unsqueeze(-1))

    return (q, d, n), build


def run(loss_fn, leaves, build, with_negatives, offset):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    q, d, n = build(*leaves)
    args = (q, d, n) if with_negatives else (q, d)
    loss = loss_fn(*args, offset=offset)
    return loss, torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


COLPALI = {  # class: (reference method, takes negatives)
    colpali.ColbertLoss: ("colbert", False),
    colpali.ColbertPairwiseCELoss: ("pairwise", False),
    colpali.ColbertSigmoidLoss: ("sigmoid", False),
    colpali.ColbertNegativeCELoss: ("negative_ce", True),
    colpali.ColbertPairwiseNegativeCELoss: ("pairwise_negative", True),
}


@backends
@pytest.mark.parametrize("cls", list(COLPALI), ids=lambda c: c.__name__)
@pytest.mark.parametrize("normalize_scores", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("filtering", [False, True], ids=["", "filtered"])
@pytest.mark.parametrize("offset", [0, 2], ids=["offset0", "offset2"])
def test_colpali_losses_equal_colpali(backend, cls, normalize_scores, filtering, offset):
    method, negatives = COLPALI[cls]
    if cls is colpali.ColbertSigmoidLoss and offset:
        pytest.skip("colpali's sigmoid loss marks positives at (i + offset) * (B + 1) of a [B, C] view: B = C only")
    t = 0.5 if cls is colpali.ColbertPairwiseCELoss else 0.05
    kwargs = {"temperature": t, "normalize_scores": normalize_scores, "pos_aware_negative_filtering": filtering}
    weighted = {"in_batch_term_weight": 0.3} if negatives else {}
    ours = cls(**kwargs, **weighted, backend=backend)
    reference = getattr(ColpaliReference(**kwargs, **weighted), method)
    leaves, build = colpali_inputs(c=4 if cls is colpali.ColbertSigmoidLoss else 6)
    got, got_grads = run(ours, leaves, build, negatives, offset)
    want, want_grads = run(reference, leaves, build, negatives, offset)
    close(got, want, f"{cls.__name__} loss")
    close(got_grads, want_grads, f"{cls.__name__} gradients")


def test_colpali_filtering_changes_the_loss():
    leaves, build = colpali_inputs()
    plain, _ = run(colpali.ColbertLoss(0.05), leaves, build, False, 0)
    filtered, _ = run(colpali.ColbertLoss(0.05, pos_aware_negative_filtering=True), leaves, build, False, 0)
    assert not torch.allclose(plain, filtered)


def test_colpali_defaults_follow_colpali():
    assert colpali.ColbertLoss().temperature == 0.02 and colpali.ColbertLoss().normalize_scores
    assert colpali.ColbertPairwiseCELoss().temperature == 1.0
    assert colpali.ColbertNegativeCELoss().in_batch_term_weight == 0.5


@pytest.mark.parametrize("cls", list(COLPALI), ids=lambda c: c.__name__)
def test_colpali_smooth_max_is_refused(cls):
    with pytest.raises(UnsupportedFeatureError, match="use_smooth_max=True"):
        cls(use_smooth_max=True)


def test_colpali_in_batch_weight_is_checked():
    with pytest.raises(ValueError, match="in_batch_term_weight"):
        colpali.ColbertNegativeCELoss(in_batch_term_weight=1.5)


# --- PyLate, restated -----------------------------------------------------------------------------

class TinyColBERT(nn.Module):
    """What PyLate's losses use of a ColBERT: ``model(features)["token_embeddings"]``, ``skiplist``
    and ``do_query_expansion``; built in code, float64."""

    skiplist = [3, 4]

    def __init__(self, do_query_expansion=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.project = nn.Embedding(12, 8), nn.Linear(8, D)
        self.do_query_expansion = do_query_expansion
        self.double()

    def forward(self, features):
        return {"token_embeddings": self.project(torch.tanh(self.embed(features["input_ids"])))}


def tokenized(rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 12, (rows, length), generator=g)
    mask = (torch.arange(length) < torch.randint(2, length + 1, (rows, 1), generator=g)).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def pylate_contrastive(model, sentence_features, temperature=1.0, size_average=True):
    """``Contrastive.forward`` (one process) with ``ColBERTScores`` and ``colbert_scores``."""
    embeddings = [F.normalize(model(f)["token_embeddings"], p=2, dim=-1) for f in sentence_features]
    masks = [torch.ones_like(sentence_features[0]["input_ids"], dtype=torch.bool)]
    for f in sentence_features[1:]:
        mask = torch.ones_like(f["input_ids"], dtype=torch.bool)
        for token_id in model.skiplist:
            mask = torch.where(f["input_ids"] == token_id, torch.tensor(False), mask)
        masks.append(mask)
    masks = [torch.logical_and(m, f["attention_mask"]) for m, f in zip(masks, sentence_features)]
    b, n = embeddings[0].size(0), len(embeddings) - 1
    docs, docs_mask = torch.stack(embeddings[1:], dim=1), torch.stack(masks[1:], dim=1)
    q_mask = masks[0] if not model.do_query_expansion else None

    def colbert_scores(q, d, qm, dm):
        scores = torch.einsum("ash,bth->abst", q, d)
        if qm is not None:
            scores = scores * qm.unsqueeze(1).unsqueeze(3)
        scores = scores * dm.unsqueeze(0).unsqueeze(2)
        return scores.max(axis=-1).values.sum(axis=-1)

    per_group = [colbert_scores(embeddings[0], docs[:, j], q_mask, docs_mask[:, j]) for j in range(n)]
    scores = torch.stack(per_group, dim=2).reshape(-1, docs.shape[0] * n)
    labels = torch.arange(b) * n
    return F.cross_entropy(scores / temperature, labels, reduction="mean" if size_average else "sum")


def pylate_batch(b=5, columns=3):
    return [tokenized(b, 4, 0), *(tokenized(b, 6, 1 + k) for k in range(columns - 1))]


def loss_and_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@backends
@pytest.mark.parametrize("cls", [pylate.Contrastive, pylate.CachedContrastive], ids=lambda c: c.__name__)
@pytest.mark.parametrize("expansion", [False, True], ids=["query-mask", "query-expansion"])
@pytest.mark.parametrize("size_average", [True, False], ids=["mean", "sum"])
@pytest.mark.parametrize("columns", [2, 3], ids=["positives", "with-negatives"])
def test_pylate_losses_equal_pylate(backend, cls, expansion, size_average, columns):
    model, batch = TinyColBERT(expansion), pylate_batch(columns=columns)
    extra = {"mini_batch_size": 2} if cls is pylate.CachedContrastive else {}
    ours = cls(model, size_average=size_average, temperature=0.1, **extra, backend=backend)
    got = loss_and_grads(model, ours(batch))
    want = loss_and_grads(model, pylate_contrastive(model, batch, 0.1, size_average))
    close(got, want, f"{cls.__name__} loss and parameter gradients")


def test_pylate_padding_scores_zero_and_can_win_as_in_pylate():
    """A query token whose similarities to a document's real tokens are all negative gets 0 from the
    document's masked tokens in PyLate (it multiplies by the mask); so it does here."""
    model, batch = TinyColBERT(), pylate_batch()
    q = F.normalize(model(batch[0])["token_embeddings"], dim=-1)
    q_real = batch[0]["attention_mask"].bool()
    found = 0
    for column in batch[1:]:
        d = F.normalize(model(column)["token_embeddings"], dim=-1)
        real = column["attention_mask"].bool()
        sims = torch.einsum("ash,bth->abst", q, d).masked_fill(~real[None, :, None], float("-inf"))
        found += int(((sims.amax(-1) < 0) & ~real.all(1)[None, :, None] & q_real[:, None, :]).sum())
    assert found  # a real query token whose best real token in a padded document scores below 0
    close(pylate.Contrastive(model)(batch), pylate_contrastive(model, batch))


def test_pylate_cached_under_no_grad_is_the_loss():
    model, batch = TinyColBERT(), pylate_batch()
    with torch.no_grad():
        close(pylate.CachedContrastive(model, mini_batch_size=2)(batch), pylate_contrastive(model, batch))


def test_pylate_refuses_what_has_no_equivalent():
    with pytest.raises(UnsupportedFeatureError, match="score_metric"):
        pylate.Contrastive(TinyColBERT(), score_metric=lambda *a, **k: None)
    pylate.Contrastive(TinyColBERT(), gather_across_devices=True)  # one process: changes nothing, as in PyLate
