"""PyLate's contrastive losses on ``fastcl.maxsim_loss``: ColBERT training without token similarities.

Drop-ins for ``pylate.losses.Contrastive`` and ``pylate.losses.CachedContrastive`` (read at
lightonai/pylate ``1f1f47cee5df``, PR #213), same constructors, ``forward(sentence_features,
labels=None)``, same defaults::

    from fastcl.integrations.pylate import CachedContrastive
    loss = CachedContrastive(model, mini_batch_size=32)      # model: a pylate ColBERT
    # SentenceTransformerTrainer(model=model, loss=loss, ...) as with PyLate's own

As PyLate does: each sentence feature (the queries, then the positives, then any negatives, of one
batch size ``B``) through ``model(features)["token_embeddings"]``, L2-normalised; the documents'
masks are their attention masks without the ``model.skiplist`` tokens, the queries' their attention
masks (none with ``model.do_query_expansion``); query ``i`` scores every document of every column
(``N`` columns: ``B N`` documents) and its target is its own positive; cross-entropy of the scores
divided by ``temperature``, the mean (``size_average``) or the sum over queries.

PyLate's ``ColBERTScores`` multiplies the token similarities by the masks, so a masked document
token scores 0 and still takes part in the max (it wins when every real token scores below 0);
fastcl's MaxSim never lets padding win, so the masked tokens are passed as zero vectors instead of
being masked: the same scores and gradients, and the ``[B, B N, Lq, Ld]`` tensor never exists.

``CachedContrastive`` runs on ``fastcl.cached_loss`` (the GradCache step whose second pass runs when
the trainer backpropagates the loss, as PyLate's hook does): ``mini_batch_size`` rows per model
call, the RNG state replayed. ``score_mini_batch_size`` (PyLate's memory knob for its scores) is
accepted and changes nothing; ``show_progress_bar`` neither (there is no per-chunk loop to show).
Its gradients are those of the loss it returns, which are PyLate's ``Contrastive``'s. PyLate 1.6.0's
``CachedContrastive(size_average=True)`` returns the same loss but backpropagates ``B`` times its
gradient (each chunk's summed cross-entropy is backpropagated before the division by ``B``):
checked against the released class; not copied.

Not supported (``UnsupportedFeatureError``): a ``score_metric`` other than PyLate's default
``ColBERTScores`` (fastcl computes the ColBERT MaxSim itself); ``gather_across_devices=True`` inside
a process group of more than one rank (PyLate's loss times the world size and its gathered
gradients are not reproduced; with one process it changes nothing, as in PyLate).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .._checks import UnsupportedFeatureError
from ..cached import cached_loss
from ..losses.maxsim import maxsim_loss
from ._model_output import ModelOutput

__all__ = ["CachedContrastive", "Contrastive", "colbert_contrastive_loss"]


def colbert_contrastive_loss(embeddings: list[Tensor], masks: list[Tensor], temperature: float = 1.0, *,
                             size_average: bool = True, query_mask: bool = True, backend: str = "auto") -> Tensor:
    """PyLate's contrastive loss on embeddings: ``embeddings[0]`` queries ``[B, Lq, D]``, then
    ``N`` document columns ``[B, Ld, D]`` (one ``Ld``); ``masks`` likewise ``[B, L]`` (nonzero: a real
    token). Query ``i``'s target is document ``i`` of the first column; the columns are laid out as
    PyLate's (document ``j`` of column ``k`` at ``j N + k``)."""
    queries, columns = embeddings[0], embeddings[1:]
    if not columns:
        raise ValueError("sentence_features needs the queries and at least one document column")
    n, b = len(columns), queries.shape[0]
    docs = torch.stack(columns, dim=1)                          # [B, N, Ld, D]
    docs_mask = torch.stack([m.bool() for m in masks[1:]], dim=1)  # [B, N, Ld]
    # masked document tokens as zero vectors: they score 0 and can win a max, as in PyLate
    docs = (docs * docs_mask.unsqueeze(-1).to(docs.dtype)).flatten(0, 1)
    labels = torch.arange(b, device=queries.device) * n
    return maxsim_loss(queries, docs, temperature, q_mask=masks[0].bool() if query_mask else None, labels=labels,
                       reduction="mean" if size_average else "sum", backend=backend)


