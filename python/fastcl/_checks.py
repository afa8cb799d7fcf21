"""Input validation shared by every loss: one place for each rule, errors that name the argument."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

REDUCTIONS = ("mean", "sum", "none")


def features(name: str, t: object, *, rank: int = 2) -> torch.Tensor:
    """A non-empty floating tensor of the given rank (``[rows, D]`` by default)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != rank:
        want = "[rows, D]" if rank == 2 else "[V, B, D]"
        raise ValueError(f"{name} must be {rank}-D {want}, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}): the loss needs at least one row and D >= 1")
    return t


def same_kind(names: Sequence[str], tensors: Sequence[torch.Tensor], *, same_width: bool = True) -> None:
    """All feature tensors share dtype, device and (optionally) feature width D."""
    first, t0 = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != t0.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first} has {t0.dtype}; cast them to one dtype")
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {t0.device}")
        if same_width and t.shape[-1] != t0.shape[-1]:
            raise ValueError(f"{name} has feature width D={t.shape[-1]} but {first} has D={t0.shape[-1]}")


def paired(names: Sequence[str], a: torch.Tensor, b: torch.Tensor) -> None:
    """Losses over pairs (x_i, y_i) need as many rows in both."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{names[0]} has {a.shape[0]} rows but {names[1]} has {b.shape[0]}; this loss pairs row i with row i"
        )


def reduction(value: object) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value  # type: ignore[return-value]


def positive_float(name: str, value: object) -> float:
    if isinstance(value, torch.Tensor) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def unit_interval(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def scalar_param(name: str, value: object, like: torch.Tensor, *, positive: bool) -> torch.Tensor:
    """A Python number or a one-element tensor (gradient kept) as a 0-d tensor in the math dtype.

    Tensor values are not range-checked: that would cost a device sync on every step.
    """
    dtype = math_dtype(like.dtype)
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if value.numel() != 1:
            raise ValueError(f"{name} must hold one value, got shape {tuple(value.shape)}")
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
        return value.reshape(()).to(dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be {'positive and ' if positive else ''}finite, got {value}")
    return torch.tensor(float(value), dtype=dtype, device=like.device)


def labels(name: str, value: object, *, length: int, high: int | None, device: torch.device) -> torch.Tensor:
    """Integer class ids of the given length; with ``high``, each must lie in ``[0, high)``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {value.dtype}")
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the features are on {device}")
    value = value.long()
    # The range check reads values (a device sync, a graph break under torch.compile): eager only.
    if high is not None and length > 0 and not torch.compiler.is_compiling():
        lo, hi = int(value.min()), int(value.max())
        if lo < 0 or hi >= high:
            raise ValueError(f"{name} must lie in [0, {high}), got values from {lo} to {hi}")
    return value


def views(name: str, value: object) -> torch.Tensor:
    """``[V, B, D]`` tensor or a sequence of ``V`` tensors ``[B, D]`` -> one ``[V, B, D]`` tensor, V >= 2."""
    if isinstance(value, torch.Tensor):
        features(name, value, rank=3)
        stacked = value
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        parts = [features(f"{name}[{i}]", v) for i, v in enumerate(value)]
        if not parts:
            raise ValueError(f"{name} is an empty sequence; pass at least 2 views")
        same_kind([f"{name}[{i}]" for i in range(len(parts))], parts)
        for i, p in enumerate(parts[1:], 1):
            if p.shape[0] != parts[0].shape[0]:
                raise ValueError(f"{name}[{i}] has {p.shape[0]} rows but {name}[0] has {parts[0].shape[0]}")
        stacked = torch.stack(parts)
    else:
        raise TypeError(
            f"{name} must be a [V, B, D] tensor or a sequence of [B, D] tensors, got {type(value).__name__}")
    if stacked.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 views, got V={stacked.shape[0]}")
    return stacked


def min_rows(name: str, rows: int, needed: int, why: str) -> None:
    if rows < needed:
        raise ValueError(f"{name} needs at least {needed} rows ({why}), got {rows}")


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
