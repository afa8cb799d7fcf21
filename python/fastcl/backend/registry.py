"""What each backend can do, declared once: dispatch, ``fastcl.backends()``, ``fastcl info``,
``fastcl doctor``, every "cannot run because" message and the tests' backend lists read it.

A backend declares the devices and dtypes it runs on and the ops it provides. An op is a contract:
the functions that the op's module provides (``OPS``; their signatures are in
``primitives/shared.py``'s ``Kernels``, ``maxsim.py`` and ``topk.py``):

    lse                masked row / column log-sum-exp of S and its backward  CLIP, InfoNCE, NT-Xent, ...
    lse_symmetric      the same for S = scale z @ z.T, half the tiles         optional: lse runs it otherwise
    lse_exclude        lse with each row's listed columns left out too        decoupled multiple positives
    lse_prefixes       lse at K nested feature prefixes in one pass over D    Matryoshka CLIP, InfoNCE
    pointwise          a sum of a pointwise loss of S and its gradients       SigLIP, MW
    pointwise_prefixes pointwise at K nested feature prefixes, one pass       Matryoshka SigLIP
    maxsim             late-interaction scores and their backward             maxsim_loss
    topk               the k largest S_ij of each row                         fastcl.topk

Op modules are imported when a call first runs on them (Triton's import is slow and needs a GPU or
its interpreter). What an installation lacks (no extension, no Triton) is read once, when the
declarations are made, so that dispatch inside ``torch.compile`` reads constants only.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .. import _cuda_driver, _ext
from .._checks import math_dtype
from .triton import versions as _triton_versions


class OpContract(NamedTuple):
    title: str                   # what messages call its kernels: "there is no CUDA top-k kernel"
    functions: tuple[str, ...]   # what the op's module provides


OPS = {
    "lse": OpContract("log-sum-exp", ("lse_forward", "lse_backward")),
    "lse_symmetric": OpContract("symmetric log-sum-exp", ("lse_forward_symmetric", "lse_backward_symmetric")),
    "lse_exclude": OpContract("log-sum-exp with listed pairs left out", ("lse_forward_excluding",
                                                                        "lse_backward_excluding")),
    "lse_prefixes": OpContract("log-sum-exp at nested prefixes", ("lse_forward_prefixes", "lse_backward_prefixes")),
    "pointwise": OpContract("pointwise-loss", ("pointwise",)),
    "pointwise_prefixes": OpContract("pointwise-loss at nested prefixes", ("pointwise_prefixes",)),
    "maxsim": OpContract("MaxSim", ("maxsim_forward", "maxsim_backward")),
    "topk": OpContract("top-k", ("topk",)),
}

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
WIDE = (torch.float32, torch.float64)  # what kernels that do not read 16-bit inputs take
_DEVICE_NAMES = {"cpu": "CPU", "cuda": "CUDA"}


@dataclass(frozen=True, eq=False)
class Op:
    """Where one op's kernels live and what they take beyond the backend's own declaration."""

    module: str | None  # imported on first use; None: each loss's definition on the materialised S
    native_dtypes: tuple[torch.dtype, ...] | None = None  # None: the backend's
    # The largest value of a call argument, with why: {"k": (256, "it holds each row's k best in registers")}
    limits: Mapping[str, tuple[int, str]] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class BackendSpec:
    name: str
    label: str  # what messages call its kernels: "the CUDA kernels take ..."
    devices: tuple[str, ...] | None  # device types it runs on; None: any device torch runs on
    dtypes: tuple[torch.dtype, ...]  # input dtypes it accepts
    native_dtypes: tuple[torch.dtype, ...]  # inputs its kernels take as they are; others are upcast to float32
    ops: Mapping[str, Op]
    priority: int | None = None  # "auto" takes the usable backend of highest priority; None: never
    auto_devices: tuple[str, ...] | None = None  # device types "auto" may take it on; None: all it runs on
    unusable: tuple[str, ...] = ()  # why it cannot run here at all (installation facts, read at declaration)
    # (op or None, device type, dtype) -> further reasons; reads constants only (it runs in torch.compile)
    reasons: Callable[[str | None, str, torch.dtype], list[str]] | None = None
    summary: str = ""


# --- installation facts, read once ------------------------------------------------------------------

def _extension_problems(cuda: bool) -> tuple[str, ...]:
    if _ext._C is None:
        return (f"the compiled extension fastcl._C did not load ({_ext.ERROR})",)
    info = _ext._C.build_info()
    if cuda and not info["cuda_archs"]:
        return ("fastcl._C was built without CUDA kernels (rebuild with FASTCL_CUDA_ARCHS, e.g. \"80;90a\", "
                "against a CUDA build of torch)",)
    if cuda:  # its CUDA runtime is linked statically: the driver must support the toolkit's CUDA
        too_old = _cuda_driver.extension_problem(*_cuda_driver.extension_cuda_versions(info))
        if too_old:
            return (too_old,)
    if not cuda and info["cpu_capability"] == "AVX2" and \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return ("fastcl._C's CPU kernels were compiled for AVX2, which this CPU lacks",)
    return ()


# Whether Triton is installed, found without importing it, and whether its interpreter is on: it must
# be switched on before Triton (and so fastcl) is imported, since Triton decides between compiling
# and interpreting when the kernels are decorated.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
# What the installed Triton cannot do per kernel and dtype, compiled for a GPU or interpreted
# (backend/triton/versions.py), from its metadata.
_TRITON_LIMITS = {(kernel, dtype, compiled): _triton_versions.triton_limits(kernel, dtype, compiled=compiled)
                  for kernel in ("engine", "maxsim_dd") for dtype in FLOATS for compiled in (False, True)
                  } if TRITON_INSTALLED else {}


def _triton_problems() -> tuple[str, ...]:
    if not TRITON_INSTALLED:
        return ("Triton is not installed (pip install triton)",)
    return tuple(_triton_versions.problems())


def _triton_reasons(op: str | None, device_type: str, dtype: torch.dtype) -> list[str]:
    if device_type == "cpu" and not TRITON_INTERPRET:
        return ["the Triton kernels run on CPU tensors only under Triton's interpreter "
                "(set TRITON_INTERPRET=1 before importing fastcl)"]
    compiled = device_type == "cuda"
    limits = [_TRITON_LIMITS.get(("engine", dtype, compiled))]
    if op == "maxsim" and compiled:  # the MaxSim kernels see 16-bit tokens upcast
        limits.append(_TRITON_LIMITS.get(("maxsim_dd", math_dtype(dtype), compiled)))
    return [limit for limit in limits if limit]


# --- the declarations ---------------------------------------------------------------------------------

_DEFINITION = Op(None)

REFERENCE = BackendSpec(
    name="reference", label="reference", devices=None, dtypes=FLOATS, native_dtypes=FLOATS,
    ops={"lse": _DEFINITION, "lse_exclude": _DEFINITION, "pointwise": _DEFINITION, "maxsim": _DEFINITION,
         "topk": _DEFINITION},
    summary="each loss's definition on the materialised S: the readable math, and what the tests compare with")

CHUNKED = BackendSpec(
    name="chunked", label="chunked", devices=None, dtypes=FLOATS, native_dtypes=WIDE,
    ops={"lse": Op("fastcl.backend.chunked.lse"), "lse_exclude": Op("fastcl.backend.chunked.lse"),
         "lse_prefixes": Op("fastcl.backend.chunked.prefixes"), "pointwise": Op("fastcl.backend.chunked.pointwise"),
         "pointwise_prefixes": Op("fastcl.backend.chunked.prefixes"),
         "maxsim": Op("fastcl.backend.chunked.maxsim"), "topk": Op("fastcl.backend.chunked.topk")},
    priority=0,
    summary="the primitives in plain PyTorch tiles: any device, and the executable description of every kernel")

CPU = BackendSpec(
    name="cpu", label="CPU", devices=("cpu",), dtypes=FLOATS, native_dtypes=WIDE,
    ops=dict.fromkeys(("lse", "lse_symmetric", "lse_exclude", "lse_prefixes", "pointwise", "pointwise_prefixes",
                       "maxsim", "topk"),
                      Op("fastcl.backend.cpu.ops")),
    priority=20, unusable=_extension_problems(cuda=False),
    summary="fused C++ kernels in fastcl._C (csrc/cpu/): tiles in cache, bitwise deterministic")

TRITON = BackendSpec(
    name="triton", label="Triton", devices=("cuda", "cpu"), dtypes=FLOATS, native_dtypes=FLOATS,
    ops={"lse": Op("fastcl.backend.triton.lse"), "lse_exclude": Op("fastcl.backend.triton.lse"),
         "lse_prefixes": Op("fastcl.backend.triton.prefixes"), "pointwise": Op("fastcl.backend.triton.pointwise"),
         "pointwise_prefixes": Op("fastcl.backend.triton.prefixes"),
         "maxsim": Op("fastcl.backend.triton.maxsim", native_dtypes=WIDE),
         "topk": Op("fastcl.backend.triton.topk", limits={"k": (256, "it holds each row's k best in registers")})},
    priority=30, auto_devices=("cuda",), unusable=_triton_problems(), reasons=_triton_reasons,
    summary="Triton kernels (backend/triton/): the default on CUDA; on CPU tensors under Triton's interpreter")

CUDA = BackendSpec(
    name="cuda", label="CUDA", devices=("cuda",), dtypes=(torch.float32, torch.float16, torch.bfloat16),
    native_dtypes=(torch.float32, torch.float16, torch.bfloat16),
    ops=dict.fromkeys(("lse", "lse_exclude", "lse_prefixes", "pointwise", "pointwise_prefixes"),
                      Op("fastcl.backend.cuda.ops")),
    priority=20, unusable=_extension_problems(cuda=True),
    summary="hand-written CUDA kernels in fastcl._C (csrc/cuda/), built with FASTCL_CUDA_ARCHS")


# --- "auto" by size -----------------------------------------------------------------------------------
# A call of op ``op`` of at most ``MATERIALISE_BELOW_PAIRS[op]`` pairs (M x N) that states its size goes
# to the reference path, which materialises S (at most 8 MiB in float32 at D <= 256): below these sizes
# writing S costs less than the fused engines' fixed per-call work (their tiles, op dispatch, the
# statistics they save). Measured on 2 cores (bench/results/2026-12-05-cpu-auto-sweep.txt): at D = 256
# the cpu kernels overtake the materialised CLIP between N = 1024 and 2048, SigLIP's (whose textbook
# form makes more passes over S) between N = 512 and 1024. Wider features move the crossing out: the
# passes over S that the kernels save stay N^2 while the GEMM both share grows with D, and the cpu
# kernels' tile GEMM is slower than the BLAS one (at D = 768: CLIP's crossing between N = 2048 and
# 4096, the kernels 1.11-1.24x naive at 2048). So the limit grows with D / 256 above D = 256.
# Explicit backend= choices are never changed.
MATERIALISE_BELOW_PAIRS = {"lse": 1 << 21, "lse_exclude": 1 << 21, "pointwise": 1 << 19}
MATERIALISE_WIDTH = 256


def materialises(op: str | None, pairs: int, features: int | None) -> bool:
    """Whether ``"auto"`` takes the reference path for a call of ``pairs`` (M x N) of ``features`` (D)."""
    scale = max(1.0, (features or 0) / MATERIALISE_WIDTH)
    return pairs <= MATERIALISE_BELOW_PAIRS.get(op, -1) * scale


# --- the registry --------------------------------------------------------------------------------------

BACKENDS: dict[str, BackendSpec] = {}
AUTO_ORDER: tuple[str, ...] = ()  # what "auto" tries, first to last: by priority, then declaration order
_modules: dict[tuple[str, str], object] = {}


def register(spec: BackendSpec) -> BackendSpec:
    """Declare a backend (or replace the declaration of that name)."""
    global AUTO_ORDER
    unknown = sorted(set(spec.ops) - set(OPS))
    if unknown:
        raise ValueError(f"backend {spec.name!r} declares unknown ops {unknown}; the ops are {list(OPS)}")
    BACKENDS[spec.name] = spec
    _declarations_changed(spec.name)
    return spec


def unregister(name: str) -> None:
    del BACKENDS[name]
    _declarations_changed(name)


def _declarations_changed(name: str) -> None:
    global AUTO_ORDER
    ranked = [s for s in BACKENDS.values() if s.priority is not None]
    AUTO_ORDER = tuple(s.name for s in sorted(ranked, key=lambda s: -s.priority))
    for key in [k for k in _modules if k[0] == name]:
        del _modules[key]


for _spec in (REFERENCE, CHUNKED, CPU, TRITON, CUDA):
    register(_spec)


def spec(name: str) -> BackendSpec:
    found = BACKENDS.get(name)
    if found is None:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {name!r}")
    return found


def auto_candidates(device_type: str) -> list[str]:
    """The backends ``"auto"`` may take on this device type, first to last."""
    return [n for n in AUTO_ORDER if _auto_on(BACKENDS[n], device_type)]


def _auto_on(s: BackendSpec, device_type: str) -> bool:
    where = s.auto_devices if s.auto_devices is not None else s.devices
    return where is None or device_type in where


def provides(name: str, op: str) -> bool:
    return op in BACKENDS[name].ops


def native_dtypes(name: str, op: str) -> tuple[torch.dtype, ...]:
    s = BACKENDS[name]
    own = s.ops[op].native_dtypes
    return s.native_dtypes if own is None else own


def kernels(name: str, op: str):
    """The module holding backend ``name``'s kernels for ``op`` (``OPS[op].functions``)."""
    key = (name, op)
    found = _modules.get(key)
    if found is None:
        entry = BACKENDS[name].ops.get(op)
        if entry is None or entry.module is None:
            raise ValueError(f"backend {name!r} has no kernels for the {op!r} op")
        found = importlib.import_module(entry.module)
        missing = [f for f in OPS[op].functions if not hasattr(found, f)]
        if missing:
            raise AttributeError(f"{entry.module} is declared as backend {name!r}'s {op!r} kernels but lacks {missing}")
        _modules[key] = found
    return found


