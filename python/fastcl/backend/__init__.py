"""Which backend runs a call: declared capabilities, one dispatch, errors that list every reason.

Every backend but ``reference`` is an engine: the two primitives every loss is composed of
(``primitives.py``), over that backend's kernels (``chunked.py``, ``cpu.py``). ``reference`` is not an
engine: each loss module holds its own reference, the math written on the materialised ``S``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from ..triton import versions as _triton_versions

NAMES = ("reference", "chunked", "cpu", "triton", "cuda")

# What "auto" tries, fastest first, per device type. Anything torch runs on falls back to chunked.
AUTO_ORDER = {
    "cpu": ("cpu", "chunked"),
    "cuda": ("triton", "cuda", "chunked"),
}

_ENGINES = {"chunked": "fastcl.backend.chunked", "cpu": "fastcl.backend.cpu", "triton": "fastcl.backend.triton",
            "cuda": "fastcl.backend.cuda"}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs here; ``reasons`` lists why."""

    def __init__(self, message: str, reasons: list[str] = ()):
        super().__init__(message)
        self.reasons = list(reasons)


def not_supported_reasons(name: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why backend ``name`` cannot run on ``device`` with ``dtype`` (empty: it can)."""
    if name in ("reference", "chunked"):
        return []
    if name == "cpu":
        return _cpu_reasons(device)
    if name == "triton":
        return _triton_reasons(device, dtype)
    if name == "cuda":
        reasons = [] if device.type == "cuda" else [f"runs on CUDA tensors only, got {device.type}"]
        if dtype == torch.float64:
            reasons.append("the CUDA kernels take float32, float16 and bfloat16, not float64")
        return reasons + _CUDA_BUILD_REASONS
    raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + NAMES}")


def _cpu_build_reasons() -> list[str]:
    """Why the compiled CPU kernels cannot run on this machine at all; computed once at import,
    so that dispatch inside torch.compile never calls into C extensions."""
    from .. import _ext

    if _ext._C is None:
        return [f"the compiled extension fastcl._C did not load ({_ext.ERROR})"]
    built_for = _ext._C.build_info()["cpu_capability"]
    if built_for == "AVX2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return ["fastcl._C's CPU kernels were compiled for AVX2, which this CPU lacks"]
    return []


def _cuda_build_reasons() -> list[str]:
    from .. import _ext

    if _ext._C is None:
        return [f"the compiled extension fastcl._C did not load ({_ext.ERROR})"]
    if not _ext._C.build_info()["cuda_archs"]:
        return ["fastcl._C was built without CUDA kernels (rebuild with FASTCL_CUDA_ARCHS, e.g. \"80;90a\", "
                "against a CUDA build of torch)"]
    return []


_CPU_BUILD_REASONS = _cpu_build_reasons()
_CUDA_BUILD_REASONS = _cuda_build_reasons()


# Whether Triton is installed, found without importing it (slow, and not needed unless the backend
# runs), and whether its interpreter is on; both read once, so dispatch inside torch.compile reads
# constants. TRITON_INTERPRET must be set before Triton (and so fastcl) is imported anyway: Triton
# decides between compiling and interpreting when the kernels are decorated.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
_TRITON_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# A Triton outside the supported range, and what the installed one cannot do per dtype, compiled
# for a GPU or interpreted (fastcl/triton/versions.py), read from its metadata.
_TRITON_VERSION_REASONS = _triton_versions.problems() if _TRITON_INSTALLED else []
_TRITON_LIMITS = {(dtype, compiled): _triton_versions.triton_limits("engine", dtype, compiled=compiled)
                  for dtype in _TRITON_DTYPES for compiled in (False, True)} if _TRITON_INSTALLED else {}


def _triton_reasons(device: torch.device, dtype: torch.dtype) -> list[str]:
    reasons = [] if _TRITON_INSTALLED else ["Triton is not installed (pip install triton)"]
    reasons += _TRITON_VERSION_REASONS
    if device.type == "cpu" and not _TRITON_INTERPRET:
        reasons.append("the Triton kernels run on CPU tensors only under Triton's interpreter "
                       "(set TRITON_INTERPRET=1 before importing fastcl)")
    elif device.type not in ("cpu", "cuda"):
        reasons.append(f"the Triton kernels run on CUDA tensors only, got {device.type}")
    if dtype not in _TRITON_DTYPES:
        reasons.append(f"the Triton kernels take float32, float64, float16 and bfloat16, not {dtype}")
    limit = _TRITON_LIMITS.get((dtype, device.type == "cuda"))
    return reasons + ([limit] if limit else [])


def _cpu_reasons(device: torch.device) -> list[str]:
    reasons = [] if device.type == "cpu" else [f"runs on CPU tensors only, got {device.type}"]
    return reasons + _CPU_BUILD_REASONS


def available(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Names of the backends that can run on ``device`` with ``dtype`` here."""
    device = torch.device(device)
    return [n for n in NAMES if not not_supported_reasons(n, device, dtype)]


def auto_choice(device: str | torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend ``"auto"`` picks for this device and dtype."""
    device = torch.device(device)
    for name in AUTO_ORDER.get(device.type, ("chunked",)):
        if not not_supported_reasons(name, device, dtype):
            return name
    return "chunked"


def resolve(backend: str, like: torch.Tensor, *, op: str | None = None, extra=None) -> str:
    """Validate ``backend`` for tensors like ``like``; return the concrete backend name. An op whose
    kernels support less than the backend's engine (MaxSim, top-k) names itself in ``op`` and adds
    its own reasons with ``extra(name) -> list[str]``: ``"auto"`` skips those backends too."""
    def reasons(name: str) -> list[str]:
        return not_supported_reasons(name, like.device, like.dtype) + (extra(name) if extra else [])

    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        return next((n for n in AUTO_ORDER.get(like.device.type, ()) if not reasons(n)), "chunked")
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {backend!r}")
    why = reasons(backend)
    if why:
        raise BackendUnavailableError(
            f"backend={backend!r} cannot run {op + ' on ' if op else ''}{like.dtype} tensors on {like.device}: "
            + "; ".join(why) + f". Available here: {[n for n in NAMES if not reasons(n)]}", why
        )
    return backend


def engine(name: str):
    """The ``Engine`` (primitives) of a backend other than ``reference``; imported on first use."""
    from .primitives import _ENGINES as registered

    if name not in registered:
        importlib.import_module(_ENGINES[name])
    return registered[name]


# The always-present engines register now, so that dispatch inside torch.compile finds them
# without an import (triton stays lazy: importing it is slow and needs a GPU or the interpreter).
from . import chunked, cpu, cuda  # noqa: E402,F401
