"""The ``cpu`` backend's MaxSim kernels: C++ in ``csrc/cpu/maxsim.cpp`` (``torch.ops.fastcl.maxsim_*``),
OpenMP over tiles in the race-free schedule of ``csrc/cpu/grid.h``: bitwise deterministic."""
from __future__ import annotations

import torch

from .. import _ext  # noqa: F401  (loads fastcl._C, which registers torch.ops.fastcl)


def forward(q, d, q_mask, d_mask) -> torch.Tensor:
    return torch.ops.fastcl.maxsim_forward(q, d, q_mask, d_mask)


def backward(q, d, q_mask, d_mask, g, need_q: bool, need_d: bool):
    return torch.ops.fastcl.maxsim_backward(q, d, q_mask, d_mask, g, need_q, need_d)
