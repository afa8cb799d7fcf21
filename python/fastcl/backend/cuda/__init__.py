"""The ``cuda`` backend: hand-written CUDA kernels (``kernels/``, torch-free device code; host glue in
``csrc/cuda/ops_cuda.cpp``) registered for the ``torch.ops.fastcl`` schemas under the CUDA key when
``fastcl._C`` is built with ``FASTCL_CUDA_ARCHS`` (e.g. ``"80;90a"``).

The same shape as the triton engine (``kernels/DESIGN.md``): S in blocks bounded by
``FASTCL_WORKSPACE_MB``; 64 x 64 tiles of S on tensor cores (3xTF32 for float32, about fp32
accuracy; fp16/bf16 on 16-bit MMAs with fp32 accumulation), each formed once in the forward (row
and column statistics together) and once in the backward, where the gradient tile G goes into the
block's buffer (float16 scaled by a power of two) and ATen GEMMs (cuBLAS) add ``G @ y`` and
``G.T @ x``: 4 GEMM-equivalents for CLIP, 3 for SigLIP/MW. Statistics, gradients and losses are
float32; 16-bit inputs reach the kernels as they are (rows not whole 16-byte chunks are padded
once). float64 is not supported. Partials are merged in a fixed order and blocks run in order:
results are deterministic. No symmetric kernels: ``lse(z, z)`` visits every tile.
``cuda_plan.py`` holds the launch parameters the performance model reads.
"""
from __future__ import annotations

import torch

from .. import _ext  # noqa: F401  (loads fastcl._C, which registers torch.ops.fastcl)
from .primitives import Engine

ENGINE = Engine("cuda", torch.ops.fastcl, native_dtypes=(torch.float32, torch.float16, torch.bfloat16))
