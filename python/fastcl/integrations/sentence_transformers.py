"""sentence-transformers' contrastive losses computed by fastcl (never the ``B x B`` score matrix).

    from fastcl.integrations.sentence_transformers import CachedMultipleNegativesRankingLoss, MatryoshkaLoss
    loss = MatryoshkaLoss(model, CachedMultipleNegativesRankingLoss(model, mini_batch_size=64), [768, 256, 64])
    SentenceTransformerTrainer(model=model, train_dataset=ds, loss=loss).train()

(In that trainer, 3 steps with dropout: the parameters of sentence-transformers' own MNRL and
Matryoshka(MNRL) to float32 round-off; ``tests/test_integrations_sentence_transformers.py``.)
Each class takes the constructor of the sentence-transformers (6.x) loss of the same name and gives its
loss and gradients; an option with no exact fastcl equivalent raises ``NotImplementedError`` naming
it. How each maps (``s = scale``, ``q`` the anchors, ``d`` the positives, ``n`` the hard-negative
columns; ``cos_sim``: ``normalize=True``, ``dot_score``: ``False``):

- ``MultipleNegativesRankingLoss``: ``("query_to_doc",)`` is ``infonce_loss(q, d, 1/s,
  extra_negatives=cat(n))``. Other directions are rows of their own sharing the target logit
  ``S(q_i, d_i)``: ``query_to_query`` joins ``q`` as columns (``row_keys``/``col_keys`` drop
  ``q_i``); ``doc_to_query``/``doc_to_doc`` are the rows ``d_i`` against ``q`` and the documents
  (keys drop the query's own documents; without ``doc_to_query`` a one-feature guide drops every
  ``q_j``, ``j != i``, keeping ``q_i`` as the target). With per-row terms ``l = lse - S(q_i, d_i)``:
  ``joint`` is ``logaddexp(l_q, l_d)`` (or ``log(e^l_q + e^l_d - 1)`` when ``d``'s rows hold the
  target only once), ``per_direction`` is ``(l_q + l_d) / 2`` (``clip_loss`` without hard negatives).
- ``CachedMultipleNegativesRankingLoss``: the same loss through ``fastcl.cached_loss`` with
  ``chunk_size=mini_batch_size``: the returned loss requires grad and its backward runs the chunked
  re-forward (so the trainer's ``loss.backward()`` does the cached step).
- ``GISTEmbedLoss``/``CachedGISTEmbedLoss``: ``infonce_loss(..., guide=(guide(q), guide(columns)),
  guide_margin=margin)`` with the guide's embeddings normalised (cosine); ``contrast_anchors``: ``q``
  joins the columns, keys drop ``q_i``; ``contrast_positives``: rows ``d_i`` against ``d`` with target
  ``q_i`` (keys drop every other ``q_j``, the guide the false negatives and ``d_i`` itself).
- ``MultiVectorMultipleNegativesRankingLoss`` (a ``MultiVectorEncoder``'s ColBERT loss): the columns
  embedded as sentence-transformers does (the query column alone, task ``"query"``; the documents
  merged, in ``mini_batch_size`` chunks), their scoring masks (``MultiVectorMask``'s skiplist) as
  ``maxsim_loss``'s masks, the document columns stacked as sentence-transformers stacks them
  (document ``j`` of column ``k`` at ``j N + k``, ``labels = i N``), ``temperature = 1/scale``;
  MeanMaxSim (``model.similarity_fn_name == "meanmaxsim"``, ``mean_colbert_scores``, or
  ``length_normalize=True``) is ``normalize_scores=True``. ``score_mini_batch_size`` changes nothing
  (there is no score tensor to chunk). sentence-transformers casts the MaxSim scores to float32; fastcl
  keeps the tokens' dtype (float64 stays float64; a 16-bit loss is returned as float32, as theirs). A
  document with no scoreable token scores ``-1e9`` there and ``-inf`` here: the same loss unless it is
  a query's positive.
- ``CachedMultiVectorMultipleNegativesRankingLoss``: that loss through ``fastcl.cached_loss``,
  ``chunk_size=mini_batch_size``, one tower per column: the task stamped on each column as
  sentence-transformers does (``"query"`` first, ``"document"`` after, a collator's ``"task"`` wins);
  each chunk's ``token_embeddings`` and output ``attention_mask`` (the scoring mask) travel as one
  ``[rows, L, D + 1]`` tensor (the mask its last channel), padded (masked) to the column's input width,
  since ``cached_loss`` caches one tensor of one shape per column. ``score_mini_batch_size`` and
  ``show_progress_bar`` change nothing.
- ``MultiVectorMatryoshkaLoss`` around either multi-vector loss: the model once, then a loop over the
  step's dims, one ``maxsim_loss`` per dim on the tokens truncated and L2-normalised
  (sentence-transformers' ``shrink``), weighted and summed (not the one pass of ``MatryoshkaLoss``
  above). sentence-transformers' own ``MultiVectorMatryoshkaLoss`` works around the plain loss and
  raises around the cached one.
- ``MatryoshkaLoss``: wrapped around the classes above, ``matryoshka_dims``/``matryoshka_weights``
  reach fastcl's loss (truncate, then normalise, as sentence-transformers' ``shrink`` does, also for
  ``dot_score``): one pass over the features for ``query_to_doc`` (and ``per_direction``) where the
  backend has it; the composite directions and GIST loop over the dimensions inside fastcl or here.
- ``gather_across_devices=True`` in a process group of more than one rank (MNRL, its cached and
  Matryoshka forms, the multi-vector losses, plain, cached and in ``MultiVectorMatryoshkaLoss``): the
  same calls on ``fastcl.distributed`` over the default group (``allgather``): every rank's columns
  (positives, hard negatives and, for the composite directions, queries) join, this rank's rows stay,
  keys are global row ids; each rank's loss and gradients are those of sentence-transformers'
  ``all_gather_with_grad`` on that rank. The multi-vector loss pads the queries' and documents' tokens
  (masked) to the group's widest first, as sentence-transformers' ``all_gather_padded`` does for the
  documents. GIST (and its cached and Matryoshka forms) gathers the positives and hard negatives with
  their guide embeddings through sentence-transformers' own ``all_gather_with_grad`` (the guide's rule
  needs every column's guide embedding) and runs fastcl's loss on this rank's anchors, target
  ``rank * B + i``.

Refused (``NotImplementedError``): ``hardness_mode`` with ``hardness_strength > 0`` (the penalty
``alpha * stop_grad(cos)`` is not a scale of the logits), a ``similarity_fct`` other than ``cos_sim`` /
``dot_score``, ``margin_strategy="relative"`` (fastcl's guide margin is absolute), ``mini_batch_num_tokens``; for
the multi-vector loss a ``similarity_fct`` other than ``None``, ``colbert_scores``,
``mean_colbert_scores`` or a ``functools.partial`` of them binding ``chunk_elements`` /
``length_normalize`` (XTR's top-k scores and custom scorers have no fastcl equivalent); the cached
multi-vector loss inside sentence-transformers' own ``MultiVectorMatryoshkaLoss`` (at ``forward``) or fed
flattened inputs (a VLM's ``pixel_values``, FA2's ``cu_seq_lens``: ``cached_loss`` splits every tensor by rows).
``contrast_positives`` needs the guide to drop ``d_i`` from its own row (``cos_g(d_i, d_i) >
cos_g(q_i, d_i) - margin``: true unless ``margin < 0`` or duplicate texts); otherwise it raises.
GIST rows that the guide leaves without a negative are counted first (chunk by chunk, without a
graph) and given 0, as sentence-transformers does (fastcl's losses refuse such rows). A column
whose guide similarity equals the threshold exactly (``margin=0`` and a negative with the positive's
text) is a tie that float rounding decides, here and there alike; it may fall on either side.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import missing

try:
    from sentence_transformers import util as _st_util
    from sentence_transformers.base.losses.gradcache import has_static_embedding_input
    from sentence_transformers.base.losses.merged_forward import embed_columns
    from sentence_transformers.sentence_transformer import losses as _st

    # imports sentence-transformers too
    from ._st_multi_vector import (
        CachedMultiVectorMultipleNegativesRankingLoss,
        MultiVectorMatryoshkaLoss,
        MultiVectorMultipleNegativesRankingLoss,
    )
except ImportError as err:  # tests/test_integration_extras.py: with the library blocked
    raise missing("fastcl.integrations.sentence_transformers", "sentence_transformers", "sentence-transformers",
                  err) from err

from .. import cached_loss, clip_loss, infonce_loss
from ._model_output import ModelOutput

__all__ = ["CachedGISTEmbedLoss", "CachedMultipleNegativesRankingLoss", "CachedMultiVectorMultipleNegativesRankingLoss",
           "GISTEmbedLoss", "MatryoshkaLoss", "MultipleNegativesRankingLoss", "MultiVectorMatryoshkaLoss",
           "MultiVectorMultipleNegativesRankingLoss"]

Matryoshka = tuple[tuple[int, ...], tuple[float, ...]]  # ascending dims, their weights
# The citations come from sentence-transformers' own classes, held here: whoever puts these classes in
# its namespace (tools/peer_tests.py does) must not make a citation call itself.
# (sentence-transformers' CachedGISTEmbedLoss has none, nor has fastcl's.)
_CITED = {name: getattr(_st, name).citation.fget for name in ("CachedMultipleNegativesRankingLoss", "MatryoshkaLoss")}


def _normalize_flag(similarity_fct) -> bool:
    """cos_sim -> normalise, dot_score -> not; anything else has no fastcl equivalent."""
    if similarity_fct is _st_util.cos_sim:
        return True
    if similarity_fct is _st_util.dot_score:
        return False
    raise NotImplementedError(f"similarity_fct={_st_util.similarity_fct_name(similarity_fct)}: fastcl computes a "
                              "log-sum-exp of scaled dot products, so only util.cos_sim and util.dot_score map")


def _group_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _World(NamedTuple):
    """Where a loss runs: fastcl's single-process losses, or ``fastcl.distributed``'s over the default
    process group (``gather_across_devices`` with more than one rank: every rank's columns join, this
    rank's rows stay, as sentence-transformers' ``all_gather_with_grad`` does). ``rank`` offsets this
    rank's rows to their global ids (the keys)."""
    infonce_loss: Any
    clip_loss: Any
    rank: int = 0


