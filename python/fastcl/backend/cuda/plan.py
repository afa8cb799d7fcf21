"""How the ``cuda`` engine cuts a problem, in Python: the constants of ``csrc/cuda/params.h`` and
the host arithmetic of ``csrc/cuda/plan.h`` (blocks, splits, workspace, feature padding, float16 G's
scale), for the performance model (``fastcl.benchmark.model --backend cuda``) and for CPU tests.

Pure Python (no extension, no GPU). ``tests/test_cuda_plan.py`` parses ``params.h`` and compiles
``plan.h`` with the host compiler to check that every number and formula here is the launcher's.
The block rule and ``FASTCL_WORKSPACE_MB`` are the Triton engine's (``fastcl/backend/triton/plan.py``):
what differs is only what a block's workspace holds.

- forward: blocks of ``R x C`` pairs whose (shift, sum) partials, a float pair for each row per 128
  columns and each column per 128 rows, fit the budget (``8 * budget`` pairs at most); plus a
  running (shift, sum) per row and column.
- op lse_prefixes (K prefixes, launched in groups of at most MAX_PREFIXES): the forward's partials and
  the backward's H blocks times the group's K, the block rule given budget / K.
- backward (and SigLIP/MW): one G block ``R * C * g_bytes <= budget``, G in the input type
  (float16 times a power of two, see ``grad_scale_exponent``), plus one float32 ``[max(R, C), D]``
  product buffer and, for SigLIP/MW, per-tile row sums.
"""
from __future__ import annotations

import math

import torch

from ..triton import plan as _shared

# csrc/cuda/params.h
BLOCK_A = 128
BLOCK_B = 128
BLOCK_K = 32
WARPS16 = 4  # warps per CTA, float16 and bfloat16 (2 x 2 of 64 x 64)
WARPS32 = 8  # float32 (4 x 2 of 32 x 64)
WARPS_N = 2  # csrc/cuda/mma.cuh Warps::kN: warps across a CTA tile's BLOCK_B columns, every type
BLOCK_QUANTUM = 128
TARGET_CTAS = 264
MAX_SPLITS = 32
GRAD_SCALE_LOG2 = 14
DEFAULT_WORKSPACE_MB = 256
MAX_PREFIXES = 16  # op lse_prefixes: prefixes per launch (larger K runs in groups, each from feature 0)

workspace_budget = _shared.workspace_budget


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def threads(dtype: torch.dtype) -> int:
    """Threads per CTA of the tile kernels (mma.cuh ``Warps``)."""
    return 32 * (WARPS32 if dtype == torch.float32 else WARPS16)


def smem_bytes(dtype: torch.dtype) -> int:
    """Dynamic shared memory of a tile kernel's launch (tile.cuh ``Smem``): stages of the A and B
    tiles, rows of BLOCK_K features padded against bank conflicts."""
    stages, pad = (2, 4) if dtype == torch.float32 else (3, 8)
    return 2 * stages * BLOCK_A * (BLOCK_K + pad) * element_bytes(dtype)


def prefix_forward_smem_bytes(dtype: torch.dtype, prefixes: int) -> int:
    """Dynamic shared memory of a launch of op lse_prefixes' forward over ``prefixes`` prefixes
    (prefixes.cuh ``PrefixSmem::forward_bytes``): the tile stages, then per prefix a (shift, sum) row
    state for each warp column and the row and column factors, in floats: 3 KiB a prefix."""
    return smem_bytes(dtype) + prefixes * (2 * WARPS_N * BLOCK_A + BLOCK_A + BLOCK_B) * 4


