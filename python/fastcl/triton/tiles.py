"""What the Triton kernels share: the tile GEMM, the online log-sum-exp merge, the softplus /
sigmoid pair, block shapes and the autotuning configurations.

Shapes: ``a`` is ``[RA, D]`` and ``b`` is ``[RB, D]``, both contiguous; a tile is
``S[offs_a, offs_b] = scale * a[offs_a] @ b[offs_b].T``, ``[BLOCK_A, BLOCK_B]``, accumulated over
feature chunks of ``BLOCK_D`` in the math dtype (float32, or float64 for float64 inputs).
The kernels in ``lse.py`` and ``pointwise.py`` run the same tile code with (a, b) = (x, y) for the
row direction and (a, b) = (y, x) for the column direction, so every output is owned by one
program and written once: no atomics, deterministic results.
"""
from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether @triton.jit compiles or interprets; mirror that here.
INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def configs(shapes) -> list[triton.Config]:
    """Autotuning candidates ``(BLOCK_A, BLOCK_B, num_warps, num_stages)``. Under the interpreter
    every program step costs milliseconds of numpy work, and autotuning would time nothing real:
    one configuration, with large blocks. ``FASTCL_TRITON_AUTOTUNE=0`` keeps only the first
    candidate (no timing runs, one compilation per specialisation: what the GPU tests use)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_A": 64, "BLOCK_B": 64})]
    chosen = shapes[:1] if os.environ.get("FASTCL_TRITON_AUTOTUNE", "1") == "0" else shapes
    return [triton.Config({"BLOCK_A": a, "BLOCK_B": b}, num_warps=w, num_stages=s) for a, b, w, s in chosen]


def feature_blocks(d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_DO): the feature chunk of the S GEMM's reduction, and the feature chunk of
    ``G @ b`` one gradient program accumulates in registers. Gradient programs recompute S once
    per output chunk, so the output chunk is as wide as registers allow (256 fp32 columns of a
    64-row block); the reduction chunk only sets the pipelining grain."""
    # At least 32: every D up to 32 shares one specialisation (tl.dot needs K >= 16 anyway).
    p2 = triton.next_power_of_2(max(d, 32))
    if INTERPRET:  # fewer, larger numpy steps
        return min(p2, 128), min(p2, 256)
    wide = 128 if dtype == torch.float64 else 256
    return min(p2, 64), min(p2, wide)


def prune_by_accumulator(configs, named_args, **kwargs):
    """Drop tile shapes whose [BLOCK_A, BLOCK_DO] accumulator would spill registers."""
    block_do = kwargs.get("BLOCK_DO", named_args.get("BLOCK_DO"))
    kept = [c for c in configs if c.kwargs["BLOCK_A"] * block_do <= 64 * 256]
    return kept or configs[:1]


def dot_precision(dtype: torch.dtype) -> str | None:
    """How float32 tile GEMMs use tensor cores, following torch's own setting:
    ``torch.set_float32_matmul_precision("highest")`` (torch's default) -> ``"tf32x3"`` (three TF32
    products, about float32 accuracy), ``"high"``/``"medium"`` -> ``"tf32"`` (10-bit mantissas,
    relative errors of S about 1e-3). float64 runs in IEEE float64; 16-bit inputs multiply exactly
    into float32 accumulators whatever this says. The interpreter computes every product exactly."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32:
        return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return None


def operands(x: torch.Tensor, y: torch.Tensor):
    """x, y as the kernels read them. The interpreter mishandles bfloat16 (numpy has no such
    type), so there bfloat16 inputs are upcast to float32 first: the same values, exact products."""
    if INTERPRET and x.dtype == torch.bfloat16:
        xa = x.float()
        return xa, (xa if y is x else y.float())
    return x, y


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def quiet_under_interpreter(host_fn):
    """The interpreter evaluates both branches of every ``tl.where`` in numpy, so log(0) and
    inf - inf in the branch not taken (and max over NaN lines) would print numpy warnings;
    silence them there."""
    if not INTERPRET:
        return host_fn

    @functools.wraps(host_fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return host_fn(*args, **kwargs)
    return wrapper


def keys_or_dummy(keys: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Triton needs a pointer even where HAS_KEYS is off; the kernel never reads it then."""
    return like if keys is None else keys.contiguous()


# --- device code --------------------------------------------------------------------------------