def _skiplist_masks(sentence_features: list[dict[str, Tensor]], skiplist: list[int]) -> list[Tensor]:
    """PyLate's ``extract_skiplist_mask``: the attention masks, the documents' without skiplist tokens."""
    masks = [sentence_features[0]["attention_mask"].bool()]
    for features in sentence_features[1:]:
        ids = features["input_ids"]
        skipped = torch.isin(ids, torch.tensor(list(skiplist), dtype=ids.dtype, device=ids.device))
        masks.append(features["attention_mask"].bool() & ~skipped)
    return masks


def _model_attribute(model: nn.Module, name: str):
    """``model.<name>``, or that of the module a (D)DP wrapper holds, as PyLate reads it."""
    return getattr(model, name) if hasattr(model, name) else getattr(model.module, name)


class _ColbertContrastive(nn.Module):
    def __init__(self, model, score_metric, size_average: bool, gather_across_devices: bool, temperature: float,
                 backend: str):
        super().__init__()
        if score_metric is not None and type(score_metric).__name__ != "ColBERTScores":
            raise UnsupportedFeatureError(f"{type(self).__name__}(score_metric={score_metric!r}): fastcl computes "
                                          "the ColBERT MaxSim itself; only PyLate's default ColBERTScores has an "
                                          "equivalent")
        self.model, self.score_metric, self.size_average = model, score_metric, size_average
        self.gather_across_devices, self.temperature, self.backend = gather_across_devices, temperature, backend

    def _check_world(self) -> None:
        dist = torch.distributed
        group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.gather_across_devices and group:
            raise UnsupportedFeatureError(f"{type(self).__name__}(gather_across_devices=True) over "
                                          f"{dist.get_world_size()} ranks: not reproduced by fastcl's integration")

    def _encoder(self) -> ModelOutput:
        """The model's token embeddings, L2-normalised (PyLate's ColBERT scores them so): ``enc(**features)``."""
        return ModelOutput(self.model, "token_embeddings", normalize=True)

    def _loss(self, embeddings: list[Tensor], masks: list[Tensor]) -> Tensor:
        return colbert_contrastive_loss(embeddings, masks, self.temperature, size_average=self.size_average,
                                        query_mask=not _model_attribute(self.model, "do_query_expansion"),
                                        backend=self.backend)


class Contrastive(_ColbertContrastive):
    """PyLate ``Contrastive(model, score_metric=None, score_mini_batch_size=None, size_average=True,
    gather_across_devices=False, temperature=1.0)``; ``forward(sentence_features, labels=None)``."""

    def __init__(self, model, score_metric=None, score_mini_batch_size: int | None = None, size_average: bool = True,
                 gather_across_devices: bool = False, temperature: float = 1.0, *, backend: str = "auto"):
        super().__init__(model, score_metric, size_average, gather_across_devices, temperature, backend)
        self.score_mini_batch_size = score_mini_batch_size

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        self._check_world()
        sentence_features = list(sentence_features)
        masks = _skiplist_masks(sentence_features, _model_attribute(self.model, "skiplist"))
        embed = self._encoder()
        return self._loss([embed(**features) for features in sentence_features], masks)


class CachedContrastive(_ColbertContrastive):
    """PyLate ``CachedContrastive(model, score_metric=None, mini_batch_size=32, score_mini_batch_size=None,
    size_average=True, gather_across_devices=False, show_progress_bar=False, temperature=1.0)``;
    ``forward(sentence_features, labels=None)`` returns the loss, requiring grad; its backward runs
    the chunked second pass (``fastcl.cached_loss``)."""

    def __init__(self, model, score_metric=None, mini_batch_size: int = 32, score_mini_batch_size: int | None = None,
                 size_average: bool = True, gather_across_devices: bool = False, show_progress_bar: bool = False,
                 temperature: float = 1.0, *, backend: str = "auto"):
        super().__init__(model, score_metric, size_average, gather_across_devices, temperature, backend)
        self.mini_batch_size = mini_batch_size
        self.score_mini_batch_size = mini_batch_size if score_mini_batch_size is None else score_mini_batch_size
        self.show_progress_bar = show_progress_bar

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        self._check_world()
        sentence_features = list(sentence_features)
        masks = _skiplist_masks(sentence_features, _model_attribute(self.model, "skiplist"))
        embed = self._encoder()
        return cached_loss(lambda *embeddings: self._loss(list(embeddings), masks), [embed] * len(sentence_features),
                           sentence_features, chunk_size=self.mini_batch_size)
