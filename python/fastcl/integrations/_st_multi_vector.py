"""sentence-transformers' ``MultiVectorMultipleNegativesRankingLoss`` on ``fastcl.maxsim_loss``
(re-exported by ``fastcl.integrations.sentence_transformers``; see its docstring for the mapping)."""
from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sentence_transformers.base.losses.merged_forward import embed_columns_padded
from sentence_transformers.multi_vector_encoder import losses as _mv
from sentence_transformers.multi_vector_encoder.scoring import colbert_scores, mean_colbert_scores
from sentence_transformers.util import similarity_fct_name, stack_padded_token_embeddings
from torch import Tensor

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
        sentence_features = [dict(features) for features in sentence_features]
        # as sentence-transformers: the query column alone (task "query"), the documents merged
        query_features = sentence_features[0]
        out = self.model(query_features, task=query_features.get("task", "query"))
        docs, masks = embed_columns_padded(self.model, sentence_features[1:], self.mini_batch_size,
                                           task_default="document")
        return self.compute_loss_from_embeddings(out["token_embeddings"], out["attention_mask"].bool(), docs, masks)

    def compute_loss_from_embeddings(self, queries: Tensor, queries_mask: Tensor, documents: list[Tensor],
                                     documents_masks: list[Tensor]) -> Tensor:
        """The loss of queries ``[B, Lq, D]`` against ``N`` document columns ``[B, L_k, D]`` (with
        their boolean scoring masks): query ``i``'s target is document ``i`` of the first column."""
        length_normalize = _length_normalize(self.similarity_fct)
        if length_normalize is None:
            length_normalize = self.model.similarity_fn_name == "meanmaxsim"
        # [B, N, L, D] as sentence-transformers stacks them: document j of column k is column j N + k
        docs, docs_mask = stack_padded_token_embeddings(list(documents), list(documents_masks))
        b, n = docs.shape[:2]
        labels = torch.arange(b, device=queries.device) * n
        loss_fn, q_mask = maxsim_loss, queries_mask.bool()
        docs, docs_mask = docs.flatten(0, 1), docs_mask.flatten(0, 1).bool()
        if self.gather_across_devices and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every rank's documents join (fastcl.distributed: they travel, this rank's queries stay), labels
            # global, as sentence-transformers' all_gather_padded; its ranks must agree on the token widths
            from .. import distributed

            loss_fn = distributed.maxsim_loss
            labels = labels + dist.get_rank() * b * n
            queries, q_mask = _pad_tokens_to_group_max(queries, q_mask)
            docs, docs_mask = _pad_tokens_to_group_max(docs, docs_mask)
        loss = loss_fn(queries, docs, 1.0 / self.scale, q_mask=q_mask, d_mask=docs_mask, labels=labels,
                       normalize_scores=length_normalize, backend=self.backend)
        # sentence-transformers scores in float32 whatever the tokens' dtype: a 16-bit loss is returned so
        return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss
