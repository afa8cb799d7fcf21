"""What the performance model's counts are made of, for every backend (``model.py``, ``model_cuda.py``):
a launch family's totals (``Kernel``), the matrix rate a dtype's tiles run at, and which primitive a
loss runs over what."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Kernel:
    """One launch family of the run: its totals over every launch."""
    name: str
    flops: float = 0.0
    exps: float = 0.0
    hbm_bytes: float = 0.0
    launches: int = 0
    matrix: str = "tc16"  # which matrix rate its dots run at
    # (engine, kernel, main-loop steps per tile[, prefixes per launch]) of benchmark/compiled.py; None: a library
    code: tuple | None = None
    def add(self, flops=0.0, exps=0.0, hbm_bytes=0.0, launches=1):
        self.flops += flops
        self.exps += exps
        self.hbm_bytes += hbm_bytes
        self.launches += launches


def _matrix_rate(dtype: torch.dtype) -> str:
    return {torch.float64: "fp64", torch.float32: "tf32x3", torch.float16: "tc16", torch.bfloat16: "tc16"}[dtype]


def _shape(loss: str, n: int) -> tuple[int, int, str, bool, bool]:
    """(M, columns, kind, rows, cols): which primitive a loss runs and over what."""
    if loss == "clip":
        return n, n, "lse", True, True
    if loss in ("infonce", "ntxent", "supcon"):
        return n, n, "lse", True, False
    return n, n, "pointwise", True, False
