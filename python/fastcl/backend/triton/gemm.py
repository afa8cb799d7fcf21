"""The gradient GEMMs: ``out[p, :] (+)= sum_k G[p, k] f[k, :]`` for a block of the gradient tile G
in the workspace. ``G @ y`` reads G row-major; ``G.T @ x`` reads the same block with its strides
swapped, so no transposed copy exists.

Each program owns a ``BLOCK_M x BLOCK_N`` tile of ``out`` and walks the whole reduction, so every
output element is written by one program, after adding what an earlier block left there
(``ACCUMULATE``): no atomics, block order fixed by the host, deterministic results.
Operands: bfloat16 G with bfloat16 features on the 16-bit tensor cores; float32 G with float32
features per ``tiles.dot_precision``; float32 G with float16 features widened and multiplied as
TF32 (float16 cannot hold G of a mean loss, about 1 / (M N)); float64 in IEEE float64.
Accumulators and ``out`` are float32 (float64 for float64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import plan, tiles

_CONFIGS = tiles.gemm_configs()


# restore_value: timing a candidate runs the kernel repeatedly, and it adds into ``out``.
# cols_g is specialised: Triton compiles the kernel once for cols_g % 16 == 0 (every block but the
# matrix's last column block when N % 16 != 0, which gets a second variant; N == 1 a third, as Triton
# makes an int equal to 1 a constant). It is G's row stride and, in both layouts, the extent along
# G's contiguous dimension (the mask there): knowing it a multiple of 16 lets each thread copy G
# with 16-byte async copies instead of 16 scalar loads and shared stores per k-step
# (tests/test_triton_sass.py). rows_g and accumulate gain nothing from it: run-time values.
@triton.autotune(configs=_CONFIGS, key=["D", "TRANSPOSED", "WINDOW"],
                 prune_configs_by={"early_config_prune": tiles.prune_gemms}, restore_value=["out_ptr"])
@triton.jit(do_not_specialize=["rows_g", "accumulate"])
def _gemm_kernel(f_ptr, g_ptr, out_ptr, rows_g, cols_g, D, W, accumulate, TRANSPOSED: tl.constexpr,
                 WINDOW: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """G is the row-major ``[rows_g, cols_g]`` block at g_ptr; the product is ``G @ f`` (P = rows_g
    output rows, K = cols_g), or ``G.T @ f`` if TRANSPOSED (G[p, k] is ``g_ptr[k * cols_g + p]``,
    P = cols_g, K = rows_g): the layout decides the loads, so it is compiled in; ``accumulate`` is a
    run-time flag. f and out are rows D elements apart; the product covers all D columns (BLOCK_N
    divides D), or, if WINDOW, the first W of the rows at f_ptr and out_ptr (``lse_prefixes``' feature
    segments: masked columns; W specialised like D, so a window of a multiple of 16 columns keeps the
    16-byte copies). WINDOW is compiled in: the full-width kernel's code does not carry the column
    mask. Programs run along the columns fastest, so neighbours share their rows of G in L2."""
    if TRANSPOSED:
        P, K = cols_g, rows_g
    else:
        P, K = rows_g, cols_g
    if WINDOW:
        tiles_n = tl.cdiv(W, BLOCK_N)
    else:
        tiles_n = D // BLOCK_N
    pid = tl.program_id(0)
    offs_p = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_p = offs_p < P
    if WINDOW:
        mask_out = mask_p[:, None] & (offs_n < W)[None, :]
        mask_f = (offs_n < W)[None, :]
    else:
        mask_out = mask_p[:, None]
        mask_f = None
    if TRANSPOSED:
        g_tile = g_ptr + offs_p[:, None] + offs_k.to(tl.int64)[None, :] * cols_g
        g_step = BLOCK_K * cols_g.to(tl.int64)
    else:
        g_tile = g_ptr + offs_p.to(tl.int64)[:, None] * cols_g + offs_k[None, :]
        g_step = BLOCK_K
    f_tile = f_ptr + offs_k.to(tl.int64)[:, None] * D + offs_n[None, :]
    out = out_ptr + offs_p.to(tl.int64)[:, None] * D + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
    if accumulate:
        acc += tl.load(out, mask=mask_out, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        g = tl.load(g_tile, mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        if WINDOW:
            f = tl.load(f_tile, mask=mask_k[:, None] & mask_f, other=0.0)
        else:
            f = tl.load(f_tile, mask=mask_k[:, None], other=0.0)
        if f.dtype == tl.float16:
            acc = tl.dot(g, f.to(tl.float32), acc, input_precision="tf32", out_dtype=acc.dtype)
        elif f.dtype == tl.bfloat16:
            acc = tl.dot(g, f, acc, out_dtype=acc.dtype)
        else:
            acc = tl.dot(g, f, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        g_tile += g_step
        f_tile += BLOCK_K * D
    tl.store(out, acc, mask=mask_out)


def accumulate_product(out: torch.Tensor, g: torch.Tensor, transposed: bool, f: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= G @ f`` with G ``[out rows, f rows]`` packed row-major in ``g``, or, if
    ``transposed``, ``out (+)= G.T @ f`` with G ``[f rows, out rows]`` (see the kernel). ``out`` and
    ``f`` are contiguous rows, or column windows of them with the same row stride."""
    (p, d), k = out.shape, f.shape[0]
    if p == 0 or d == 0:
        return
    if k == 0:
        if not accumulate:
            out.zero_()
        return
    stride = out.stride(0) if p > 1 else f.stride(0)
    assert out.stride(1) == f.stride(1) == 1 and f.shape[1] == d and (k == 1 or f.stride(0) == stride)
    window = d != stride
    block_n = plan.gemm_block_n(plan.padded_features(d), f.dtype, tiles.INTERPRET)
    rows_g, cols_g = (k, p) if transposed else (p, k)
    _gemm_kernel[lambda meta: (triton.cdiv(p, meta["BLOCK_M"]) * triton.cdiv(d, block_n),)](
        f, g, out, rows_g, cols_g, stride, d, int(accumulate), TRANSPOSED=transposed, WINDOW=window,
        PRECISION=tiles.dot_precision(f.dtype), BLOCK_N=block_n)


def gradient_products(g: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int], x: torch.Tensor,
                      y: torch.Tensor, gy: torch.Tensor, gx: torch.Tensor) -> None:
    """For the G block of S[rows, cols] (packed row-major in ``g``):
    ``gy[rows] (+)= G @ y[cols]`` and ``gx[cols] (+)= G.T @ x[rows]``; the first block of a row
    (column) range writes, later ones add."""
    (r0, r1), (c0, c1) = rows, cols
    accumulate_product(gy[r0:r1], g, False, y[c0:c1], accumulate=c0 > 0)
    accumulate_product(gx[c0:c1], g, True, x[r0:r1], accumulate=r0 > 0)
