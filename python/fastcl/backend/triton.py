"""The ``triton`` backend: the engine's kernels in Triton (``fastcl/triton/``), default on CUDA.

Tiles of S are recomputed in registers with ``tl.dot``; 16-bit inputs reach the kernels as they are
(fp32 accumulation, no upcast copy), statistics and gradients are float32 (float64 for float64
inputs). Every output row is owned by one program and partials are merged in a fixed order: no
atomics, deterministic results. On CPU tensors it runs only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported), which is how the tests check it without a GPU.
Importing this module imports Triton; ``fastcl.backend`` imports it on first use only.
"""
from __future__ import annotations

import torch

from ..triton import KERNELS
from .primitives import Engine

ENGINE = Engine("triton", KERNELS, native_dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16))