def _world(gather_across_devices: bool) -> _World:
    if gather_across_devices and _group_size() > 1:
        from .. import distributed

        return _World(distributed.infonce_loss, distributed.clip_loss, torch.distributed.get_rank())
    return _World(infonce_loss, clip_loss)


def _join_sharing_target(a: Tensor, b: Tensor) -> Tensor:
    """``log(e^a + e^b - 1)``: the per-row loss of one softmax over two row sets that both hold the
    target logit, counted once (``a = lse_A - t``, ``b = lse_B - t``, both >= 0). The argument of the
    log is >= 1 after shifting by ``max(a, b)``, so nothing cancels."""
    m = torch.maximum(a, b).detach().clamp_min(0)
    return m + torch.log(torch.exp(a - m) + torch.exp(b - m) - torch.exp(-m))


def _cut(t: Tensor, d: int | None) -> Tensor:
    return t if d is None else t[:, :d]


def _over_dims(matryoshka: Matryoshka | None, loss) -> Tensor:
    """``loss(None)`` without Matryoshka, else ``sum_k w_k loss(d_k)`` (each prefix its own loss)."""
    if matryoshka is None:
        return loss(None)
    return sum(w * loss(d) for d, w in zip(*matryoshka))


@torch.no_grad()
def _negatives_left(gx: Tensor, gy: Tensor, margin: float, targets: Tensor, row_keys: Tensor | None,
                    col_keys: Tensor | None, step: int = 4096) -> Tensor:
    """How many negatives each row ``i`` (target column ``targets[i]``) keeps under GISTEmbed's rule and
    the keys, counted a column chunk at a time as fastcl's guide does (never ``[M, N']`` at once)."""
    threshold = (gx * gy[targets]).sum(-1) - margin
    left = torch.zeros_like(targets)
    for c0 in range(0, gy.shape[0], step):
        cols = torch.arange(c0, min(c0 + step, gy.shape[0]), device=gx.device)
        kept = ~(gx @ gy[cols].T > threshold[:, None]) & (cols[None, :] != targets[:, None])
        if row_keys is not None:
            kept &= row_keys[:, None] != col_keys[None, cols]
        left += kept.sum(1)
    return left


