"""Input validation shared by every loss: one place for each rule, errors that name the argument."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

REDUCTIONS = ("mean", "sum", "none")


class UnsupportedFeatureError(NotImplementedError):
    """A drop-in module was asked for a feature of the library it replaces that fastcl does not
    implement (each drop-in's README note lists them). A ``NotImplementedError``, not a
    ``ValueError``: the argument is valid for the peer library, fastcl just cannot do it fused."""


def features(name: str, t: object, *, rank: int = 2, layout: str | None = None) -> torch.Tensor:
    """A non-empty floating tensor of the given rank, laid out as ``layout`` (default ``[rows, D]``,
    or ``[V, B, D]`` at rank 3; the error messages name it)."""
    layout = layout or ("[rows, D]" if rank == 2 else "[V, B, D]")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}): the loss needs every size of {layout} >= 1")
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


NUMBER = "a real number (Python or NumPy)"
NUMBER_OR_TENSOR = "a real number (Python or NumPy) or a one-element floating tensor"


def _require_real(name: str, value: object, accepted: str = NUMBER) -> None:
    """bool is an int to Python, but a flag passed where a number belongs is a mistake."""
    if type(value) is float or type(value) is int:  # the common case, before the (slower) ABC check
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {accepted}, got {type(value).__name__}")


def real_number(name: str, value: object, *, positive: bool, accepted: str = NUMBER) -> float:
    """A Python or NumPy real number as a float: finite, and > 0 if ``positive``."""
    _require_real(name, value, accepted)
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a {'positive ' if positive else ''}finite number, got {value}")
    return value


def positive_float(name: str, value: object) -> float:
    return real_number(name, value, positive=True)


def unit_interval(name: str, value: object) -> float:
    _require_real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _one_value(name: str, value: torch.Tensor) -> torch.Tensor:
    """A one-element floating tensor as a 0-d view (graph kept)."""
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.numel() != 1:
        raise ValueError(f"{name} must hold one value, got shape {tuple(value.shape)}")
    return value if value.dim() == 0 else value.reshape(())  # no view node (and its backward) for a 0-d one


def scalar_param(name: str, value: object, like: torch.Tensor, *, positive: bool) -> torch.Tensor:
    """A Python or NumPy number, or a one-element floating tensor (gradient kept), as a 0-d tensor
    in the math dtype on ``like``'s device.

    Numbers are checked (finite, and positive if ``positive``). Tensor values are not range-checked:
    reading them would cost a device sync (and a torch.compile graph break) on every step.
    """
    dtype = math_dtype(like.dtype)
    if isinstance(value, torch.Tensor):
        value = _one_value(name, value)
        _on(name, value, like.device)
        return value if value.dtype == dtype else value.to(dtype)
    number = real_number(name, value, positive=positive, accepted=NUMBER_OR_TENSOR)
    return torch.tensor(number, dtype=dtype, device=like.device)


def inverse_temperature(name: str, value: object) -> float | torch.Tensor:
    """The logit scale ``1 / t`` of a temperature ``t``: a float for a Python or NumPy number
    (checked positive and finite), a 0-d tensor for a one-element floating tensor, computed from it
    with autograd so that a learnable temperature gets its gradient.

    A tensor is not range-checked (a device sync per step): a negative ``t`` is just a negative
    scale. A non-finite ``t`` gives a NaN scale, so that the loss is NaN rather than the finite
    value ``1 / inf = 0`` would give (SPEC: NaN or Inf in the inputs gives a NaN loss).
    """
    if isinstance(value, torch.Tensor):
        t = _one_value(name, value)
        return torch.where(t.isfinite(), t.reciprocal(), torch.full_like(t, math.nan))
    return 1.0 / real_number(name, value, positive=True, accepted=NUMBER_OR_TENSOR)


def temperature_scale(name: str, value: object, like: torch.Tensor) -> torch.Tensor:
    """``1 / temperature`` as a 0-d tensor in the math dtype on ``like``'s device (see
    ``inverse_temperature`` and ``scalar_param``)."""
    return scalar_param(name, inverse_temperature(name, value), like, positive=True)


def _integers(name: str, value: object) -> torch.Tensor:
    """A tensor of integers (bool is not one), or TypeError naming ``name``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {value.dtype}")
    return value


def _on(name: str, value: torch.Tensor, device: torch.device) -> None:
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the features are on {device}")


def labels(name: str, value: object, *, length: int, high: int | None, device: torch.device) -> torch.Tensor:
    """Integer class ids of the given length; with ``high``, each must lie in ``[0, high)``."""
    value = _integers(name, value)
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {tuple(value.shape)}")
    _on(name, value, device)
    value = value.long()
    # The range check reads values (a device sync, a graph break under torch.compile): eager only.
    if high is not None and length > 0 and not torch.compiler.is_compiling():
        lo, hi = int(value.min()), int(value.max())
        if lo < 0 or hi >= high:
            raise ValueError(f"{name} must lie in [0, {high}), got values from {lo} to {hi}")
    return value


