"""Sums of a pointwise loss of S = scale * x @ y.T + row_bias (SigLIP, MW) and its gradients, in Triton.

Per pair, with f the loss's argument:
  kind 0, SigLIP: keyed pairs are positives (z = +1): f = -S; others f = S. Loss softplus(f),
                  d loss / dS = -sigmoid(f) on positives, sigmoid(f) otherwise.
  kind 1, MW:     keyed pairs (the targets) are excluded (loss 0, gradient 0); others f = S.
D = d loss / dS, scaled per row by g_row when it is given.

One row-parallel pass computes each row's loss sum, and with ``want_grads`` also D @ y and the row
sums of D, from every S tile formed once in registers; a column-parallel pass (the same kernel with
x and y swapped, so the row vectors lie along the tile's b side) computes D.T @ x. Every output
row is owned by one program: no atomics, deterministic. Flops as for the lse backward (see lse.py):
8 M N D with gradients for D <= 256, 2 M N D for the loss alone.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import tiles

_CONFIGS = tiles.configs([(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2)])


@triton.autotune(configs=_CONFIGS, key=["D", "KIND", "A_IS_ROW", "HAS_KEYS", "ACCUMULATE"],
                 prune_configs_by={"early_config_prune": tiles.prune_by_accumulator})
@triton.jit
def _pointwise_kernel(a_ptr, b_ptr, scale_ptr, a_keys, b_keys, bias_ptr, weight_ptr, out_ptr, loss_ptr, dsum_ptr,
                      RA, RB, D, KIND: tl.constexpr, A_IS_ROW: tl.constexpr, HAS_KEYS: tl.constexpr,
                      ACCUMULATE: tl.constexpr,
                      SUMS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """ACCUMULATE: out[a rows, chunk] = sum_b D(a, b) b[b, chunk]. SUMS (row pass only): per a row
    the loss sum, and with ACCUMULATE the sum of D, written by the programs of chunk 0.
    The row bias and weight are always read (zeros / ones when absent): two vector loads per tile
    cost less than doubling the kernel's specialisations twice over."""
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < RA
    d0 = tl.program_id(1) * BLOCK_DO
    scale = tl.load(scale_ptr)
    acc = tl.zeros((BLOCK_A, BLOCK_DO), scale.dtype)
    loss_sum = tl.zeros((BLOCK_A,), scale.dtype)
    d_sum = tl.zeros((BLOCK_A,), scale.dtype)
    for b0 in range(0, RB, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < RB
        f = tiles.logits_tile(a_ptr, b_ptr, offs_a, offs_b, mask_a, mask_b, D, scale,
                              BLOCK_A, BLOCK_B, BLOCK_D, PRECISION)
        f += tiles.side_vector(bias_ptr, offs_a, mask_a, offs_b, mask_b, A_IS_ROW)
        if HAS_KEYS:
            keyed = tiles.keyed_pairs(a_keys, b_keys, offs_a, mask_a, offs_b, mask_b)
            if KIND == 0:
                f = tl.where(keyed, -f, f)
            else:
                f = tl.where(keyed, float("-inf"), f)
        # Outside the matrix f = -inf: softplus and sigmoid are 0 there.
        f = tl.where(mask_a[:, None] & mask_b[None, :], f, float("-inf"))
        loss, g = tiles.softplus_sigmoid(f)
        if HAS_KEYS and KIND == 0:
            g = tl.where(keyed, -g, g)  # d loss / dS = -z sigmoid(f)
        g = g * tiles.side_vector(weight_ptr, offs_a, mask_a, offs_b, mask_b, A_IS_ROW)
        if SUMS:
            loss_sum += tl.sum(loss, 1)
            d_sum += tl.sum(g, 1)
        if ACCUMULATE:
            acc = tiles.accumulate_gemm(acc, g, b_ptr, offs_b, mask_b, d0, D, BLOCK_DO, PRECISION)
    if SUMS:
        if tl.program_id(1) == 0:
            tl.store(loss_ptr + offs_a, loss_sum, mask=mask_a)
            if ACCUMULATE:
                tl.store(dsum_ptr + offs_a, d_sum, mask=mask_a)
    if ACCUMULATE:
        offs_d = d0 + tl.arange(0, BLOCK_DO)
        out = out_ptr + offs_a.to(tl.int64)[:, None] * D + offs_d[None, :]
        tl.store(out, acc, mask=mask_a[:, None] & (offs_d[None, :] < D))


def _launch(a, b, scale, a_keys, b_keys, bias, weight, kind: int, a_is_row: bool, accumulate: bool, out, loss,
            dsum):
    (ra, d), rb = a.shape, b.shape[0]
    block_d, block_do = tiles.feature_blocks(d, a.dtype)
    chunks = max(1, triton.cdiv(d, block_do)) if accumulate else 1
    _pointwise_kernel[lambda meta: (triton.cdiv(ra, meta["BLOCK_A"]), chunks)](
        a, b, scale, tiles.keys_or_dummy(a_keys, a), tiles.keys_or_dummy(b_keys, a), bias, weight, out, loss, dsum,
        ra, rb, d, KIND=kind, A_IS_ROW=a_is_row, HAS_KEYS=a_keys is not None, ACCUMULATE=accumulate,
        SUMS=a_is_row, BLOCK_D=block_d, BLOCK_DO=block_do, PRECISION=tiles.dot_precision(a.dtype))


@tiles.quiet_under_interpreter
def pointwise(x, y, scale, row_bias, row_keys, col_keys, kind: int, g_row, want_grads: bool):
    """-> (row sums of the loss [M], D @ y, D.T @ x, row sums of D); the last three are empty
    unless ``want_grads``. All in the math dtype."""
    x, y = tiles.operands(x, y)
    (m, d), n = x.shape, y.shape[0]
    acc = tiles.math_dtype(x.dtype)
    scale = scale.to(device=x.device, dtype=acc)
    bias = x.new_zeros(m, dtype=acc) if row_bias is None else row_bias.to(acc).contiguous()
    weight = x.new_ones(m, dtype=acc) if g_row is None else g_row.to(acc).contiguous()
    # Empty sums where there is nothing to sum; otherwise the kernels write every element once.
    alloc = x.new_zeros if m == 0 or n == 0 else x.new_empty
    row_sum = alloc(m, dtype=acc)
    empty = x.new_empty(0, dtype=acc)
    if want_grads:
        gy, gx, d_bias = alloc((m, d), dtype=acc), alloc((n, d), dtype=acc), alloc(m, dtype=acc)
    else:
        gy, gx, d_bias = empty, empty, empty
    if m == 0 or n == 0:
        return row_sum, gy, gx, d_bias
    # ``scale`` stands in as the pointer of outputs a launch does not write
    _launch(x, y, scale, row_keys, col_keys, bias, weight, kind, True, want_grads, gy if want_grads else scale,
            row_sum, d_bias if want_grads else scale)
    if want_grads:
        _launch(y, x, scale, col_keys, row_keys, bias, weight, kind, False, True, gx, scale, scale)
    return row_sum, gy, gx, d_bias

