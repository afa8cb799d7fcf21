"""colpali-engine's late-interaction losses on fastcl's tiled MaxSim: no ``[B, C, Lq, Ld]`` tensor.

Drop-ins for ``colpali_engine.loss.late_interaction_losses`` (read at illuin-tech/colpali
``9be8f1972d6d``, the file as of its commit ``350ea5e``; checked equal by hand to the released
colpali-engine 0.3.18, whose hard max goes through ``late-interaction-kernels`` where that runs),
same constructors and ``forward`` signatures, same defaults::

    from fastcl.integrations.colpali import ColbertLoss
    loss = ColbertLoss(temperature=0.02)(query_embeddings, doc_embeddings)   # [B, Lq, D], [C, Ld, D]

colpali computes the in-batch scores from ``einsum("bnd,csd->bcns")``, the token similarities of
every query against every document. Here the in-batch scores ``s [B, C]`` come from fastcl's
``maxsim`` op (the one under ``fastcl.maxsim_loss``: tiled, ``O((B Lq + C Ld) D + B C)`` memory),
and everything after is colpali's arithmetic on that small matrix: the division by the query
lengths (``normalize_scores``: the tokens whose first component is not 0), the positive-aware
filtering (``pos_aware_negative_filtering``: a negative scoring above ``filter_threshold`` times the
positive is multiplied by ``filter_factor``), the cross-entropy against ``arange(B) + offset``, the
pairwise softplus against the hardest negative, the sigmoid loss. The explicit negatives of the
``*Negative*`` losses (``neg_doc_embeddings [B, Nneg, Ld, D]``, each query against its own) and
the pairs ``query i, document offset + i`` are scored as colpali scores them, ``O(B Nneg Lq Ld)``:
one query's own documents, not the batch's.

colpali feeds no token mask: padding is zero vectors (its models multiply by the attention mask),
which score 0 against everything; so does it here. Values equal colpali's. Gradients too, except
at zero tokens: where several zero tokens tie for a max, torch's ``amax`` splits the gradient among
them and fastcl's MaxSim gives it to the first (a model that zeroes its padding sends neither back).

Not reproduced: ``use_smooth_max=True`` (a log-sum-exp over the document tokens, not a MaxSim:
``UnsupportedFeatureError``); the out-of-bounds ``print`` after normalisation (``norm_tol``: it reads
the scores back, a device sync per step). ``max_batch_size`` (colpali's index buffer) and ``tau``
(the smooth max's) are accepted and change nothing. ``backend=`` (keyword) picks fastcl's backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import UnsupportedFeatureError
from ..backend import resolve
from ..backend.maxsim import maxsim_scores
from ..losses.maxsim import reference_scores

__all__ = ["ColbertLoss", "ColbertNegativeCELoss", "ColbertPairwiseCELoss", "ColbertPairwiseNegativeCELoss",
           "ColbertSigmoidLoss"]


def in_batch_scores(query_embeddings: Tensor, doc_embeddings: Tensor, backend: str = "auto") -> Tensor:
    """``s [B, C]``: ``s_bc = sum_n max_s <q_bn, d_cs>`` over every token (colpali's
    ``einsum("bnd,csd->bcns").amax(3).sum(2)``), tiled; in the math dtype (float32 for 16-bit tokens)."""
    for name, t in (("query_embeddings", query_embeddings), ("doc_embeddings", doc_embeddings)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a [rows, tokens, D] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if query_embeddings.shape[-1] != doc_embeddings.shape[-1]:
        raise ValueError(f"query_embeddings have D={query_embeddings.shape[-1]} but doc_embeddings "
                         f"D={doc_embeddings.shape[-1]}")
    name = resolve(backend, query_embeddings, op="maxsim")
    if name == "reference":
        return reference_scores(query_embeddings, doc_embeddings)
    return maxsim_scores(name, query_embeddings, doc_embeddings)


def _pair_scores(query_embeddings: Tensor, docs: Tensor, pattern: str) -> Tensor:
    """Each query against its own documents, as colpali scores them (``amax`` over the document
    tokens, then the sum over the query tokens): ``O(B * docs per query * Lq * Ld)``."""
    raw = torch.einsum(pattern, query_embeddings, docs)
    return raw.amax(dim=-1).sum(dim=-1)


class ColbertModule(nn.Module):
    """colpali's ``ColbertModule``: the shared hyper-parameters and the arithmetic on scores."""

    def __init__(self, max_batch_size: int = 1024, tau: float = 0.1, norm_tol: float = 1e-3,
                 filter_threshold: float = 0.95, filter_factor: float = 0.5, *, backend: str = "auto"):
        super().__init__()
        self.max_batch_size, self.tau, self.norm_tol = max_batch_size, tau, norm_tol
        self.filter_threshold, self.filter_factor, self.backend = filter_threshold, filter_factor, backend

    def _scoring(self, temperature: float, normalize_scores: bool, use_smooth_max: bool,
                 pos_aware_negative_filtering: bool) -> None:
        """The scoring options every loss here takes (colpali's constructors repeat them); a smooth max is refused."""
        self.temperature, self.normalize_scores = temperature, normalize_scores
        self.use_smooth_max, self.pos_aware_negative_filtering = use_smooth_max, pos_aware_negative_filtering
        self._refuse_smooth_max()

    def _refuse_smooth_max(self) -> None:
        if self.use_smooth_max:
            raise UnsupportedFeatureError(
                f"{type(self).__name__}(use_smooth_max=True): a log-sum-exp over the document tokens is not a MaxSim; "
                "fastcl's late-interaction op computes the hard max only")

    @staticmethod
    def _lengths(query_embeddings: Tensor) -> Tensor:
        return (query_embeddings[:, :, 0] != 0).sum(dim=1)

    @staticmethod
    def _normalized(scores: Tensor, lengths: Tensor) -> Tensor:
        return scores / lengths.unsqueeze(1) if scores.dim() == 2 else scores / lengths

    def _filtered(self, scores: Tensor, pos_idx: Tensor) -> Tensor:
        """A negative above ``filter_threshold`` times its row's positive, times ``filter_factor``
        (colpali multiplies in place; the same values and gradient)."""
        rows = torch.arange(scores.shape[0], device=scores.device)
        high = scores > self.filter_threshold * scores[rows, pos_idx].unsqueeze(1)
        high[rows, pos_idx] = False
        return torch.where(high, scores * self.filter_factor, scores)

    def _in_batch(self, query_embeddings: Tensor, doc_embeddings: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        """colpali's in-batch scores, normalised and filtered as configured, and the positives' columns."""
        self._refuse_smooth_max()
        scores = in_batch_scores(query_embeddings, doc_embeddings, self.backend)
        if self.normalize_scores:
            scores = self._normalized(scores, self._lengths(query_embeddings))
        pos_idx = torch.arange(scores.shape[0], device=scores.device) + offset
        if self.pos_aware_negative_filtering:
            scores = self._filtered(scores, pos_idx)
        return scores, pos_idx


class ColbertLoss(ColbertModule):
    """InfoNCE over the in-batch MaxSim scores: ``CE(s / temperature, arange(B) + offset)``."""

    def __init__(self, temperature: float = 0.02, normalize_scores: bool = True, use_smooth_max: bool = False,
                 pos_aware_negative_filtering: bool = False, max_batch_size: int = 1024, tau: float = 0.1,
                 norm_tol: float = 1e-3, filter_threshold: float = 0.95, filter_factor: float = 0.5, *,
                 backend: str = "auto"):
        super().__init__(max_batch_size, tau, norm_tol, filter_threshold, filter_factor, backend=backend)
        self._scoring(temperature, normalize_scores, use_smooth_max, pos_aware_negative_filtering)

    def forward(self, query_embeddings: Tensor, doc_embeddings: Tensor, offset: int = 0) -> Tensor:
        scores, pos_idx = self._in_batch(query_embeddings, doc_embeddings, offset)
        return F.cross_entropy(scores / self.temperature, pos_idx).to(query_embeddings.dtype)


class ColbertNegativeCELoss(ColbertModule):
    """``softplus((s(q_b, neg_bl) - s(q_b, d_{offset+b})) / temperature)`` averaged over ``b, l``,
    mixed with ``ColbertLoss`` by ``in_batch_term_weight``."""

    def __init__(self, temperature: float = 0.02, normalize_scores: bool = True, use_smooth_max: bool = False,
                 pos_aware_negative_filtering: bool = False, in_batch_term_weight: float = 0.5,
                 max_batch_size: int = 1024, tau: float = 0.1, norm_tol: float = 1e-3, filter_threshold: float = 0.95,
                 filter_factor: float = 0.5, *, backend: str = "auto"):
        super().__init__(max_batch_size, tau, norm_tol, filter_threshold, filter_factor, backend=backend)
        self._scoring(temperature, normalize_scores, use_smooth_max, pos_aware_negative_filtering)
        _check_weight(in_batch_term_weight)
        self.in_batch_term_weight = in_batch_term_weight
        self.inner_loss = ColbertLoss(temperature, normalize_scores, use_smooth_max, pos_aware_negative_filtering,
                                      max_batch_size, tau, norm_tol, filter_threshold, filter_factor, backend=backend)

    def forward(self, query_embeddings: Tensor, doc_embeddings: Tensor, neg_doc_embeddings: Tensor,
                offset: int = 0) -> Tensor:
        loss = _explicit_negatives(self, query_embeddings, doc_embeddings, neg_doc_embeddings, offset,
                                   "bnd,blsd->blns")
        if self.in_batch_term_weight > 0:
            loss_ib = self.inner_loss(query_embeddings, doc_embeddings, offset)
            loss = loss * (1 - self.in_batch_term_weight) + loss_ib * self.in_batch_term_weight
        return loss


class ColbertPairwiseCELoss(ColbertModule):
    """``softplus((hardest negative - positive) / temperature)``, the mean over queries; the hardest
    negative is the row's top score unless that equals the positive, then the second (colpali's rule)."""

    def __init__(self, temperature: float = 1.0, normalize_scores: bool = True, use_smooth_max: bool = False,
                 pos_aware_negative_filtering: bool = False, max_batch_size: int = 1024, tau: float = 0.1,
                 norm_tol: float = 1e-3, filter_threshold: float = 0.95, filter_factor: float = 0.5, *,
                 backend: str = "auto"):
        super().__init__(max_batch_size, tau, norm_tol, filter_threshold, filter_factor, backend=backend)
        self._scoring(temperature, normalize_scores, use_smooth_max, pos_aware_negative_filtering)

    def forward(self, query_embeddings: Tensor, doc_embeddings: Tensor, offset: int = 0) -> Tensor:
        scores, _ = self._in_batch(query_embeddings, doc_embeddings, offset)
        pos_scores = scores.diagonal(offset=offset)
        top2 = scores.topk(2, dim=1).values
        neg_scores = torch.where(top2[:, 0] == pos_scores, top2[:, 1], top2[:, 0])
        return F.softplus((neg_scores - pos_scores) / self.temperature).mean().to(query_embeddings.dtype)


class ColbertPairwiseNegativeCELoss(ColbertModule):
    """``ColbertNegativeCELoss``'s explicit-negative term, mixed with ``ColbertPairwiseCELoss``."""

    def __init__(self, temperature: float = 0.02, normalize_scores: bool = True, use_smooth_max: bool = False,
                 pos_aware_negative_filtering: bool = False, in_batch_term_weight: float = 0.5,
                 max_batch_size: int = 1024, tau: float = 0.1, norm_tol: float = 1e-3, filter_threshold: float = 0.95,
                 filter_factor: float = 0.5, *, backend: str = "auto"):
        super().__init__(max_batch_size, tau, norm_tol, filter_threshold, filter_factor, backend=backend)
        self._scoring(temperature, normalize_scores, use_smooth_max, pos_aware_negative_filtering)
        _check_weight(in_batch_term_weight)
        self.in_batch_term_weight = in_batch_term_weight
        self.inner_pairwise = ColbertPairwiseCELoss(temperature, normalize_scores, use_smooth_max,
                                                    pos_aware_negative_filtering, max_batch_size, tau, norm_tol,
                                                    filter_threshold, filter_factor, backend=backend)

    def forward(self, query_embeddings: Tensor, doc_embeddings: Tensor, neg_doc_embeddings: Tensor,
                offset: int = 0) -> Tensor:
        loss = _explicit_negatives(self, query_embeddings, doc_embeddings, neg_doc_embeddings, offset,
                                   "bnd,bsld->bsnl")
        if self.in_batch_term_weight > 0:
            loss_ib = self.inner_pairwise(query_embeddings, doc_embeddings, offset)
            loss = loss * (1 - self.in_batch_term_weight) + loss_ib * self.in_batch_term_weight
        return loss


class ColbertSigmoidLoss(ColbertModule):
    """colpali's sigmoid loss on the flattened in-batch scores: ``mean softplus(-+s / temperature)``,
    ``+`` at the flat indices ``pos_idx * (B + 1)``, as colpali marks the positives."""

    def __init__(self, temperature: float = 0.02, normalize_scores: bool = True, use_smooth_max: bool = False,
                 pos_aware_negative_filtering: bool = False, max_batch_size: int = 1024, tau: float = 0.1,
                 norm_tol: float = 1e-3, filter_threshold: float = 0.95, filter_factor: float = 0.5, *,
                 backend: str = "auto"):
        super().__init__(max_batch_size, tau, norm_tol, filter_threshold, filter_factor, backend=backend)
        self._scoring(temperature, normalize_scores, use_smooth_max, pos_aware_negative_filtering)

    def forward(self, query_embeddings: Tensor, doc_embeddings: Tensor, offset: int = 0) -> Tensor:
        scores, pos_idx = self._in_batch(query_embeddings, doc_embeddings, offset)
        b = scores.shape[0]
        sign = -torch.ones(scores.numel(), dtype=scores.dtype, device=scores.device)
        sign[pos_idx * (b + 1)] = 1.0
        flat = scores.reshape(-1) / self.temperature
        return F.softplus(-flat * sign).mean().to(query_embeddings.dtype)


def _check_weight(weight: float) -> None:
    if not 0 <= weight <= 1:  # colpali asserts the same
        raise ValueError(f"in_batch_term_weight must be in [0, 1], got {weight}")


def _explicit_negatives(loss: ColbertModule, query_embeddings: Tensor, doc_embeddings: Tensor,
                        neg_doc_embeddings: Tensor, offset: int, neg_pattern: str) -> Tensor:
    """``mean softplus((s(q_b, neg_bl) - s(q_b, d_{offset+b})) / temperature)`` (colpali slices the
    positives by the negatives' rows in one loss and by the queries' in the other: equal here)."""
    if neg_doc_embeddings.dim() != 4:
        raise ValueError("neg_doc_embeddings must be [B, negatives, tokens, D], got "
                         f"{tuple(neg_doc_embeddings.shape)}")
    b = query_embeddings.shape[0]
    positives = doc_embeddings[offset:offset + b]
    pos_scores = _pair_scores(query_embeddings, positives, "bnd,bsd->bns")
    neg_scores = _pair_scores(query_embeddings, neg_doc_embeddings, neg_pattern)
    if loss.normalize_scores:
        lengths = loss._lengths(query_embeddings)
        pos_scores, neg_scores = loss._normalized(pos_scores, lengths), loss._normalized(neg_scores, lengths)
    return F.softplus((neg_scores - pos_scores.unsqueeze(1)) / loss.temperature).mean()
