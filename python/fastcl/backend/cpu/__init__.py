"""The ``cpu`` backend: fused C++ kernels from ``fastcl._C`` (``csrc/cpu/``), registered as
``torch.ops.fastcl.*`` when the extension is imported.

Each tile of S is computed by a GEMM into a thread-local buffer and reduced (online log-sum-exp,
pointwise losses, G) while it is in cache; tiles are scheduled so that results are bitwise
deterministic for any thread count (see ``csrc/cpu/grid.h``).
"""
from __future__ import annotations

import torch

from .. import _ext  # noqa: F401  (loads fastcl._C, which registers torch.ops.fastcl)
from .primitives import Engine

ENGINE = Engine("cpu", torch.ops.fastcl, symmetric=True)
