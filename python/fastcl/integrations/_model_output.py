"""The model of a sentence-transformers-style loss as ``fastcl.cached_loss`` calls an encoder."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ModelOutput(nn.Module):
    """``enc(**features) -> model(features)[key]``, L2-normalised along the last dim if asked.

    A module rather than a closure, so that ``cached_loss`` sees the model's parameters (a frozen
    model needs no second pass) and buffers (it puts back what the first pass changed, and keeps
    the first chunk's graph only where it can see that nothing changed)."""

    def __init__(self, model: nn.Module, key: str, normalize: bool = False):
        super().__init__()
        self.model, self.key, self.normalize = model, key, normalize

    def forward(self, **features: Tensor) -> Tensor:
        out = self.model(features)[self.key]
        return F.normalize(out, p=2, dim=-1) if self.normalize else out
