"""sentence-transformers' ``MultiVectorMultipleNegativesRankingLoss``, its cached form
(``CachedMultiVectorMultipleNegativesRankingLoss``, on ``fastcl.cached_loss``) and
``MultiVectorMatryoshkaLoss`` around them, on ``fastcl.maxsim_loss`` (re-exported by
``fastcl.integrations.sentence_transformers``; see its docstring for the mapping)."""
from __future__ import annotations

import functools
import random
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sentence_transformers.base.losses.merged_forward import embed_columns_padded
from sentence_transformers.multi_vector_encoder import losses as _mv
from sentence_transformers.multi_vector_encoder.scoring import colbert_scores, mean_colbert_scores
from sentence_transformers.sentence_transformer.losses.matryoshka import shrink
from sentence_transformers.util import similarity_fct_name, stack_padded_token_embeddings
from torch import Tensor, nn

from ..cached import cached_loss
from ..losses.maxsim import maxsim_loss

# the scorers fastcl's MaxSim reproduces: -> length_normalize (MeanMaxSim divides by the query's tokens)
_COLBERT = {colbert_scores: False, mean_colbert_scores: True}
# keywords of a functools.partial over them that change no score (chunk_elements: a memory budget)
_SCORE_KEYWORDS = {"chunk_elements", "length_normalize"}


def _length_normalize(similarity_fct) -> bool | None:
    """``similarity_fct`` -> whether the scores are divided by the query's token count; ``None`` for
    the model's own similarity (read at each call: ``similarity_fn_name`` may change)."""
    if similarity_fct is None:
        return None
    fn, keywords = similarity_fct, {}
    if isinstance(fn, functools.partial) and not fn.args and set(fn.keywords) <= _SCORE_KEYWORDS:
        fn, keywords = fn.func, fn.keywords
    if fn in _COLBERT:
        return bool(keywords.get("length_normalize", _COLBERT[fn]))
    raise NotImplementedError(f"similarity_fct={similarity_fct_name(similarity_fct)}: fastcl's MaxSim reproduces "
                              "the ColBERT scores only (None, colbert_scores, mean_colbert_scores, or a "
                              "functools.partial of them binding chunk_elements / length_normalize); XTR and "
                              "custom scorers have no equivalent")


