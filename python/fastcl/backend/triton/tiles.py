"""What the Triton kernels share: the S tile, the base-2 log-sum-exp of a tile, the softplus /
sigmoid pair, and the host side of a launch (operands, configurations, race-free autotuning).

Shapes: ``x`` is ``[M, D]`` and ``y`` is ``[N, D]``, contiguous with ``D`` padded to a multiple of 16
(``operands``). A tile is ``S2[offs_a, offs_b] = scale2 * x[offs_a] @ y[offs_b].T``,
``[BLOCK_A, BLOCK_B]``, accumulated over feature blocks of ``BLOCK_D`` (which divides the padded D,
so no feature masks) in the math dtype (float32, or float64 for float64 inputs). ``scale2`` is the
logit scale times log2(e): the kernels work on base-2 logits and use exp2 / log2, and the host
converts statistics back to natural logarithms.
"""
from __future__ import annotations

import functools
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import plan

# Triton decides at decoration time whether @triton.jit compiles or interprets; mirror that here.
INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def tile_configs(family: str) -> list[triton.Config]:
    """Autotuning candidates of an S-tile kernel family for every input dtype (pruned per launch to
    the launch's dtype by ``tile_pruner``). ``FASTCL_TRITON_AUTOTUNE=0`` keeps only the first
    candidate of each dtype (no timing runs, one compilation per specialisation: what the GPU
    tests use)."""
    return _configs([c for dt in DTYPES for c in _first(plan.tile_configs(dt, INTERPRET, family))],
                    lambda c: {"BLOCK_A": c.block_a, "BLOCK_B": c.block_b})


def gemm_configs() -> list[triton.Config]:
    return _configs([c for dt in DTYPES for c in _first(plan.gemm_configs(dt, INTERPRET))],
                    lambda c: {"BLOCK_M": c.block_m, "BLOCK_K": c.block_k})


def _first(configs):
    return configs[:1] if os.environ.get("FASTCL_TRITON_AUTOTUNE", "1") == "0" else configs


def _configs(candidates, kwargs) -> list[triton.Config]:
    unique = list(dict.fromkeys(candidates))
    return [triton.Config(kwargs(c), num_warps=c.num_warps, num_stages=c.num_stages) for c in unique]


@functools.cache
def _shared_memory_limit(device_index: int) -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return props["max_shared_mem"]


def _prune(configs, named_args, own, smem):
    """The pruning rule: the launch's dtype's own candidates (``own``: plan tuples in the order of
    ``triton.Config`` fields) whose operand pipeline (``smem``) fits the device's shared memory;
    the smallest of them if none does."""
    features = named_args["a_ptr"] if "a_ptr" in named_args else named_args["f_ptr"]
    key = lambda c: (*c.kwargs.values(), c.num_warps, c.num_stages)
    mine = [c for c in configs if key(c) in own] or configs[:1]
    if INTERPRET or features.device.type != "cuda":
        return mine
    limit = _shared_memory_limit(features.device.index or 0)
    return [c for c in mine if smem(key(c)) <= limit] or [min(mine, key=lambda c: smem(key(c)))]


def tile_pruner(family: str):
    def prune(configs, named_args, **kwargs):
        dtype = named_args["a_ptr"].dtype
        own = set(plan.tile_configs(dtype, INTERPRET, family))
        return _prune(configs, named_args, own,
                      lambda c: plan.tile_smem(plan.TileConfig(*c), kwargs["BLOCK_D"], dtype))
    return prune


def prune_gemms(configs, named_args, **kwargs):
    dtype = named_args["f_ptr"].dtype
    own = set(plan.gemm_configs(dtype, INTERPRET))
    return _prune(configs, named_args, own, lambda c: plan.gemm_smem(plan.GemmConfig(*c), kwargs["BLOCK_N"], dtype))


class TileGrid:
    """The grid of an S-tile launch over ``rows x cols`` pairs, one program per
    ``BLOCK_A x BLOCK_B`` tile (``tile_of``), that keeps the configuration it was last asked for.
    An autotuned launch asks its grid last for the configuration it runs, so ``launched()`` says
    what this launch did, race-free: the autotuner's ``best_config`` is shared by every thread's
    launches."""

    def __init__(self, rows: int, cols: int):
        self.rows, self.cols, self.meta = rows, cols, None

    def __call__(self, meta):
        self.meta = meta
        tiles_a, tiles_b = self.launched()
        return (tiles_a * tiles_b,)

    def launched(self) -> tuple[int, int]:
        """(row tiles, column tiles) of the launch."""
        return triton.cdiv(self.rows, self.meta["BLOCK_A"]), triton.cdiv(self.cols, self.meta["BLOCK_B"])


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
    """(x, y, D): x and y as the kernels read them, rows padded with zeros to a multiple of 16
    features (16-byte aligned rows for vector loads, feature blocks without masks; a copy only when
    D is not already a multiple of 16). The interpreter mishandles bfloat16 (numpy has no such
    type), so there bfloat16 inputs are upcast to float32 first: the same values, exact products."""
    d = x.shape[1]
    pad = plan.padded_features(d) - d

    def prepare(t):
        if INTERPRET and t.dtype == torch.bfloat16:
            t = t.float()
        return F.pad(t, (0, pad)) if pad else t.contiguous()

    xa = prepare(x)
    return xa, (xa if y is x else prepare(y)), d