def g_dtype(dtype: torch.dtype) -> torch.dtype:
    """G's storage type: the input type (float16 scaled by 2^k, bfloat16 has float32's range)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the cuda engine takes float32, float16 or bfloat16 features, got {dtype}")
    return dtype


def prefix_group(prefixes: int) -> int:
    """Op lse_prefixes: the prefixes one launch reads off its tiles (plan.h ``prefix_group``)."""
    return min(prefixes, MAX_PREFIXES)


def forward_block(m: int, n: int, budget: int, prefixes: int = 1) -> tuple[int, int]:
    """(R, C) of the forward: 2 directions x 8 bytes of (shift, sum) per BLOCK_A pairs fit the budget
    (op lse_prefixes: those of a launch's ``prefixes``)."""
    return _shared.blocks(m, n, budget * BLOCK_A // (2 * 2 * 4 * prefixes), BLOCK_QUANTUM)


def gradient_block(m: int, n: int, dtype: torch.dtype, budget: int, prefixes: int = 1) -> tuple[int, int]:
    """(R, C) of the backward: one G block in ``g_dtype`` fits the budget (op lse_prefixes: one H
    block per prefix of a launch)."""
    return _shared.blocks(m, n, budget // (element_bytes(g_dtype(dtype)) * prefixes), BLOCK_QUANTUM)


def prefix_ends(dims, elem_bytes: int) -> list[int]:
    """Op lse_prefixes: where each prefix's features end in the kernels' copy, whose segments
    ``[d_{q-1}, d_q)`` each start on a 16-byte chunk (plan.h ``prefix_ends``); ``dims`` itself when
    every d_q is whole chunks (then the caller's rows serve, if aligned)."""
    ends, at, prev = [], 0, 0
    for d in dims:
        at += aligned_features(d - prev, elem_bytes)
        prev = d
        ends.append(at)
    return ends


def split_b(ctas: int, b_tiles: int) -> tuple[int, int]:
    """(B tiles per split, splits) of a forward block with ``ctas`` row tiles: the fewest splits whose
    waves of TARGET_CTAS CTAs (each CTA visiting ``per`` tiles) are at least 90% full, else the
    fullest (plan.h ``split_b``, integer arithmetic in both)."""
    if b_tiles <= 0:
        return 1, 1
    ctas = max(ctas, 1)
    best = None
    for want in range(1, min(b_tiles, MAX_SPLITS) + 1):
        per = cdiv(b_tiles, want)
        count = cdiv(b_tiles, per)
        cost = cdiv(ctas * count, TARGET_CTAS) * per  # time in tile visits: waves x each CTA's tiles
        if 10 * ctas * b_tiles >= 9 * TARGET_CTAS * cost:
            return per, count
        if best is None or cost < best[0]:
            best = (cost, per, count)
    return best[1], best[2]


def aligned_features(d: int, elem_bytes: int) -> int:
    """The feature width the kernels read: whole 16-byte chunks (the host pads a copy otherwise)."""
    chunk = 16 // elem_bytes
    return cdiv(d, chunk) * chunk


def grad_scale_exponent(gmax: float) -> int:
    """k with ``gmax * 2^k <= 2^GRAD_SCALE_LOG2``, largest such; 0 for 0 or non-finite gmax;
    clamped to [-126, 126]. float16 G is stored times 2^k; gmax bounds |G|."""
    if not gmax > 0 or math.isinf(gmax):
        return 0
    f, e = math.frexp(gmax)
    k = GRAD_SCALE_LOG2 - (e - 1 if f == 0.5 else e)
    return max(-126, min(126, k))


def _carve(count: int) -> int:
    return (max(count, 0) * 4 + 255) // 256 * 256


def forward_workspace_bytes(m: int, n: int, rows: bool, cols: bool, budget: int, prefixes: int = 1) -> int:
    """What ``lse_forward_workspace_bytes`` allocates (plan.h forward_layout; op lse_prefixes: a
    running state per prefix and a launch's partials per prefix of it)."""
    group = prefix_group(prefixes)
    r_blk, c_blk = forward_block(m, n, budget, group)
    row_parts = col_parts = 0
    for r in (r_blk, m % r_blk):
        for c in (c_blk, n % c_blk):
            if r and c:
                row_parts = max(row_parts, split_b(cdiv(r, BLOCK_A), cdiv(c, BLOCK_B))[1] * r)
                col_parts = max(col_parts, cdiv(r, BLOCK_A) * c)
    total = 0
    if rows:
        total += 2 * _carve(prefixes * m) + 2 * _carve(group * row_parts)
    if cols:
        total += 2 * _carve(prefixes * n) + 2 * _carve(group * col_parts)
    return total


def gradient_workspace_bytes(m: int, n: int, d: int, dtype: torch.dtype, budget: int, pointwise: bool,
                             grads: bool = True) -> int:
    """What one gradient pass allocates beyond its outputs (csrc/cuda/ops_cuda.cpp gradient_pass):
    the G block, the float32 product buffer, float16's two scale floats, SigLIP/MW's row partials."""
    r, c = gradient_block(m, n, dtype, budget)
    total = 0
    if grads:
        total += r * c * element_bytes(g_dtype(dtype)) + max(r, c) * d * 4
        total += 8 if dtype == torch.float16 else 0
    if pointwise:
        total += 2 * r * cdiv(c, BLOCK_B) * 4
    return total


def padding_bytes(m: int, n: int, d: int, dtype: torch.dtype) -> int:
    """The aligned copies of x and y when d is not whole 16-byte chunks (an unaligned base pointer
    also takes one; not modelled)."""
    elem = element_bytes(dtype)
    d_al = aligned_features(d, elem)
    return 0 if d_al == d else (m + n) * d_al * elem
