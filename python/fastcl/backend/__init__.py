"""Which backend runs a call: one dispatch over the declarations in ``registry.py``, errors that
list every reason.

Every backend but ``reference`` is an engine: the primitives every loss is composed of
(``primitives/``: ``lse``, ``pointwise``) and the ops beside them (``maxsim.py``, ``topk.py``),
over that backend's kernels (``chunked/``, ``cpu/``, ``triton/``, ``cuda/``). ``reference`` is not
an engine: each loss module holds its own reference, the math written on the materialised ``S``.
"""
from __future__ import annotations

import torch

from . import registry
from .primitives import Engine
from .registry import not_supported_reasons

__all__ = ["BackendUnavailableError", "auto_choice", "available", "engine", "names", "not_supported_reasons",
           "resolve"]


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run these inputs here (for ``"auto"``: none can); ``reasons``
    lists why."""

    def __init__(self, message: str, reasons: list[str] = ()):
        super().__init__(message)
        self.reasons = list(reasons)


def names() -> tuple[str, ...]:
    """Every declared backend, in declaration order."""
    return tuple(registry.BACKENDS)


def available(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              op: str | None = None) -> list[str]:
    """Names of the backends that can run ``op`` (``None``: any of theirs) on ``device`` with ``dtype`` here."""
    device = torch.device(device)
    return [n for n in registry.BACKENDS if not registry.not_supported_reasons(n, device, dtype, op)]


def auto_choice(device: str | torch.device, dtype: torch.dtype = torch.float32, op: str | None = None) -> str:
    """The backend ``"auto"`` picks for this device, dtype and op."""
    return _resolve("auto", torch.device(device), dtype, op, {})


def resolve(backend: str, like: torch.Tensor, *, op: str | None = None, **args) -> str:
    """Validate ``backend`` for ``op`` on tensors like ``like`` and a call with ``args`` (e.g. ``k``);
    return the concrete backend name. ``"auto"``: the reference path for a call whose ``pairs=M * N``
    is small for ``like``'s width D (``registry.materialises``), else the first of
    ``registry.auto_candidates`` that can."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if args.get("pairs") is not None:
        args["features"] = like.shape[-1] if like.dim() else None
    return _resolve(backend, like.device, like.dtype, op, args)


def _resolve(backend: str, device: torch.device, dtype: torch.dtype, op: str | None, args: dict) -> str:
    pairs, features = args.pop("pairs", None), args.pop("features", None)
    if backend == "auto" and pairs is not None and registry.materialises(op, pairs, features) \
            and not registry.not_supported_reasons("reference", device, dtype, op, **args):
        return "reference"  # S is small: materialising it beats any engine's fixed cost
    if backend == "auto":
        for name in registry.auto_candidates(device.type):
            if not registry.not_supported_reasons(name, device, dtype, op, **args):
                return name
        why = [f"{name}: " + "; ".join(registry.not_supported_reasons(name, device, dtype, op, **args))
               for name in registry.BACKENDS if name != "reference"]
        raise BackendUnavailableError(f"no backend can run {_what(op)}{dtype} tensors on {device}: "
                                      + " | ".join(why), why)
    why = registry.not_supported_reasons(backend, device, dtype, op, **args)
    if why:
        usable = [n for n in registry.BACKENDS if not registry.not_supported_reasons(n, device, dtype, op, **args)]
        raise BackendUnavailableError(
            f"backend={backend!r} cannot run {_what(op)}{dtype} tensors on {device}: " + "; ".join(why)
            + f". Available here: {usable}", why)
    return backend


def _what(op: str | None) -> str:
    return f"the {op!r} op on " if op else ""


_engines: dict[str, Engine] = {}


def engine(name: str) -> Engine:
    """The ``Engine`` (primitives) of a backend other than ``reference``."""
    found = _engines.get(name)
    if found is None:
        found = _engines[name] = Engine(name)
    return found


# Made now, so that dispatch inside torch.compile finds them in a dict of constants.
for _name, _spec in registry.BACKENDS.items():
    if "lse" in _spec.ops and _spec.ops["lse"].module is not None:
        engine(_name)