def unpadded(t: torch.Tensor, d: int) -> torch.Tensor:
    """The first ``d`` feature columns of a result computed on padded features."""
    return t if t.shape[1] == d else t[:, :d].contiguous()


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return plan.acc_dtype(dtype)


def scalar(value: torch.Tensor, factor: float, like: torch.Tensor) -> torch.Tensor:
    """``value * factor`` as a 1-element tensor in the math dtype on ``like``'s device (no host sync)."""
    return (value.to(device=like.device, dtype=math_dtype(like.dtype)) * factor).reshape(1)


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
    """Keys as the kernels read them: int64, contiguous. Triton needs a pointer even where the
    keys are off (the kernel never reads it then); an int64 one, so that keyed and unkeyed launches
    share one compiled kernel (pointer types are part of its specialisation)."""
    return like.new_empty(1, dtype=torch.int64) if keys is None else keys.to(torch.int64).contiguous()


# --- device code --------------------------------------------------------------------------------

GROUP = tl.constexpr(8)


@triton.jit
def tile_of(rows, cols, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """(i, j, column tiles) of this program over a ``rows x cols`` block. Programs run through
    groups of GROUP row tiles column by column (the matmul tutorial's order), so the x tiles of a
    group stay in L2 while it walks the y tiles: one pass over y per group instead of one pass over
    x per column tile."""
    pid = tl.program_id(0)
    tiles_a, tiles_b = tl.cdiv(rows, BLOCK_A), tl.cdiv(cols, BLOCK_B)
    width = GROUP * tiles_b
    first = (pid // width) * GROUP
    size = tl.minimum(tiles_a - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size, tiles_b


@triton.jit
def logits_tile(a_ptr, b_ptr, offs_a, offs_b, mask_a, mask_b, D, scale,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """scale * a[offs_a] @ b[offs_b].T in the dtype of ``scale``; rows outside the masks read 0.
    BLOCK_D divides D: feature blocks need no mask."""
    offs_d = tl.arange(0, BLOCK_D)
    a_rows = a_ptr + offs_a.to(tl.int64)[:, None] * D + offs_d[None, :]
    b_cols = b_ptr + offs_b.to(tl.int64)[None, :] * D + offs_d[:, None]  # b read transposed: [BLOCK_D, BLOCK_B]
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=scale.dtype)
    for d0 in range(0, D, BLOCK_D):
        a = tl.load(a_rows + d0, mask=mask_a[:, None], other=0.0)
        b = tl.load(b_cols + d0, mask=mask_b[None, :], other=0.0)
        # out_dtype: Triton < 3.7 defaults it to float32 and rejects a float64 accumulator.
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc * scale


@triton.jit
def keyed_pairs(a_keys, b_keys, offs_a, mask_a, offs_b, mask_b):
    """Bool tile: the pairs whose integer keys are equal."""
    ka = tl.load(a_keys + offs_a, mask=mask_a, other=0)
    kb = tl.load(b_keys + offs_b, mask=mask_b, other=0)
    return ka[:, None] == kb[None, :]


@triton.jit
def drop_listed(s, exclude, E, offs_a, mask_a, offs_b):
    """``s`` with -inf at the pairs (i, exclude[i, e]), e < E: row i's listed columns (``exclude``
    [M, E], int64, -1 padded; columns outside the tile match nothing), left out of every statistic as
    keyed pairs are. E is a run-time value: E = 0 (no list) runs no iteration, and one compiled kernel
    serves both. ``s`` itself is the loop's carried value (live anyway), not a second bool tile."""
    listed_row = exclude + offs_a.to(tl.int64) * E
    for e in range(E):
        # int32 compares (column indices are below N < 2^31): half the registers of int64 ones
        listed = tl.load(listed_row + e, mask=mask_a, other=-1).to(tl.int32)
        s = tl.where(listed[:, None] == offs_b[None, :], float("-inf"), s)
    return s


@triton.jit
def tile_lse2(s, AXIS: tl.constexpr):
    """log2-sum-exp2 of the base-2 logits ``s`` along AXIS. An infinite maximum shifts by 0, so an
    all -inf line gives -inf and a +inf entry +inf; NaN gives NaN (as ``finite_shift`` in
    csrc/cpu/tile_math.h and chunked's ``_tile_lse``)."""
    top = tl.max(s, AXIS)
    shift = tl.where(tl.abs(top) == float("inf"), 0.0, top)
    total = tl.sum(tl.exp2(s - tl.expand_dims(shift, AXIS)), AXIS)
    return shift + tl.log2(total)


@triton.jit
def softplus_sigmoid(t, ln2):
    """(softplus(f), sigmoid(f)) of f = t * ln 2 with one exp2: e = exp(-|f|) = exp2(-|t|),
    softplus = max(f, 0) + log1p(e), sigmoid = 1 / (1 + e) for f >= 0 and e / (1 + e) otherwise.
    log1p(e) = log(u) * e / (u - 1) with u = 1 + e (Goldberg's trick) keeps full relative accuracy
    for tiny e, where log(1 + e) would lose it: most SigLIP pairs are confident negatives, e ~ 1e-5."""
    e = tl.exp2(-tl.abs(t))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    loss = tl.maximum(t, 0.0) * ln2 + log1p
    r = 1.0 / u
    return loss, tl.where(t >= 0, r, e * r)