def _guided_rows(x: Tensor, y: Tensor, temperature: float, extra: Tensor | None, gx: Tensor, gy: Tensor,
                 margin: float, row_keys: Tensor | None = None, col_keys: Tensor | None = None,
                 offset: int = 0, backend: str = "auto") -> Tensor:
    """Per-row guided InfoNCE ``lse - S(x_i, y_{offset + i})`` (cosine); a row the guide and the keys
    leave without a negative gets 0, as in sentence-transformers (fastcl's loss refuses such a row)."""
    kw = dict(normalize=True, guide_margin=margin, reduction="none", backend=backend)
    targets = torch.arange(offset, offset + x.shape[0], device=x.device)
    keep = _negatives_left(gx, gy, margin, targets, row_keys, col_keys) > 0
    if bool(keep.all()):
        diagonal = offset == 0 and x.shape[0] == y.shape[0]
        return infonce_loss(x, y, temperature, labels=None if diagonal else targets, extra_negatives=extra,
                            guide=(gx, gy), row_keys=row_keys, col_keys=col_keys, **kw)
    out = x[:, 0] * 0  # on the graph, so that a batch with no negative at all still backpropagates (zeros)
    if bool(keep.any()):
        sel = keep.nonzero()[:, 0]
        keys = {} if row_keys is None else dict(row_keys=row_keys[sel], col_keys=col_keys)
        out = out.index_put((sel,), infonce_loss(x[sel], y, temperature, labels=targets[sel], extra_negatives=extra,
                                                 guide=(gx[sel], gy), **keys, **kw))
    return out


