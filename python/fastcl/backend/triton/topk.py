"""Streaming top-k of S = scale * x @ y.T per row, in Triton (see ``fastcl.topk`` for the contract).

One launch over row tiles. Each program owns BLOCK_A rows and keeps, in registers, the K_PAD best
entries seen so far per row (K_PAD = k rounded up to a power of two), unsorted, with the position
of the worst one. For every column tile it recomputes S in registers, keeps only the entries that
beat their row's current worst (after the first tiles: almost none), and inserts those one round
at a time, each replacing the worst. At the end the K_PAD entries are put in order and the first k
are written. Rows belong to one program: no atomics, deterministic results.

Comparisons run on integer keys with the order of the values (``ordered_keys``): NaN above +inf,
-0.0 equal to +0.0, and excluded pairs (diagonal, equal keys, past the ends) on a sentinel below
every real key. Ties go to the lower column. Needs no sort primitive, so every dtype takes the same
path; values are recovered from the keys exactly.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The host helpers (interpreter flag, float32 dot precision, warning filter) are the engine's; the
# in-kernel tile GEMM below is its own, so the engine's tile code can evolve with its tuning.
from .tiles import INTERPRET, dot_precision, quiet_under_interpreter

# Under the interpreter every program step costs milliseconds of numpy work and autotuning would
# time nothing real: one configuration with large blocks. FASTCL_TRITON_AUTOTUNE=0: the first only.
# (BLOCK_A, BLOCK_B, num_warps, num_stages) of a GPU launch; compiled ahead of time by ``aot.py``.
GPU_SHAPES = [(64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2)]
_SHAPES = GPU_SHAPES[:1] if INTERPRET else GPU_SHAPES
_CONFIGS = [triton.Config({"BLOCK_A": a, "BLOCK_B": b}, num_warps=w, num_stages=s) for a, b, w, s in
            (_SHAPES[:1] if os.environ.get("FASTCL_TRITON_AUTOTUNE", "1") == "0" else _SHAPES)]
GPU_BLOCK_D = 64
# Registers hold [BLOCK_A, K_PAD] keys and columns per program: beyond this, use ``chunked``.
MAX_K = 256


@triton.jit
def _logits_tile(x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, scale,
                 BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """scale * x[offs_m] @ y[offs_n].T in the dtype of ``scale``; rows outside the masks read 0."""
    offs_d = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * D
    y_cols = y_ptr + offs_n.to(tl.int64)[None, :] * D  # y read transposed: [BLOCK_D, BLOCK_B]
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=scale.dtype)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        a = tl.load(x_rows + d[None, :], mask=mask_m[:, None] & (d[None, :] < D), other=0.0)
        b = tl.load(y_cols + d[:, None], mask=(d[:, None] < D) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc * scale


@triton.jit
def ordered_keys(s, KEY_DTYPE: tl.constexpr, MAGNITUDE: tl.constexpr):
    """Integer keys with the order of the float values: non-negative floats keep their bits,
    negative ones flip their magnitude bits so that more negative means smaller. NaN becomes the
    positive quiet NaN (above +inf) and -0.0 becomes +0.0 (-0.0 + 0.0 = +0.0), as torch.sort orders them."""
    s = tl.where(s != s, float("nan"), s + 0.0)
    bits = s.to(KEY_DTYPE, bitcast=True)
    return bits ^ tl.where(bits < 0, MAGNITUDE, 0)


@triton.jit
def key_values(keys, VALUE_DTYPE: tl.constexpr, MAGNITUDE: tl.constexpr):
    """The inverse of ``ordered_keys`` (the same flip undoes itself)."""
    return (keys ^ tl.where(keys < 0, MAGNITUDE, 0)).to(VALUE_DTYPE, bitcast=True)


@triton.autotune(configs=_CONFIGS, key=["D", "K_PAD", "HAS_KEYS", "EXCLUDE_DIAGONAL"])
@triton.jit
def _topk_kernel(x_ptr, y_ptr, scale_ptr, row_keys, col_keys, values_ptr, cols_ptr, M, N, D, K,
                 HAS_KEYS: tl.constexpr, EXCLUDE_DIAGONAL: tl.constexpr, K_PAD: tl.constexpr,
                 KEY_DTYPE: tl.constexpr, MAGNITUDE: tl.constexpr, SENTINEL: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_m = offs_m < M
    scale = tl.load(scale_ptr)
    slot = tl.arange(0, K_PAD)[None, :]
    # The running set: K_PAD slots per row, unsorted. Empty slots hold the sentinel with distinct
    # columns past N, so that "the worst slot" (lowest key, then highest column) is always defined.
    run_keys = tl.full((BLOCK_A, K_PAD), SENTINEL, KEY_DTYPE)
    run_cols = tl.zeros((BLOCK_A, K_PAD), tl.int32) + N + slot
    worst_key = tl.full((BLOCK_A,), SENTINEL, KEY_DTYPE)
    worst_col = tl.zeros((BLOCK_A,), tl.int32) + N + K_PAD - 1
    worst_slot = tl.zeros((BLOCK_A,), tl.int32) + K_PAD - 1
    no_col = N + K_PAD  # above every column and slot column
    for n0 in range(0, N, BLOCK_B):
        offs_n = n0 + tl.arange(0, BLOCK_B)
        mask_n = offs_n < N
        s = _logits_tile(x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, scale, BLOCK_A, BLOCK_B, BLOCK_D,
                         PRECISION)
        keys = ordered_keys(s, KEY_DTYPE, MAGNITUDE)
        cols = tl.zeros((BLOCK_A, BLOCK_B), tl.int32) + offs_n[None, :]
        excluded = ~(mask_m[:, None] & mask_n[None, :])
        if HAS_KEYS:
            row_key = tl.load(row_keys + offs_m, mask=mask_m, other=0)
            col_key = tl.load(col_keys + offs_n, mask=mask_n, other=0)
            excluded = excluded | (row_key[:, None] == col_key[None, :])
        if EXCLUDE_DIAGONAL:
            excluded = excluded | (offs_m[:, None] == offs_n[None, :])
        # Only entries that beat their row's current worst can ever enter (the worst only rises),
        # and at most K_PAD of them per row: drop the rest now and run that many insertion rounds.
        beats = (keys > worst_key[:, None]) | ((keys == worst_key[:, None]) & (cols < worst_col[:, None]))
        beats = beats & ~excluded
        keys = tl.where(beats, keys, SENTINEL)
        rounds = tl.max(tl.minimum(tl.sum(beats.to(tl.int32), 1), K_PAD), 0)
        for _ in range(rounds):
            best = tl.max(keys, 1)
            best_col = tl.min(tl.where(keys == best[:, None], cols, no_col), 1)
            enters = (best > SENTINEL) & ((best > worst_key) | ((best == worst_key) & (best_col < worst_col)))
            hit = enters[:, None] & (slot == worst_slot[:, None])
            run_keys = tl.where(hit, best[:, None], run_keys)
            run_cols = tl.where(hit, best_col[:, None], run_cols)
            keys = tl.where(cols == best_col[:, None], SENTINEL, keys)
            worst_key = tl.min(run_keys, 1)
            worst_col = tl.max(tl.where(run_keys == worst_key[:, None], run_cols, -1), 1)
            worst_slot = tl.min(tl.where((run_keys == worst_key[:, None]) & (run_cols == worst_col[:, None]),
                                         slot, K_PAD), 1)
    # Put the first K in order: the best remaining slot (ties: lower column) each round.
    out = offs_m.to(tl.int64) * K
    for r in range(0, K):
        best = tl.max(run_keys, 1)
        best_col = tl.min(tl.where(run_keys == best[:, None], run_cols, no_col), 1)
        tl.store(values_ptr + out + r, key_values(best, scale.dtype, MAGNITUDE), mask=mask_m)
        tl.store(cols_ptr + out + r, best_col.to(tl.int64), mask=mask_m)
        run_keys = tl.where(run_cols == best_col[:, None], SENTINEL, run_keys)
        run_cols = tl.where(run_cols == best_col[:, None], no_col, run_cols)


@quiet_under_interpreter
def topk(x, y, scale, k: int, row_keys, col_keys, exclude_diagonal: bool):
    """-> (values [M, k] in the math dtype, columns [M, k] int64); the caller has checked k and that
    every row has at least k eligible columns."""
    if INTERPRET and x.dtype == torch.bfloat16:  # numpy has no bfloat16: the same values in float32
        x, y = x.float(), y.float()
    x, y = x.contiguous(), y.contiguous()
    (m, d), n = x.shape, y.shape[0]
    wide = x.dtype == torch.float64
    acc = torch.float64 if wide else torch.float32
    values = x.new_empty((m, k), dtype=acc)
    cols = x.new_empty((m, k), dtype=torch.int64)
    if m == 0 or k == 0:
        return values, cols
    if k > MAX_K:
        raise ValueError(f"the triton top-k keeps k <= {MAX_K} entries per row in registers, got k={k}")
    if n + triton.next_power_of_2(k) >= 2**31:
        raise ValueError(f"the triton top-k indexes columns with int32, got N={n}")
    block_d = min(triton.next_power_of_2(max(d, 16)), 128 if INTERPRET else GPU_BLOCK_D)
    dummy = x  # Triton needs a pointer even where HAS_KEYS is off; the kernel never reads it then
    _topk_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_A"]),)](
        x, y, scale.to(device=x.device, dtype=acc), dummy if row_keys is None else row_keys.contiguous(),
        dummy if col_keys is None else col_keys.contiguous(), values, cols, m, n, d, k,
        HAS_KEYS=row_keys is not None, EXCLUDE_DIAGONAL=exclude_diagonal, K_PAD=triton.next_power_of_2(k),
        KEY_DTYPE=tl.int64 if wide else tl.int32, MAGNITUDE=2**63 - 1 if wide else 2**31 - 1,
        SENTINEL=-(2**63) if wide else -(2**31), BLOCK_D=block_d, PRECISION=dot_precision(x.dtype))
    return values, cols
