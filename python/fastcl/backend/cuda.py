"""The ``cuda`` backend: hand-written CUDA kernels (``kernels/``, torch-free device code; host glue in
``csrc/cuda/ops_cuda.cpp``) registered for the ``torch.ops.fastcl`` schemas under the CUDA key when
``fastcl._C`` is built with ``FASTCL_CUDA_ARCHS`` (e.g. ``"80;90a"``).

Each CTA owns 64 rows and recomputes 64 x 64 tiles of S with tensor cores (3xTF32 for float32,
about fp32 accuracy; fp16/bf16 inputs on 16-bit MMAs with fp32 accumulation); statistics,
gradients and losses are float32, and 16-bit inputs reach the kernels as they are (no upcast
copy). float64 is not supported. Partials are merged in a fixed order:
results are deterministic. No symmetric kernels: ``lse(z, z)`` visits every tile.
"""
from __future__ import annotations

import torch

from .. import _ext  # noqa: F401  (loads fastcl._C, which registers torch.ops.fastcl)
from .primitives import Engine

ENGINE = Engine("cuda", torch.ops.fastcl, native_dtypes=(torch.float32, torch.float16, torch.bfloat16))
