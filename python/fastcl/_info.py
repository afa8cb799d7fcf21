"""What this installation of fastcl contains and what ``backend="auto"`` picks."""
from __future__ import annotations

import platform
import sys

import torch

from . import backend as _backends

__version__ = "0.1.0"

from ._ext import _C
from ._ext import ERROR as _C_ERROR


def backends(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             op: str | None = None) -> list[str]:
    """Names of the backends that can run on ``device`` (and ``dtype``) in this installation; with
    ``op`` (``"lse"``, ``"pointwise"``, ``"maxsim"``, ``"topk"``), those that also provide it."""
    return _backends.available(device, dtype, op)


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def info() -> dict:
    """Versions, the compiled extension's features, what each backend declares, and per device the
    usable backends and the one ``"auto"`` picks."""
    return {
        "fastcl": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "extension": _C.build_info() if _C is not None else {"error": _C_ERROR},
        "declared": _backends.registry.describe(),
        "devices": {
            d: {"backends": backends(d), "auto": _backends.auto_choice(d)} for d in _devices()
        },
    }


def main() -> None:
    """``python -m fastcl.info``: print ``info()`` readably."""
    def show(d: dict, indent: int = 0) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                print(" " * indent + f"{k}:")
                show(v, indent + 2)
            else:
                print(" " * indent + f"{k}: {v}")

    show(info())