def _pad_tokens_to_group_max(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``[rows, L, D]`` and its mask padded (masked) to the largest ``L`` of the process group."""
    width = torch.tensor(tokens.shape[1], device=tokens.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    extra = int(width) - tokens.shape[1]
    if extra == 0:
        return tokens, mask
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra))


def _loss_from_embeddings(loss_obj, queries: Tensor, queries_mask: Tensor, documents: list[Tensor],
                          documents_masks: list[Tensor]) -> Tensor:
    """Both classes' loss, with ``loss_obj``'s ``scale``, ``similarity_fct``, ``gather_across_devices``,
    ``backend`` and ``model`` (read at each call: they may be assigned after construction)."""
    length_normalize = _length_normalize(loss_obj.similarity_fct)
    if length_normalize is None:
        length_normalize = loss_obj.model.similarity_fn_name == "meanmaxsim"
    # [B, N, L, D] as sentence-transformers stacks them: document j of column k is column j N + k
    docs, docs_mask = stack_padded_token_embeddings(list(documents), list(documents_masks))
    b, n = docs.shape[:2]
    labels = torch.arange(b, device=queries.device) * n
    loss_fn, q_mask = maxsim_loss, queries_mask.bool()
    docs, docs_mask = docs.flatten(0, 1), docs_mask.flatten(0, 1).bool()
    if loss_obj.gather_across_devices and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # every rank's documents join (fastcl.distributed: they travel, this rank's queries stay), labels
        # global, as sentence-transformers' all_gather_padded; its ranks must agree on the token widths
        from .. import distributed

        loss_fn = distributed.maxsim_loss
        labels = labels + dist.get_rank() * b * n
        queries, q_mask = _pad_tokens_to_group_max(queries, q_mask)
        docs, docs_mask = _pad_tokens_to_group_max(docs, docs_mask)
    loss = loss_fn(queries, docs, 1.0 / loss_obj.scale, q_mask=q_mask, d_mask=docs_mask, labels=labels,
                   normalize_scores=length_normalize, backend=loss_obj.backend)
    # sentence-transformers scores in float32 whatever the tokens' dtype: a 16-bit loss is returned so
    return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss


Matryoshka = tuple[tuple[int, ...], tuple[float, ...]]  # this step's dims and their weights


def _over_dims(loss_obj, queries: Tensor, queries_mask: Tensor, documents: list[Tensor], documents_masks: list[Tensor],
               matryoshka: Matryoshka | None) -> Tensor:
    """The loss, or with Matryoshka ``sum_k w_k loss(shrink(tokens, d_k))`` (every token truncated to
    ``d_k``, then L2-normalised, as sentence-transformers' ``shrink``), one ``maxsim_loss`` per dim."""
    if matryoshka is None:
        return _loss_from_embeddings(loss_obj, queries, queries_mask, documents, documents_masks)
    return sum(w * _loss_from_embeddings(loss_obj, shrink(queries, d), queries_mask, [shrink(e, d) for e in documents],
                                         documents_masks) for d, w in zip(*matryoshka))


class MultiVectorMultipleNegativesRankingLoss(_mv.MultiVectorMultipleNegativesRankingLoss):
    """sentence-transformers' ``MultiVectorMultipleNegativesRankingLoss`` (same constructor, checks,
    config and citation): the model's columns embedded as sentence-transformers does, the MaxSim
    scores and their cross-entropy by ``fastcl.maxsim_loss`` (no ``[B, B N, Lq, Ld]`` tensor);
    ``backend=`` picks fastcl's backend."""

    def __init__(self, model, *, scale: float = 1.0, similarity_fct=None, mini_batch_size: int | None = None,
                 score_mini_batch_size: int | None = None, gather_across_devices: bool = False,
                 backend: str = "auto") -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct, mini_batch_size=mini_batch_size,
                         score_mini_batch_size=score_mini_batch_size, gather_across_devices=gather_across_devices)
        _length_normalize(similarity_fct)
        self.backend = backend

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        return self._forward(sentence_features)

    def _forward(self, sentence_features, matryoshka: Matryoshka | None = None) -> Tensor:
        sentence_features = [dict(features) for features in sentence_features]
        # as sentence-transformers: the query column alone (task "query"), the documents merged
        query_features = sentence_features[0]
        out = self.model(query_features, task=query_features.get("task", "query"))
        docs, masks = embed_columns_padded(self.model, sentence_features[1:], self.mini_batch_size,
                                           task_default="document")
        return _over_dims(self, out["token_embeddings"], out["attention_mask"].bool(), docs, masks, matryoshka)

    def compute_loss_from_embeddings(self, queries: Tensor, queries_mask: Tensor, documents: list[Tensor],
                                     documents_masks: list[Tensor]) -> Tensor:
        """The loss of queries ``[B, Lq, D]`` against ``N`` document columns ``[B, L_k, D]`` (with
        their boolean scoring masks): query ``i``'s target is document ``i`` of the first column."""
        return _loss_from_embeddings(self, queries, queries_mask, documents, documents_masks)


class _TokensWithMask(nn.Module):
    """A column's chunk -> ``[rows, L, D + 1]``: the model's ``token_embeddings`` (task read from the
    chunk's ``"task"``, stamped on every column) and, as one trailing channel (1 or 0), its output
    ``attention_mask`` (the scoring mask, ``MultiVectorMask``'s skiplist applied): ``cached_loss`` caches
    one tensor per chunk, and the mask must come from the same forward. Both are padded (masked) to
    the width of the column's input, so that every chunk of a column has one ``L`` (sentence-transformers
    pads each chunk to the column's widest). A module, so that ``cached_loss`` sees the model's
    parameters and buffers (see ``ModelOutput``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **features) -> Tensor:
        width = _input_width(features)  # before the model call: its modules may replace the mask
        out = self.model(features, task=features.get("task"))
        tokens, mask = out["token_embeddings"], out["attention_mask"]
        length = tokens.shape[1]
        if width is not None and length < width:
            tokens, mask = F.pad(tokens, (0, 0, 0, width - length)), F.pad(mask, (0, width - length))
        elif width is not None and length > width:
            raise ValueError(f"the model returned {length} token embeddings per row for an input of {width} "
                             "positions; fastcl's cached multi-vector loss pads each chunk to its column's input width")
        return torch.cat([tokens, mask.to(tokens.dtype).unsqueeze(-1)], dim=-1)


def _input_width(features: dict) -> int | None:
    for key in ("attention_mask", "input_ids"):
        value = features.get(key)
        if isinstance(value, Tensor) and value.dim() == 2:
            return value.shape[1]
    return None


def _split_mask(column: Tensor) -> tuple[Tensor, Tensor]:
    """``_TokensWithMask``'s output -> the token embeddings and their boolean mask."""
    return column[..., :-1], column[..., -1] > 0.5


class CachedMultiVectorMultipleNegativesRankingLoss(_mv.CachedMultiVectorMultipleNegativesRankingLoss):
    """sentence-transformers' ``CachedMultiVectorMultipleNegativesRankingLoss`` (same constructor, checks,
    config and citation) on ``fastcl.cached_loss``: every column (task ``"query"`` for the first,
    ``"document"`` for the others, unless the features carry their own ``"task"``) embedded in chunks of
    ``mini_batch_size`` rows without a graph, then ``MultiVectorMultipleNegativesRankingLoss``'s loss
    (``fastcl.maxsim_loss``) on the whole batch; the returned loss requires grad and its backward
    re-embeds each chunk (RNG replayed) and backpropagates its slice of the cached gradient.
    ``score_mini_batch_size`` and ``show_progress_bar`` are accepted and change nothing (no score tensor
    to chunk, no per-chunk loop to show); ``mini_batch_num_tokens`` raises ``NotImplementedError``
    (``cached_loss`` cuts chunks by rows); ``backend=`` picks fastcl's backend."""

    def __init__(self, model, *, scale: float = 1.0, similarity_fct=None, mini_batch_size: int = 32,
                 mini_batch_num_tokens: int | None = None, score_mini_batch_size: int | None = None,
                 gather_across_devices: bool = False, show_progress_bar: bool = False,
                 backend: str = "auto") -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct, mini_batch_size=mini_batch_size,
                         mini_batch_num_tokens=mini_batch_num_tokens, score_mini_batch_size=score_mini_batch_size,
                         gather_across_devices=gather_across_devices, show_progress_bar=show_progress_bar)
        if mini_batch_num_tokens is not None:
            raise NotImplementedError("mini_batch_num_tokens: fastcl.cached_loss cuts chunks by rows "
                                      "(mini_batch_size), not by a token budget")
        _length_normalize(similarity_fct)
        self.backend = backend

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        if "calculate_loss" in vars(self):  # sentence-transformers' MultiVectorMatryoshkaLoss decorated it
            raise NotImplementedError("sentence-transformers' MultiVectorMatryoshkaLoss around fastcl's cached loss: "
                                      "it decorates calculate_loss, which fastcl's loss does not call (the dims "
                                      "would be ignored); use fastcl.integrations.sentence_transformers."
                                      "MultiVectorMatryoshkaLoss")
        return self._forward(sentence_features)

    def _forward(self, sentence_features, matryoshka: Matryoshka | None = None) -> Tensor:
        # the task stamped on each column as sentence-transformers does (a collator's own "task" wins)
        features = [{**f, "task": f.get("task", "query" if i == 0 else "document")}
                    for i, f in enumerate(sentence_features)]
        if len(features) < 2:
            raise ValueError(f"Expected at least 2 inputs (queries and documents), got {len(features)}")
        for i, f in enumerate(features):
            rows = {v.shape[0] for v in f.values() if isinstance(v, Tensor) and v.dim() > 0}
            if len(rows) > 1:
                raise NotImplementedError(f"column {i} holds tensors of {sorted(rows)} rows (flattened inputs: "
                                          "a VLM's pixel_values, FA2's cu_seq_lens): fastcl.cached_loss splits "
                                          "every tensor of a column along dim 0 by mini_batch_size rows")
        encoder = _TokensWithMask(self.model)
        if not any(p.requires_grad for p in self.model.parameters()) and any(
                isinstance(v, Tensor) and v.requires_grad for f in features for v in f.values()):
            # no trainable parameter but inputs that require grad (embeddings from upstream): as a function,
            # which cached_loss does not take for a frozen tower, so the second pass reaches the inputs
            encoder = encoder.forward
        return cached_loss(functools.partial(self._loss, matryoshka), [encoder] * len(features), features,
                           chunk_size=self.mini_batch_size)

    def _loss(self, matryoshka: Matryoshka | None, *columns: Tensor) -> Tensor:
        (queries, queries_mask), *documents = [_split_mask(c) for c in columns]
        return _over_dims(self, queries, queries_mask, [d for d, _ in documents], [m for _, m in documents],
                          matryoshka)