def _delegated_getattr(self, name: str) -> Any:
    """A cached loss's hyperparameters live on the plain loss it wraps (``self.loss``): read there."""
    if name in type(self)._DELEGATED:
        return getattr(self._modules["loss"], name)
    return nn.Module.__getattr__(self, name)


def _delegated_setattr(self, name: str, value: Any) -> None:
    """... and assigned there (``loss.scale = 5.0`` after construction changes the loss, as in
    sentence-transformers; set on the wrapper, the forward would not see it)."""
    if name in type(self)._DELEGATED and "loss" in self.__dict__.get("_modules", {}):
        setattr(self._modules["loss"], name, value)
    else:
        nn.Module.__setattr__(self, name, value)


class MultipleNegativesRankingLoss(_st.MultipleNegativesRankingLoss):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` (same constructor, same checks, same
    config and citation), computed by fastcl; ``backend=`` picks fastcl's backend."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=_st_util.cos_sim, gather_across_devices: bool = False,
                 directions=("query_to_doc",), partition_mode="joint", hardness_mode=None,
                 hardness_strength: float = 0.0, *, backend: str = "auto") -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct, gather_across_devices=gather_across_devices,
                         directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
                         hardness_strength=hardness_strength)
        _normalize_flag(similarity_fct)
        if hardness_mode is not None and hardness_strength > 0.0:
            raise NotImplementedError(f"hardness_mode={hardness_mode!r} with hardness_strength > 0: the penalty "
                                      "alpha * stop_grad(cos_sim) added to negative logits is not a scale of them, "
                                      "which fastcl's losses take")
        self.backend = backend

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self._forward(sentence_features, labels)

    def _forward(self, sentence_features, labels, matryoshka: Matryoshka | None = None) -> Tensor:
        return self._loss(embed_columns(self.model, sentence_features), matryoshka)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        return self._loss(embeddings)

    def _loss(self, embeddings: Sequence[Tensor], matryoshka: Matryoshka | None = None) -> Tensor:
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        w = _world(self.gather_across_devices)
        normalize = _normalize_flag(self.similarity_fct) or matryoshka is not None  # shrink() normalises
        q, docs = embeddings[0], list(embeddings[1:])
        t = 1.0 / self.scale
        negs = torch.cat(docs[1:]) if len(docs) > 1 else None
        directions = set(self.directions)
        kw = dict(normalize=normalize, backend=self.backend)
        dims = dict(matryoshka_dims=matryoshka[0], matryoshka_weights=matryoshka[1]) if matryoshka else {}
        if directions == {"query_to_doc"}:
            return w.infonce_loss(q, docs[0], t, extra_negatives=negs, **kw, **dims)
        if directions == {"query_to_doc", "doc_to_query"} and self.partition_mode == "per_direction":
            if negs is None:
                return w.clip_loss(q, docs[0], self.scale, **kw, **dims)
            return (w.infonce_loss(q, docs[0], t, extra_negatives=negs, **kw, **dims)
                    + w.infonce_loss(docs[0], q, t, **kw, **dims)) / 2
        return _over_dims(matryoshka, lambda d: self._composite([_cut(e, d) for e in embeddings], t, kw, w))

    def _composite(self, embeddings: list[Tensor], t: float, kw: dict, w: _World) -> Tensor:
        """Directions beyond query_to_doc as per-row terms ``lse - S(q_i, d_i)``, joined per row."""
        q, docs = embeddings[0], embeddings[1:]
        b, dev = q.shape[0], q.device
        rows = torch.arange(b, device=dev) + w.rank * b  # global ids: keys meet every rank's columns
        none = torch.full((b,), -1, device=dev, dtype=torch.long)
        negs = docs[1:]
        directions = set(self.directions)
        # rows q_i: their documents, then the hard negatives, then (query_to_query) the other queries
        extra = list(negs) + ([q] if "query_to_query" in directions else [])
        keys = {}
        if "query_to_query" in directions:  # q_i leaves its own row; the target d_i always stays
            keys = dict(row_keys=rows, col_keys=torch.cat([rows] + [none] * len(negs) + [rows]))
        l_q = w.infonce_loss(q, docs[0], t, extra_negatives=torch.cat(extra) if extra else None, reduction="none",
                           **keys, **kw)
        if "doc_to_query" in directions or "doc_to_doc" in directions:
            # rows d_i, target q_i (the same logit S(q_i, d_i)); doc_to_doc: every document but the query's own
            extra = torch.cat(docs) if "doc_to_doc" in directions else None
            keys = {}
            if extra is not None:
                keys = dict(row_keys=rows, col_keys=torch.cat([none] + [rows] * len(docs)))
            guide = {}
            if "doc_to_query" not in directions:  # q_i stays as the target only: a guide drops the other q_j
                one = torch.ones(b, 1, device=dev, dtype=q.dtype)
                guide = dict(guide=(one, torch.cat([one, torch.zeros(extra.shape[0], 1, device=dev, dtype=q.dtype)])),
                             guide_margin=0.5)
            l_d = w.infonce_loss(docs[0], q, t, extra_negatives=extra, reduction="none", **keys, **guide, **kw)
            if self.partition_mode == "per_direction":
                per_row = (l_q + l_d) / 2
            elif "doc_to_query" in directions:  # S(d_i, q_i) counted in both row sets, as sentence-transformers does
                per_row = torch.logaddexp(l_q, l_d)
            else:
                per_row = _join_sharing_target(l_q, l_d)
        else:
            per_row = l_q
        return per_row.mean()


class CachedMultipleNegativesRankingLoss(nn.Module):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` on ``fastcl.cached_loss``:
    ``forward`` embeds every column in chunks of ``mini_batch_size`` rows without a graph and returns
    the loss, requiring grad; its ``backward`` re-embeds each chunk (RNG replayed) and backpropagates."""

    # sentence-transformers' flag for a loss whose backward runs from a hook on the returned loss:
    # AdaptiveLayerLoss warns on it, its MatryoshkaLoss refuses it (use fastcl's MatryoshkaLoss).
    uses_gradient_cache = True

    def __init__(self, model, scale: float = 20.0, similarity_fct=_st_util.cos_sim, mini_batch_size: int = 32,
                 mini_batch_num_tokens: int | None = None, gather_across_devices: bool = False,
                 directions=("query_to_doc",), partition_mode="joint", show_progress_bar: bool = False,
                 hardness_mode=None, hardness_strength: float = 0.0, *, backend: str = "auto") -> None:
        super().__init__()
        if has_static_embedding_input(model):  # sentence-transformers' check and words
            raise ValueError("CachedMultipleNegativesRankingLoss is not compatible with a SentenceTransformer model "
                             "based on a StaticEmbedding, whose inputs cannot be split into mini-batches along a "
                             "batch dimension. Consider using MultipleNegativesRankingLoss instead.")
        if mini_batch_num_tokens is not None:
            raise NotImplementedError("mini_batch_num_tokens: fastcl.cached_loss cuts chunks by rows "
                                      "(mini_batch_size), not by a token budget")
        self.model = model
        self.loss = MultipleNegativesRankingLoss(
            model, scale=scale, similarity_fct=similarity_fct, gather_across_devices=gather_across_devices,
            directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
            hardness_strength=hardness_strength, backend=backend)
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar  # accepted; there is no per-chunk loss loop to show

    _DELEGATED = ("scale", "similarity_fct", "gather_across_devices", "directions", "partition_mode",
                  "hardness_mode", "hardness_strength", "temperature", "backend")
    __getattr__, __setattr__ = _delegated_getattr, _delegated_setattr

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self._forward(sentence_features, labels)

    def _forward(self, sentence_features, labels, matryoshka: Matryoshka | None = None) -> Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"Expected at least 2 inputs, got {len(features)}")
        encoder = ModelOutput(self.model, "sentence_embedding")
        return cached_loss(lambda *e: self.loss._loss(e, matryoshka), [encoder] * len(features), features,
                           chunk_size=self.mini_batch_size)

    def get_config_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "similarity_fct": _st_util.similarity_fct_name(self.similarity_fct),
                "mini_batch_size": self.mini_batch_size, "mini_batch_num_tokens": self.mini_batch_num_tokens,
                "gather_across_devices": self.gather_across_devices, "directions": self.directions,
                "partition_mode": self.partition_mode, "hardness_mode": self.hardness_mode,
                "hardness_strength": self.hardness_strength}

    @property
    def citation(self) -> str:
        return _CITED["CachedMultipleNegativesRankingLoss"](self)


class GISTEmbedLoss(_st.GISTEmbedLoss):
    """sentence-transformers' ``GISTEmbedLoss`` (same constructor, checks, config and citation),
    computed by fastcl's guided InfoNCE (``guide=``, ``guide_margin=``)."""

    def __init__(self, model, guide, temperature: float = 0.01, margin_strategy="absolute", margin: float = 0.0,
                 contrast_anchors: bool = True, contrast_positives: bool = True, gather_across_devices: bool = False,
                 *, backend: str = "auto") -> None:
        super().__init__(model, guide, temperature=temperature, margin_strategy=margin_strategy, margin=margin,
                         contrast_anchors=contrast_anchors, contrast_positives=contrast_positives,
                         gather_across_devices=gather_across_devices)
        if margin_strategy == "relative":
            raise NotImplementedError("margin_strategy='relative' (threshold g_ap - |g_ap| * margin): fastcl's "
                                      "guide_margin is absolute (g_ap - margin); use margin_strategy='absolute'")
        self.backend = backend

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self._forward(sentence_features, labels)

    def _forward(self, sentence_features, labels, matryoshka: Matryoshka | None = None) -> Tensor:
        features = list(sentence_features)
        guided = self._guide_embeddings(features)
        return self._loss(embed_columns(self.model, features), guided, matryoshka)

    def _guide_embeddings(self, features: list[dict[str, Tensor]]) -> list[Tensor]:
        """The guide's embeddings of every column, as sentence-transformers' GISTEmbedLoss takes them."""
        guide_features = [dict(f) for f in features]
        with torch.no_grad():
            if self.must_retokenize:
                guide_features = []
                for f in features:
                    input_ids = f["input_ids"]
                    if "cu_seq_lens_q" in f:
                        flat, cuts = input_ids[0].tolist(), f["cu_seq_lens_q"].tolist()
                        input_ids = [flat[s:e] for s, e in zip(cuts[:-1], cuts[1:])]
                    decoded = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
                    guide_features.append(_st_util.batch_to_device(self.guide.preprocess(decoded), self.guide.device))
            return embed_columns(self.guide, guide_features)

    def _loss(self, embeddings: Sequence[Tensor], guided: Sequence[Tensor], matryoshka: Matryoshka | None) -> Tensor:
        if len(embeddings) not in (2, 3):
            raise ValueError(f"Expected 2 or 3 embeddings, got {len(embeddings)}")
        g = [F.normalize(e.to(embeddings[0].device), dim=-1) for e in guided]  # the guide compares by cosine
        rank = 0
        if self.gather_across_devices and _group_size() > 1:
            # as sentence-transformers: every rank's positives and hard negatives (and their guide
            # embeddings) join as columns, with its all_gather_with_grad; the anchors stay local
            embeddings = [embeddings[0], *(_st_util.all_gather_with_grad(e) for e in embeddings[1:])]
            g = [g[0], *(_st_util.all_gather_with_grad(e) for e in g[1:])]
            rank = torch.distributed.get_rank()
        return _over_dims(matryoshka, lambda d: self._gist([_cut(e, d) for e in embeddings], g, rank))

    def _gist(self, embeddings: list[Tensor], g: list[Tensor], rank: int) -> Tensor:
        """Rows: this rank's anchors (then its positives); columns: the positives and hard negatives of
        every rank, this rank's anchors; anchor ``i``'s target is positive ``rank * B + i``."""
        a, p = embeddings[0], embeddings[1]
        b, dev = a.shape[0], a.device
        offset = rank * b
        rows = torch.arange(b, device=dev)
        # rows a_i: positives, the hard negatives, (contrast_anchors) the other anchors
        cols, gcols = [p], [g[1]]
        if len(embeddings) == 3:
            cols.append(embeddings[2])
            gcols.append(g[2])
        keys = {}
        if self.contrast_anchors:
            cols.append(a)
            gcols.append(g[0])
            # a_i's own column leaves its row; no other column shares its key
            keys = dict(row_keys=rows, col_keys=torch.cat([torch.full((c.shape[0],), -1, device=dev) for c in cols[:-1]]
                                                          + [rows]))
        extra = torch.cat(cols[1:]) if len(cols) > 1 else None
        l_a = _guided_rows(a, p, self.temperature, extra, g[0], torch.cat(gcols), self.margin, **keys, offset=offset,
                           backend=self.backend)
        if not self.contrast_positives:
            return l_a.mean()
        # rows p_i, target a_i (the logit S(a_i, p_i) again, and the guide's threshold g(a_i).g(p_i)): keys
        # drop every other anchor, the guide the positives above the threshold, p_i itself among them
        p_mine, gp_all = p[offset:offset + b], g[1]
        gp, ga = gp_all[offset:offset + b], g[0]
        threshold = (gp * ga).sum(-1) - self.margin
        if not bool(((gp * gp).sum(-1) > threshold + 1e-6).all()):
            raise NotImplementedError("contrast_positives with a guide that rates a positive at least as similar "
                                      "to its anchor (minus margin) as to itself (margin < 0, or duplicate texts): "
                                      "fastcl cannot drop p_i from its own row then")
        zeros = torch.zeros(b, dtype=torch.long, device=dev)
        l_p = _guided_rows(p_mine, a, self.temperature, p, gp, torch.cat([ga, gp_all]), self.margin, row_keys=zeros,
                           col_keys=torch.cat([zeros, torch.ones(p.shape[0], dtype=torch.long, device=dev)]),
                           backend=self.backend)
        return _join_sharing_target(l_a, l_p).mean()