@triton.jit
def logits_tile(a_ptr, b_ptr, offs_a, offs_b, mask_a, mask_b, D, scale,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """scale * a[offs_a] @ b[offs_b].T in the dtype of ``scale``; rows outside the masks read 0."""
    offs_d = tl.arange(0, BLOCK_D)
    a_rows = a_ptr + offs_a.to(tl.int64)[:, None] * D
    b_cols = b_ptr + offs_b.to(tl.int64)[None, :] * D  # b is read transposed: [BLOCK_D, BLOCK_B]
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=scale.dtype)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        a = tl.load(a_rows + d[None, :], mask=mask_a[:, None] & (d[None, :] < D), other=0.0)
        b = tl.load(b_cols + d[:, None], mask=(d[:, None] < D) & mask_b[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc * scale


@triton.jit
def accumulate_gemm(acc, g, b_ptr, offs_b, mask_b, d0, D, BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr):
    """acc + g @ b[offs_b, d0:d0 + BLOCK_DO]. bfloat16 inputs round G to bfloat16 for the tensor
    cores (same range as float32); float16 cannot hold small G (1 / (M N) underflows), so there
    the float16 features are widened instead and multiplied as TF32 (10-bit mantissas, like float16,
    with float32's range)."""
    d = d0 + tl.arange(0, BLOCK_DO)
    b = tl.load(b_ptr + offs_b.to(tl.int64)[:, None] * D + d[None, :], mask=mask_b[:, None] & (d[None, :] < D),
                other=0.0)
    if b.dtype == tl.bfloat16:
        acc = tl.dot(g.to(tl.bfloat16), b, acc)
    elif b.dtype == tl.float16:
        acc = tl.dot(g, b.to(tl.float32), acc, input_precision="tf32")
    else:
        acc = tl.dot(g.to(b.dtype), b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def side_vector(ptr, offs_a, mask_a, offs_b, mask_b, ON_A: tl.constexpr):
    """A per-row or per-column vector of the engine laid out along the tile's a side ([BLOCK_A, 1])
    or b side ([1, BLOCK_B]); 0 outside the matrix."""
    if ON_A:
        v = tl.load(ptr + offs_a, mask=mask_a, other=0.0)[:, None]
    else:
        v = tl.load(ptr + offs_b, mask=mask_b, other=0.0)[None, :]
    return v


@triton.jit
def keyed_pairs(a_keys, b_keys, offs_a, mask_a, offs_b, mask_b):
    """Bool tile: the pairs whose integer keys are equal."""
    ka = tl.load(a_keys + offs_a, mask=mask_a, other=0)
    kb = tl.load(b_keys + offs_b, mask=mask_b, other=0)
    return ka[:, None] == kb[None, :]


@triton.jit
def block_stats(s, AXIS: tl.constexpr):
    """(shift, sum exp(s - shift)) along AXIS. An infinite maximum shifts by 0, so an all -inf line
    sums to 0 (lse -inf) and a +inf entry to +inf (lse +inf); NaN makes the sum NaN
    (as ``finite_shift`` in csrc/cpu/tile_math.h)."""
    top = tl.max(s, AXIS)
    shift = tl.where(tl.abs(top) == float("inf"), 0.0, top)
    total = tl.sum(tl.exp(s - tl.expand_dims(shift, AXIS)), AXIS)
    return shift, total


@triton.jit
def lse_merge(m, s, shift, total):
    """Merge a block's (shift, total) into the running state (m, s), where the sum is s * exp(m).
    Empty blocks leave the state alone and the first non-empty one is adopted as it is, as
    ``lse_merge`` in csrc/cpu/tile_math.h: a NaN block sum propagates."""
    top = tl.maximum(m, shift)
    merged = s * tl.exp(m - top) + total * tl.exp(shift - top)
    new_s = tl.where(total == 0, s, tl.where(s == 0, total, merged))
    new_m = tl.where(total == 0, m, tl.where(s == 0, shift, top))
    return new_m, new_s


@triton.jit
def softplus_sigmoid(f):
    """(softplus(f), sigmoid(f)) with one exp: e = exp(-|f|), softplus = max(f, 0) + log1p(e),
    sigmoid = 1 / (1 + e) for f >= 0 and e / (1 + e) otherwise. log1p(e) = log(u) * e / (u - 1)
    with u = 1 + e (Goldberg's trick) keeps full relative accuracy for tiny e, where log(1 + e)
    would lose it: most SigLIP pairs are confident negatives with e ~ 1e-5."""
    e = tl.exp(-tl.abs(f))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    loss = tl.maximum(f, 0.0) + log1p
    r = 1.0 / u
    return loss, tl.where(f >= 0, r, e * r)