class MultiVectorMatryoshkaLoss(_mv.MultiVectorMatryoshkaLoss):
    """sentence-transformers' ``MultiVectorMatryoshkaLoss`` (same constructor, checks, config and
    citation) around fastcl's ``MultiVectorMultipleNegativesRankingLoss`` or its cached form: the model
    runs once per step (the cached loss: once per chunk and pass), then a loop over this step's dims,
    one ``maxsim_loss`` per dim on the tokens truncated and L2-normalised (sentence-transformers'
    ``shrink``), weighted and summed; not one pass for every dim, as fastcl's ``MatryoshkaLoss`` makes
    for the single-vector losses. ``n_dims_per_step > 0`` samples that many dims with Python's
    ``random.sample``, as sentence-transformers does."""

    def __init__(self, model, loss: nn.Module, matryoshka_dims, matryoshka_weights=None,
                 n_dims_per_step: int = -1) -> None:
        if not isinstance(loss, _FASTCL_MULTI_VECTOR):
            raise TypeError("fastcl's MultiVectorMatryoshkaLoss wraps fastcl's (Cached)MultiVectorMultipleNegatives"
                            f"RankingLoss, got {type(loss).__name__}; use sentence-transformers' own "
                            "MultiVectorMatryoshkaLoss for other losses")
        super().__init__(model, loss, matryoshka_dims, matryoshka_weights=matryoshka_weights,
                         n_dims_per_step=n_dims_per_step)
        vars(loss).pop("calculate_loss", None)  # sentence-transformers' decoration of a cached loss: unused here

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        indices = range(len(self.matryoshka_dims))
        if 0 < self.n_dims_per_step < len(indices):
            indices = sorted(random.sample(indices, self.n_dims_per_step))
        dims = tuple(self.matryoshka_dims[i] for i in indices)
        return self.loss._forward(sentence_features, (dims, tuple(self.matryoshka_weights[i] for i in indices)))


_FASTCL_MULTI_VECTOR = (MultiVectorMultipleNegativesRankingLoss, CachedMultiVectorMultipleNegativesRankingLoss)