class CachedGISTEmbedLoss(nn.Module):
    """sentence-transformers' ``CachedGISTEmbedLoss`` on ``fastcl.cached_loss`` (the guide embeds the
    whole batch without a graph first; the model's columns are cached in chunks of ``mini_batch_size``)."""

    uses_gradient_cache = True  # as CachedMultipleNegativesRankingLoss's

    def __init__(self, model, guide, temperature: float = 0.01, mini_batch_size: int = 32,
                 mini_batch_num_tokens: int | None = None, show_progress_bar: bool = False,
                 margin_strategy="absolute", margin: float = 0.0, contrast_anchors: bool = True,
                 contrast_positives: bool = True, gather_across_devices: bool = False, *,
                 backend: str = "auto") -> None:
        super().__init__()
        if has_static_embedding_input(model):  # sentence-transformers' check and words
            raise ValueError("CachedGISTEmbedLoss is not compatible with a SentenceTransformer model based on a "
                             "StaticEmbedding. Consider using GISTEmbedLoss instead.")
        if mini_batch_num_tokens is not None:
            raise NotImplementedError("mini_batch_num_tokens: fastcl.cached_loss cuts chunks by rows "
                                      "(mini_batch_size), not by a token budget")
        self.model = model
        self.loss = GISTEmbedLoss(model, guide, temperature=temperature, margin_strategy=margin_strategy,
                                  margin=margin, contrast_anchors=contrast_anchors,
                                  contrast_positives=contrast_positives, gather_across_devices=gather_across_devices,
                                  backend=backend)
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar

    _DELEGATED = ("guide", "temperature", "margin_strategy", "margin", "contrast_anchors", "contrast_positives",
                  "gather_across_devices", "must_retokenize", "backend")
    __getattr__, __setattr__ = _delegated_getattr, _delegated_setattr

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self._forward(sentence_features, labels)

    def _forward(self, sentence_features, labels, matryoshka: Matryoshka | None = None) -> Tensor:
        features = list(sentence_features)
        guided = self.loss._guide_embeddings(features)
        encoder = ModelOutput(self.model, "sentence_embedding")
        return cached_loss(lambda *e: self.loss._loss(e, guided, matryoshka), [encoder] * len(features), features,
                           chunk_size=self.mini_batch_size)

    def get_config_dict(self) -> dict[str, Any]:
        return {"guide": self.guide, "temperature": self.temperature, "mini_batch_size": self.mini_batch_size,
                "mini_batch_num_tokens": self.mini_batch_num_tokens, "margin_strategy": self.margin_strategy,
                "margin": self.margin, "contrast_anchors": self.contrast_anchors,
                "contrast_positives": self.contrast_positives, "gather_across_devices": self.gather_across_devices}