def key_pair(row_keys: object, col_keys: object, rows: int, cols: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``row_keys [rows]`` and ``col_keys [cols]``, integer tensors on ``device``, both or neither ->
    int64 contiguous, or None."""
    if row_keys is None and col_keys is None:
        return None
    if (row_keys is None) != (col_keys is None):
        raise ValueError("pass both row_keys and col_keys, or neither")
    out = []
    for name, keys, length in (("row_keys", row_keys, rows), ("col_keys", col_keys, cols)):
        keys = _integers(name, keys)
        if keys.shape != (length,):
            raise ValueError(f"{name} must have shape [{length}], got {tuple(keys.shape)}")
        _on(name, keys, device)
        out.append(keys.long().contiguous())
    return out[0], out[1]


def matryoshka(dims: object, weights: object, d: int) -> list[tuple[int, float]]:
    """``matryoshka_dims`` (strictly increasing ints in ``[1, d]``) and ``matryoshka_weights`` (as many
    finite numbers, default 1 each) -> [(d_k, w_k)]."""
    if dims is None:
        raise ValueError("matryoshka_weights needs matryoshka_dims=(d_1, ..., d_K)")
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or not dims:
        raise TypeError(f"matryoshka_dims must be a non-empty sequence of ints, got {dims!r}")
    if any(isinstance(k, bool) or not isinstance(k, numbers.Integral) for k in dims):
        raise TypeError(f"matryoshka_dims must hold ints, got {dims!r}")
    dims = [int(k) for k in dims]
    if any(b <= a for a, b in zip(dims, dims[1:])) or dims[0] < 1 or dims[-1] > d:
        raise ValueError(f"matryoshka_dims must increase strictly within [1, {d}] (the features' D), got {dims}")
    if weights is None:
        return [(k, 1.0) for k in dims]
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(dims):
        raise ValueError(f"matryoshka_weights must be {len(dims)} numbers, one per dimension, got {weights!r}")
    if any(isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) for w in weights):
        raise ValueError(f"matryoshka_weights must be finite numbers, got {weights!r}")
    return list(zip(dims, (float(w) for w in weights)))


def guide(value: object, margin: object, *, rows: int, cols: int, device: torch.device):
    """``guide=(gx [rows, Dg], gy [cols, Dg])``, floating tensors on ``device`` (a guide model's
    embeddings, used as given), and a finite ``guide_margin`` -> (gx, gy, margin), or None."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"guide must be a pair (gx, gy) of the guide model's embeddings, got {type(value).__name__}")
    gx, gy = features("guide[0]", value[0]), features("guide[1]", value[1])
    same_kind(("guide[0]", "guide[1]"), (gx, gy))
    for name, t, n in (("guide[0]", gx, rows), ("guide[1]", gy, cols)):
        if t.shape[0] != n:
            raise ValueError(f"{name} must have {n} rows (one per {'row' if name == 'guide[0]' else 'column'}), "
                             f"got shape {tuple(t.shape)}")
    _on("guide", gx, device)
    return gx, gy, real_number("guide_margin", margin, positive=False)


MULTI_POSITIVE = ("joint", "decoupled")


def positives(name: str, value: object, mode: object, *, rows: int, high: int,
              device: torch.device) -> torch.Tensor | None:
    """``[rows, P]`` integer column indices in ``[-1, high)`` (``-1``: padding), with ``mode`` one
    of MULTI_POSITIVE -> int64, or None when neither is given."""
    if value is None:
        if mode is not None:
            raise ValueError(f"multi_positive={mode!r} needs {name}=[M, P] column indices")
        return None
    if mode not in MULTI_POSITIVE:
        raise ValueError(f"{name} needs multi_positive= one of {MULTI_POSITIVE} (how the positives share a row), "
                         f"got {mode!r}")
    value = _integers(name, value)
    if value.dim() != 2 or value.shape[0] != rows:
        raise ValueError(f"{name} must have shape [{rows}, P], got {tuple(value.shape)}")
    _on(name, value, device)
    value = value.long().contiguous()
    if value.numel() and not torch.compiler.is_compiling():  # reads values: a device sync, eager only
        lo, hi = int(value.min()), int(value.max())
        if lo < -1 or hi >= high:
            raise ValueError(f"{name} must lie in [0, {high}) (or be -1: padding), got values from {lo} to {hi}")
    return value


def views(name: str, value: object) -> torch.Tensor:
    """``[V, B, D]`` tensor or a sequence of ``V`` tensors ``[B, D]`` -> one ``[V, B, D]`` tensor, V >= 2."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dim() != 3:
            # Both forms named: a lone [B, D] tensor is usually one view passed where a list of views was meant.
            raise ValueError(f"{name} must be a 3-D tensor [V, B, D] or a list/tuple of V tensors [B, D], "
                             f"got a tensor of shape {tuple(value.shape)}")
        features(name, value, rank=3)
        stacked = value
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        parts = [features(f"{name}[{i}]", v, layout="[B, D]") for i, v in enumerate(value)]
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


def peer_temperature(owner: str, value: object) -> None:
    """lightly's rule for a temperature (``NTXentLoss`` refuses only ``|t| < 1e-8``): any non-zero
    real number or a one-element floating tensor (not read: no device sync)."""
    if isinstance(value, torch.Tensor):
        _one_value(f"{owner}(temperature)", value)
        return
    _require_real(f"{owner}(temperature)", value, NUMBER_OR_TENSOR)
    if not math.isfinite(value) or abs(value) < 1e-8:
        raise ValueError(f"{owner}(temperature={value}): |temperature| must be at least 1e-8 and finite "
                         "(it divides the similarities)")


def min_rows(name: str, rows: int, needed: int, why: str) -> None:
    if rows < needed:
        raise ValueError(f"{name} needs at least {needed} rows ({why}), got {rows}")


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
