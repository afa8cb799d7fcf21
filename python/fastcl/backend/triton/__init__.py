"""Triton kernels of the engine (see ``fastcl/backend/primitives.py`` for the contract): the masked
row / column log-sum-exp and its backward (``lse.py``), the pointwise SigLIP / MW losses with their
gradients (``pointwise.py``), and the gradient GEMMs both share (``gemm.py``); tiles of S live in
registers only. ``plan.py`` says how a problem is cut (blocks, tiles, workspace); DESIGN.md why.

Importing ``fastcl.triton.plan`` needs no Triton; the kernels (``KERNELS``, imported on first use)
do. On CPU tensors they run under Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` before Triton is imported (that is how the tests run them without a GPU).
"""
from __future__ import annotations


class Kernels:
    """The engine's three kernels (``primitives.Kernels``)."""

    def __init__(self):
        from .lse import lse_backward, lse_forward
        from .pointwise import pointwise

        self.lse_forward, self.lse_backward, self.pointwise = lse_forward, lse_backward, pointwise


def __getattr__(name: str):
    if name == "KERNELS":
        kernels = globals()["KERNELS"] = Kernels()
        return kernels
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
