"""Matryoshka (nested embedding sizes): a loss at each prefix ``[:, :d_k]`` of the features, weighted
and summed. Each prefix is a loss of its own, normalised by its own norm under ``normalize=True``
(truncate, then normalise).

Two ways to compute it, equal to float round-off:
- ``fused_clip``: CLIP / InfoNCE from one pass over the features (op ``lse_prefixes``): a prefix dot
  product is a partial sum of the full one, so the K similarity matrices come out of the GEMM work of
  one loss at ``d_K``; the per-prefix norms are per-row factors. Single process, without keys,
  positives or a guide, on a backend that declares the op.
- ``fused_siglip``: SigLIP likewise (op ``pointwise_prefixes``), single process, on a backend that
  declares the op.
- ``over_prefixes``: K full losses, at the GEMM work of ``sum_k d_k / D`` losses: everything else
  (the exclusions, a process group, the reference, the backends without the ops).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ._common import arange, upcast


def over_prefixes(prefixes: list[tuple[int, float]], loss: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """``sum_k w_k * loss(d_k)`` over the checked ``prefixes`` [(d_k, w_k)]."""
    total = None
    for d, w in prefixes:
        term = loss(d) if w == 1.0 else w * loss(d)
        total = term if total is None else total + term
    return total


def _prefix_sums(t: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """``[K, rows]``: ``sum_{f < d_k} t_if``, as one product with the ``[D, K]`` prefix indicator: its
    backward is one ``[rows, D]`` gradient whatever K (summing slices would allocate one per prefix)."""
    prefix = torch.arange(t.shape[1], device=t.device)[:, None] < torch.tensor(dims, device=t.device)[None, :]
    return (t @ prefix.to(t.dtype)).T


def _inverse_norms(t: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """``[K, rows]``: ``1 / max(||t_i[:d_k]||, 1e-12)``, the factor ``F.normalize`` divides by (the
    clamp before the root: a zero prefix gets a zero gradient, as there)."""
    return _prefix_sums(t * t, dims).clamp_min(1e-24).rsqrt()


def fused_clip(engine, x, cols, s, targets, *, bidirectional: bool, eps: float, normalize: bool,
               prefixes: list[tuple[int, float]], reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``sum_k w_k reduce(l^k)`` for CLIP's per-row losses ``l^k`` (``_clip``'s, label smoothing
    included) at each prefix of ``x [M, D]`` against ``cols [N', D]`` (y, then any extra negatives),
    from one ``lse_prefixes`` pass. ``targets``: column indices, or None for the diagonal."""
    dims = [d for d, _ in prefixes]
    xa, ca = upcast(x), upcast(cols)
    a = _inverse_norms(xa, dims) if normalize else None
    b = _inverse_norms(ca, dims) if normalize else None
    row_lse, col_lse = engine.lse_prefixes(x, cols, s, dims, a, b, cols=bidirectional)
    t = arange(x.shape[0], x) if targets is None else targets
    pair = _prefix_sums(xa * (ca[:x.shape[0]] if targets is None else ca[t]), dims)  # [K, M]: target logits / factors
    total = None
    for q, (d, w) in enumerate(prefixes):
        fa = s if a is None else s * a[q]  # S^q_ij = fa_i * fb_j * <x_i[:d], c_j[:d]>
        fb = None if b is None else b[q]
        logit = fa * pair[q] * (1 if fb is None else fb[t])
        r = row_lse[q] - (1 - eps) * logit
        if eps:  # the mean over the columns: <x_i[:d], sum_j fb_j c_j[:d]>, linear in S
            col_sum = ca[:, :d].sum(0) if fb is None else fb @ ca[:, :d]
            r = r - (eps / ca.shape[0]) * fa * (xa[:, :d] @ col_sum)
        if bidirectional:  # square, diagonal targets: column j's logit is row j's
            c = col_lse[q] - (1 - eps) * logit
            if eps:
                row_sum = xa[:, :d].sum(0) if a is None else a[q] @ xa[:, :d]
                c = c - (eps / xa.shape[0]) * s * (1 if fb is None else fb) * (ca[:, :d] @ row_sum)
            r = (r + c) / 2
        term = reduce(r) if w == 1.0 else w * reduce(r)
        total = term if total is None else total + term
    return total


def fused_siglip(engine, x, y, s, b, *, normalize: bool, prefixes: list[tuple[int, float]], reduce: bool):
    """``sum_k w_k`` SigLIP's per-row sums (``reduce``: their total) at each prefix of ``x [M, D]``
    against ``y [M, D]``, positives on the diagonal, from one ``pointwise_prefixes`` pass."""
    dims = [d for d, _ in prefixes]
    a = _inverse_norms(upcast(x), dims) if normalize else None
    c = _inverse_norms(upcast(y), dims) if normalize else None
    ids = arange(x.shape[0], x)
    return engine.pointwise_prefixes(x, y, s, b.expand(x.shape[0]), dims, a, c, keys=(ids, ids), kind="siglip",
                                     weights=[w for _, w in prefixes], reduce=reduce)
