"""Triton kernels of the engine (see ``fastcl/backend/primitives.py`` for the contract): the masked
row / column log-sum-exp and its backward (``lse.py``), and the pointwise SigLIP / MW losses with
their gradients (``pointwise.py``), on tiles of S that live in registers only.

Importing this package imports Triton; ``fastcl`` does so only when the ``triton`` backend runs.
On CPU tensors the kernels run under Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` before Triton is imported (that is how the tests run them without a GPU).
"""
from __future__ import annotations

from .lse import lse_backward, lse_forward
from .pointwise import pointwise


class Kernels:
    """The engine's three kernels (``primitives.Kernels``)."""

    lse_forward = staticmethod(lse_forward)
    lse_backward = staticmethod(lse_backward)
    pointwise = staticmethod(pointwise)


KERNELS = Kernels()
