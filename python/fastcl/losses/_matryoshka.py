"""Matryoshka (nested embedding sizes): a loss at each prefix ``[:, :d_k]`` of the features, weighted
and summed. Each prefix is a full loss of its own (normalised by its own norm under
``normalize=True``: truncate, then normalise), so every backend and plan computes it exactly, at the
GEMM work of ``sum_k d_k / D`` losses. One pass over D for all K (a prefix dot product is a partial
sum of the full one) is the fused engine's open work (issue "One sweep, many losses")."""
from __future__ import annotations

from collections.abc import Callable

import torch


def over_prefixes(prefixes: list[tuple[int, float]], loss: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """``sum_k w_k * loss(d_k)`` over the checked ``prefixes`` [(d_k, w_k)]."""
    total = None
    for d, w in prefixes:
        term = loss(d) if w == 1.0 else w * loss(d)
        total = term if total is None else total + term
    return total
