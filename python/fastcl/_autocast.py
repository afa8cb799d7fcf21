"""The dtype a drop-in's peer returns under ``torch.autocast``, and fastcl's math run beside it.

``fastcl.nn``'s and ``fastcl.metric_learning``'s drop-ins follow their peers' loss dtype under
autocast (a logged loss of another dtype reads as a different loss): each drop-in states its peer's
result per device type (``AUTOCAST_RESULT``), read from the op lists of ``torch.amp``'s docs and the
peer's source, since which ops autocast to float32 differs between CPU and CUDA. fastcl's math runs
with autocast off (it accumulates in float32 anyway) and the loss is cast once from it.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .losses._common import result_dtype


def autocast_result(features: Tensor, rules: dict[str, str]) -> torch.dtype | None:
    """The dtype of a peer's loss under ``torch.autocast``, by ``rules[device type]`` (read from the
    op lists of ``torch.amp``'s docs), or ``None`` (the features' dtype):
    ``"float32"``: its last op autocasts to float32 (``F.cross_entropy``; on CUDA also ``sum``, ``softmax``);
    ``"autocast"``: it stays in the autocast dtype (``matmul``/``einsum``, then ``logsumexp``, ``mean``);
    ``"promoted"``: the autocast dtype promoted with the features' (a tensor of their dtype meets it)."""
    kind = features.device.type
    if features.dtype == torch.float64 or kind not in rules or not torch.is_autocast_enabled(kind):
        return None
    low = torch.get_autocast_dtype(kind)
    kinds = {"float32": torch.float32, "autocast": low, "promoted": torch.promote_types(features.dtype, low)}
    return kinds[rules[kind]]


@contextlib.contextmanager
def as_peer_under_autocast(module: nn.Module, features: Tensor):
    """fastcl's math with autocast off for the features' device, its loss cast to the dtype the peer
    returns there (``module.AUTOCAST_RESULT``); outside autocast, nothing changes."""
    kind = features.device.type
    if not torch.is_autocast_enabled(kind):
        yield
        return
    dtype = autocast_result(features, module.AUTOCAST_RESULT)  # read before autocast is turned off
    with torch.autocast(kind, enabled=False), result_dtype(dtype):
        yield
