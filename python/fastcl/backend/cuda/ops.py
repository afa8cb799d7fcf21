"""The ``cuda`` backend's kernels: ``fastcl._C``'s operators (schemas in ``csrc/ops.cpp``, CUDA
implementations in ``csrc/cuda/ops_cuda.cpp``, the prefix ops' in ``ops_cuda_prefixes.inc``, which it includes),
under the names of the ops' contracts (``registry.OPS``)."""
from __future__ import annotations

import torch

from ... import _ext  # noqa: F401  (loads fastcl._C, which registers torch.ops.fastcl)

_ops = torch.ops.fastcl
lse_forward, lse_backward = _ops.lse_forward, _ops.lse_backward
lse_forward_excluding, lse_backward_excluding = _ops.lse_forward_excluding, _ops.lse_backward_excluding
lse_forward_prefixes, lse_backward_prefixes = _ops.lse_forward_prefixes, _ops.lse_backward_prefixes
pointwise, pointwise_prefixes = _ops.pointwise, _ops.pointwise_prefixes