def not_supported_reasons(name: str, device: torch.device, dtype: torch.dtype, op: str | None = None,
                          **args) -> list[str]:
    """Why backend ``name`` cannot run ``op`` (``None``: whatever it provides) on ``device`` with
    ``dtype``, for a call with ``args`` (e.g. ``k``); empty: it can."""
    s = spec(name)
    reasons = list(s.unusable)
    if s.devices is not None and device.type not in s.devices:
        where = " and ".join(_DEVICE_NAMES.get(d, d) for d in s.devices)
        reasons.append(f"the {s.label} kernels run on {where} tensors only, got {device.type}")
    if dtype not in s.dtypes:
        reasons.append(f"the {s.label} kernels take {_dtype_list(s.dtypes)}, not {_dtype_name(dtype)}")
    if op is not None:
        entry = s.ops.get(op)
        if entry is None:
            reasons.append(_missing_op(s, op, device, dtype))
        else:
            for arg, (most, why) in entry.limits.items():
                value = args.get(arg)
                if value is not None and value > most:
                    reasons.append(f"the {s.label} {OPS[op].title} kernel takes {arg} <= {most} ({why}), "
                                   f"got {arg}={value}")
    if s.reasons is not None:
        reasons += s.reasons(op, device.type, dtype)
    return reasons


def _missing_op(s: BackendSpec, op: str, device: torch.device, dtype: torch.dtype) -> str:
    others = [n for n in AUTO_ORDER if n != s.name and op in BACKENDS[n].ops
              and not not_supported_reasons(n, device, dtype, op)]
    instead = f" (backend={' or '.join(repr(n) for n in others)} runs it on {device.type})" if others else ""
    return f"there is no {s.label} {OPS[op].title} kernel: the {s.name} backend does not declare the {op!r} op{instead}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_list(dtypes) -> str:
    names = [_dtype_name(d) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def describe() -> dict:
    """Every declaration, as ``fastcl info`` prints it."""
    def op(name: str, entry: Op) -> str:
        limits = ", ".join(f"{arg} <= {most}" for arg, (most, _) in entry.limits.items())
        return f"{name} ({limits})" if limits else name

    return {s.name: {"summary": s.summary, "devices": list(s.devices) if s.devices else "any",
                     "dtypes": [_dtype_name(d) for d in s.dtypes], "ops": [op(*kv) for kv in s.ops.items()],
                     "auto priority": s.priority} for s in BACKENDS.values()}