_FASTCL_LOSSES = (MultipleNegativesRankingLoss, CachedMultipleNegativesRankingLoss, GISTEmbedLoss, CachedGISTEmbedLoss)


class MatryoshkaLoss(nn.Module):
    """sentence-transformers' ``MatryoshkaLoss`` around one of this module's losses: the chosen
    dimensions reach fastcl's loss as ``matryoshka_dims``/``matryoshka_weights`` (truncate, then
    normalise; the model runs once). ``n_dims_per_step > 0`` samples that many dimensions per step with
    Python's ``random.sample``, as sentence-transformers does."""

    def __init__(self, model, loss: nn.Module, matryoshka_dims: Sequence[int],
                 matryoshka_weights: Sequence[float] | None = None, n_dims_per_step: int = -1) -> None:
        super().__init__()
        if not isinstance(loss, _FASTCL_LOSSES):
            raise TypeError(f"fastcl's MatryoshkaLoss wraps {', '.join(c.__name__ for c in _FASTCL_LOSSES)} from "
                            f"fastcl.integrations.sentence_transformers, got {type(loss).__name__}; use "
                            "sentence_transformers.losses.MatryoshkaLoss for other losses")
        self.model = model
        self.loss = loss
        if not matryoshka_dims:
            raise ValueError("You must provide at least one dimension in matryoshka_dims.")
        if any(dim <= 0 for dim in matryoshka_dims):
            raise ValueError("All dimensions passed to a matryoshka loss must be > 0.")
        if matryoshka_weights is None:
            matryoshka_weights = [1] * len(matryoshka_dims)
        elif len(matryoshka_weights) != len(matryoshka_dims):
            raise ValueError("matryoshka_weights must be the same length as matryoshka_dims.")
        full = model._get_untruncated_embedding_dimension()
        if full is not None and any(d > full for d in matryoshka_dims):
            raise ValueError(f"Dimensions in matryoshka_dims cannot exceed the model's embedding dimension of {full}.")
        # descending, as sentence-transformers keeps them (get_config_dict shows them so)
        self.matryoshka_dims, self.matryoshka_weights = zip(*sorted(zip(matryoshka_dims, matryoshka_weights),
                                                                    key=lambda x: x[0], reverse=True))
        self.n_dims_per_step = n_dims_per_step

    def _chosen(self) -> Matryoshka:
        """This step's dimensions, ascending (equal ones merged, their weights added)."""
        idx = range(len(self.matryoshka_dims))
        if 0 < self.n_dims_per_step < len(idx):
            idx = random.sample(idx, self.n_dims_per_step)
        merged: dict[int, float] = {}
        for i in idx:
            d = self.matryoshka_dims[i]
            merged[d] = merged.get(d, 0.0) + float(self.matryoshka_weights[i])
        dims = tuple(sorted(merged))
        return dims, tuple(merged[d] for d in dims)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self.loss._forward(sentence_features, labels, self._chosen())

    def get_config_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.__class__.__name__, "matryoshka_dims": self.matryoshka_dims,
                "matryoshka_weights": self.matryoshka_weights, "n_dims_per_step": self.n_dims_per_step}

    @property
    def citation(self) -> str:
        return _CITED["MatryoshkaLoss"](self)
