"""Late interaction (ColBERT, ColPali, CLaMR): InfoNCE over MaxSim scores, without the
``[B, N, Lq, Ld]`` token-similarity tensor.

The loss is two steps, kept apart so that a distributed plan can replace the first:
1. scores over all documents, ``s [B, N']`` (``N' = N + K`` with extra documents; ``_scores``): the
   only part that touches tokens, tiled by the engine (``backend/maxsim.py``) or materialised by
   ``reference_scores`` below;
2. the InfoNCE on that small matrix, plain torch (``_infonce``): ``O(B * N')``.
"""
from __future__ import annotations

import torch

from .. import _checks as check
from .. import backend as dispatch
from ..backend.maxsim import maxsim_scores
from ._common import finish, maybe_normalize, upcast
from ._plan import LOCAL

_TOKENS = "[rows, tokens, D]"  # q, d and extra_docs


def maxsim_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    temperature: float | torch.Tensor = 0.02,
    *,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    extra_docs: torch.Tensor | None = None,
    extra_docs_mask: torch.Tensor | None = None,
    normalize_scores: bool = False,
    symmetric: bool = False,
    reduction: str = "mean",
    normalize: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Late-interaction InfoNCE (ColBERT / ColPali / CLaMR MaxSim), never holding the token similarities.

    Queries ``q [B, Lq, D]``, documents ``d [N, Ld, D]``, boolean token masks ``q_mask [B, Lq]``,
    ``d_mask [N, Ld]`` (``True`` = a real token; ``None`` = all real). The MaxSim score of query
    ``i`` against document ``j``:

    ``s_ij = sum_{a : q_mask_ia} max_{t : d_mask_jt} <q_ia, d_jt>``

    - padding never wins a max; a masked query token contributes nothing (and gets zero gradient);
    - ties in the max go to the lowest document-token index ``t``, which alone receives the
      gradient of that term (on every backend);
    - a document with no real token scores ``-inf`` (never chosen by the softmax, no gradient);
    - ``normalize_scores``: ``s_ij / n_i`` with ``n_i`` the number of real tokens of query ``i``
      (``max(n_i, 1)``: a query of padding only scores 0 against everything);
    - ``extra_docs [K, Ld, D]`` (hard negatives, mask ``extra_docs_mask [K, Ld]``) join the columns:
      ``N' = N + K``; they receive a gradient only if they require one.

    With ``S_ij = s_ij / temperature`` and target ``t(i) = labels[i]`` (in ``[0, N)``) or ``i``:

    ``r_i = lse_{j < N'} S_ij - S_{i,t(i)}``

    and, with ``symmetric=True`` (needs ``B == N``, no labels, no extra documents), the document
    direction ``c_j = lse_i S_ij - S_jj`` as well: per row ``(r_i + c_i) / 2``. ``reduction``:
    ``"mean"`` of the per-row terms, ``"sum"``, or ``"none"`` (``[B]``).

    Args:
        temperature: positive number, or a one-element floating tensor (learned: its gradient is
            returned; not range-checked, see ``infonce_loss``).
        normalize: L2-normalise every token (queries, documents, extra documents) first, as ColBERT
            does; autograd flows through the normalisation.
        backend: ``"auto"``, ``"reference"`` (materialises ``[B, N', Lq, Ld]``: the readable math), or
            another backend that declares the ``maxsim`` op (``fastcl.backends(device, op="maxsim")``).

    Extra memory on every backend but ``reference``: ``O((B * Lq + N' * Ld) * D + B * N')`` plus a
    tile. Gradients are deterministic (the scatter-add into ``d`` runs in a fixed order).
    """
    return _maxsim(LOCAL, q, d, temperature, q_mask=q_mask, d_mask=d_mask, labels=labels, extra_docs=extra_docs,
                   extra_docs_mask=extra_docs_mask, normalize_scores=normalize_scores, symmetric=symmetric,
                   reduction=reduction, normalize=normalize, backend=backend)


def _maxsim(world, q, d, temperature, *, q_mask, d_mask, labels, extra_docs, extra_docs_mask, normalize_scores,
            symmetric, reduction, normalize, backend):
    """The loss in ``world`` (``fastcl.losses._plan``). Over a process group (``fastcl.distributed``)
    the documents travel and the queries stay: each rank's ``d`` (then its ``extra_docs``) are columns
    for every rank's queries, ``labels`` are global indices into every rank's ``d`` in rank order, and
    with ``symmetric`` the document direction of this rank's documents meets every rank's queries."""
    def validate():
        tensors, names = [q, d], ["q", "d"]
        check.features("q", q, rank=3, layout=_TOKENS)
        check.features("d", d, rank=3, layout=_TOKENS)
        if extra_docs is not None:
            check.features("extra_docs", extra_docs, rank=3, layout=_TOKENS)
            tensors.append(extra_docs)
            names.append("extra_docs")
        check.same_kind(names, tensors)
        if extra_docs is not None and extra_docs.shape[1] != d.shape[1]:
            raise ValueError(f"extra_docs has {extra_docs.shape[1]} tokens per document but d has {d.shape[1]}; "
                             "pad them to one length Ld (and mask the padding)")
        b, n = q.shape[0], d.shape[0]
        masks = (_token_mask("q_mask", q_mask, q), _token_mask("d_mask", d_mask, d))
        if extra_docs_mask is not None and extra_docs is None:
            raise ValueError("extra_docs_mask was given without extra_docs")
        masks += (None if extra_docs is None else _token_mask("extra_docs_mask", extra_docs_mask, extra_docs),)
        if symmetric and (labels is not None or extra_docs is not None):
            raise ValueError("symmetric=True supports neither labels nor extra_docs (the document direction has no "
                             "targets for them); pass symmetric=False")
        if labels is None:
            if b != n:
                raise ValueError(f"q has {b} queries but d has {n} documents: without labels query i targets "
                                 f"document i, so they must match (or pass labels=[{b}] target documents)")
            targets = None
        else:
            targets = check.labels("labels", labels, length=b, high=n * world.size, device=q.device)
        name = dispatch.resolve(backend, q, op="maxsim")
        return (check.reduction(reduction), targets, check.temperature_scale("temperature", temperature, q), name,
                world.engine(name, q), masks)

    reduction, targets, scale, name, engine, (q_mask, d_mask, x_mask) = world.checked(
        validate, q, q=q, d=d, extra_docs=extra_docs, q_mask=q_mask, d_mask=d_mask, extra_docs_mask=extra_docs_mask,
        labels=labels)
    plan = world.plan(engine)
    q0, d0, x0 = q, d, extra_docs
    q, d = maybe_normalize(q, normalize), maybe_normalize(d, normalize)
    docs, docs_mask = d, d_mask
    if extra_docs is not None:
        docs = torch.cat([d, maybe_normalize(extra_docs, normalize)])
        if d_mask is not None or x_mask is not None:
            docs_mask = torch.cat([_all_real(d_mask, d), _all_real(x_mask, extra_docs)])

    s = _scores(plan, name, q, docs, q_mask, docs_mask, normalize_scores)  # 1. [B, W N'] over all documents
    per_row = _infonce(plan, s * scale, targets, d.shape[0], docs.shape[0], symmetric)  # 2. the InfoNCE on them
    tensors = [t for t in (q0, d0, x0) if t is not None]
    return finish(plan.reduce(per_row, reduction), q0.dtype, *tensors, scale)


def _scores(plan, backend: str, q, docs, q_mask, docs_mask, normalize_scores: bool) -> torch.Tensor:
    """``s [B, W N']`` of every query against every rank's documents, in the math dtype: the only
    step that touches tokens (tiled on the engine backends; the documents travel, the queries stay)."""
    if backend == "reference":
        s = reference_scores(q, docs, q_mask, docs_mask)
    else:
        def block(rows, columns, *mask):  # one rank's documents (and their mask, which travels with them)
            return maxsim_scores(backend, rows, columns, q_mask, mask[0] if mask else None)

        mask = () if docs_mask is None else (docs_mask,)
        s = plan.columns(block, q, docs, *mask)
    return s / _query_lengths(q_mask, q.shape[1], s) if normalize_scores else s


def reference_scores(q, d, q_mask=None, d_mask=None) -> torch.Tensor:
    """The definition on the materialised token similarities ``[B, N, Lq, Ld]`` (math dtype)."""
    sim = torch.einsum("iad,jtd->ijat", upcast(q), upcast(d))
    if d_mask is not None:
        sim = sim.masked_fill(~d_mask[None, :, None, :], float("-inf"))
    winner = sim.argmax(-1, keepdim=True)  # the first maximal token: the tie rule
    best = sim.gather(-1, winner).squeeze(-1)  # [B, N, Lq]; its gradient goes to the winner only
    if q_mask is not None:
        best = torch.where(q_mask[:, None, :], best, 0.0)
    return best.sum(-1)


def _infonce(plan, logits: torch.Tensor, targets: torch.Tensor | None, n: int, width: int,
             symmetric: bool) -> torch.Tensor:
    """Per query ``lse_j S_ij - S_{i,t(i)}`` over every rank's ``width = N + K`` columns; targets are
    global document indices (rank ``o``'s document ``j`` is ``o N + j``, column ``o width + j``)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    own = plan.rank * width + rows  # our query i's document: ours, i
    target = own if targets is None else targets // n * width + targets % n
    r = logits.logsumexp(1) - logits[rows, target]
    if not symmetric:
        return r
    # the document direction of our documents meets every rank's queries: the scores are small
    # ([W B, W N]), so they are gathered rather than recomputed
    every = plan.gather(logits)[:, plan.rank * width:(plan.rank + 1) * width]
    c = every.logsumexp(0) - logits[rows, own]
    return (r + c) / 2


def _query_lengths(q_mask, lq: int, like: torch.Tensor) -> torch.Tensor:
    if q_mask is None:
        return torch.tensor(float(lq), dtype=like.dtype, device=like.device)
    return q_mask.sum(1, keepdim=True).clamp_(min=1).to(like.dtype)


def _all_real(mask, tokens):
    return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None else mask


def _token_mask(name: str, mask: object, tokens: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a boolean torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a boolean tensor (True = a real token), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"{name} must have shape {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")
    if mask.device != tokens.device:
        raise ValueError(f"{name} is on {mask.device} but the tokens are on {tokens.device}")
    return mask
