"""The ``triton`` backend: the engine's kernels in Triton (``fastcl/triton/``), default on CUDA.

Tiles of S are formed in registers with ``tl.dot``: once in the forward (row and column statistics
together), once in the backward, where each tile's gradient G goes to a bounded workspace and two
Triton GEMMs add ``G @ y`` and ``G.T @ x`` into the gradients: the floor of four x @ y.T products
(three for SigLIP/MW) at any D. The workspace is ``FASTCL_WORKSPACE_MB`` (default 256 MiB) beyond
O((M + N) * D); ``fastcl/triton/plan.py`` states the formula, ``fastcl/triton/DESIGN.md`` why.

16-bit inputs reach the kernels as they are (fp32 accumulation, no upcast copy), statistics and
gradients are float32 (float64 for float64 inputs). Every output element is owned by one program
and blocks run in a fixed order: no atomics, deterministic results. On CPU tensors it runs only
under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), which is how the
tests check it without a GPU. Importing this module imports Triton; ``fastcl.backend`` imports it on
first use only.
"""
from __future__ import annotations

import torch

from ..triton import KERNELS
from .primitives import Engine

ENGINE = Engine("triton", KERNELS, native_dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16))
