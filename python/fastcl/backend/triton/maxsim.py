"""MaxSim scores and their gradients in Triton (see ``backend/maxsim.py`` for the contract).

Every kernel is built on ``_segment_max``: for one query ``i``, a block of its tokens and one
document ``j``, the token-similarity tiles ``q_i[a-block] @ d_j[t-block].T`` (one ``tl.dot`` per
feature block) reduced on the fly to each query token's maximum over ``j``'s real tokens and the
first token reaching it (the tie rule), never leaving registers.

- forward, one program per (query, document): ``s_ij`` = the sum of the real query tokens' maxima;
- ``dq``, one program per (query, query-token block): over every document, recompute the winners
  and add ``g_ij d_{j,t*}`` (a gather) into the program's own rows of ``dq``;
- ``dd``, one program per document: over every query, recompute the winners and add
  ``W.T @ q_i`` into the program's own ``dd_j``, ``W[a, t] = g_ij [t = t*(a)]`` (the scatter as a
  small dot, since two query tokens may pick the same document token).
Each program owns the rows it writes and visits the others in a fixed order: no atomics,
deterministic results. Work: the similarity GEMM once forward, twice in backward (``dq``, ``dd``)
plus ``dd``'s scatter dot: 4 GEMM-equivalents of ``[B*Lq, D] x [D, N*Ld]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import INTERPRET, dot_precision, quiet_under_interpreter

# Largest (BLOCK_A, BLOCK_T, BLOCK_D) and warps of a GPU launch: the largest blocks with which all
# three kernels compile without register spills for sm_80 and sm_90 in float32 (3xTF32) (float64:
# the forward spills 24 B on sm_80; tests/test_triton_aot.py reads the cubins). The interpreter pays
# per program step, not per register: there the blocks only cap at 128.
GPU_BLOCKS, GPU_WARPS = (32, 64, 32), 8


@triton.jit
def _segment_max(q_ptr, d_ptr, d_mask_ptr, i, j, offs_a, mask_a, Lq, Ld, D,
                 HAS_D_MASK: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """(max, first argmax) over document j's real tokens of each query token in ``offs_a``:
    ``[BLOCK_A]`` each; -inf and ``Ld`` (no token) where j has no real token."""
    best = tl.full((BLOCK_A,), float("-inf"), ACC)
    arg = tl.full((BLOCK_A,), Ld, tl.int32)
    q_rows = q_ptr + (i * Lq + offs_a).to(tl.int64)[:, None] * D
    for t0 in range(0, Ld, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        real_t = offs_t < Ld
        if HAS_D_MASK:
            real_t = real_t & (tl.load(d_mask_ptr + j * Ld + offs_t, mask=offs_t < Ld, other=0) != 0)
        d_cols = d_ptr + (j * Ld + offs_t).to(tl.int64)[None, :] * D  # read transposed: [BLOCK_D, BLOCK_T]
        sim = tl.zeros((BLOCK_A, BLOCK_T), dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            a = tl.load(q_rows + offs_d[None, :], mask=mask_a[:, None] & (offs_d[None, :] < D), other=0.0)
            b = tl.load(d_cols + offs_d[:, None], mask=(offs_d[:, None] < D) & (offs_t[None, :] < Ld), other=0.0)
            sim = tl.dot(a, b, sim, input_precision=PRECISION, out_dtype=ACC)
        sim = tl.where(real_t[None, :], sim, float("-inf"))
        tile_best = tl.max(sim, 1)
        tile_arg = tl.min(tl.where(sim == tile_best[:, None], offs_t[None, :], Ld), 1)
        better = tile_best > best  # strict: an equal maximum in a later block keeps the earlier token
        arg = tl.where(better, tile_arg, arg)
        best = tl.where(better, tile_best, best)
    return best, arg


@triton.jit
def _real_query_tokens(q_mask_ptr, i, offs_a, Lq, HAS_Q_MASK: tl.constexpr):
    real = offs_a < Lq
    if HAS_Q_MASK:
        real = real & (tl.load(q_mask_ptr + i * Lq + offs_a, mask=offs_a < Lq, other=0) != 0)
    return real


@triton.jit
def _forward_kernel(q_ptr, d_ptr, q_mask_ptr, d_mask_ptr, s_ptr, N, Lq, Ld, D,
                    HAS_Q_MASK: tl.constexpr, HAS_D_MASK: tl.constexpr, BLOCK_A: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    i, j = tl.program_id(0), tl.program_id(1)
    total = tl.zeros((BLOCK_A,), dtype=ACC)
    for a0 in range(0, Lq, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)
        best, _ = _segment_max(q_ptr, d_ptr, d_mask_ptr, i, j, offs_a, offs_a < Lq, Lq, Ld, D, HAS_D_MASK,
                               BLOCK_A, BLOCK_T, BLOCK_D, PRECISION, ACC)
        total += tl.where(_real_query_tokens(q_mask_ptr, i, offs_a, Lq, HAS_Q_MASK), best, 0.0)
    tl.store(s_ptr + N.to(tl.int64) * i + j, tl.sum(total, 0))


@triton.jit
def _dq_kernel(q_ptr, d_ptr, q_mask_ptr, d_mask_ptr, g_ptr, dq_ptr, N, Lq, Ld, D,
               HAS_Q_MASK: tl.constexpr, HAS_D_MASK: tl.constexpr, BLOCK_A: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    i = tl.program_id(0)
    offs_a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    real_a = _real_query_tokens(q_mask_ptr, i, offs_a, Lq, HAS_Q_MASK)
    dq_rows = dq_ptr + (i * Lq + offs_a).to(tl.int64)[:, None] * D
    for j in range(0, N):
        g = tl.load(g_ptr + N.to(tl.int64) * i + j)
        best, arg = _segment_max(q_ptr, d_ptr, d_mask_ptr, i, j, offs_a, offs_a < Lq, Lq, Ld, D, HAS_D_MASK,
                                 BLOCK_A, BLOCK_T, BLOCK_D, PRECISION, ACC)
        won = real_a & (best > float("-inf")) & (arg < Ld)  # no winner: padding query token, empty document
        d_rows = d_ptr + (j * Ld + arg).to(tl.int64)[:, None] * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            inside = won[:, None] & (offs_d[None, :] < D)
            picked = tl.load(d_rows + offs_d[None, :], mask=inside, other=0.0).to(ACC)
            keep = (offs_a[:, None] < Lq) & (offs_d[None, :] < D)
            current = tl.load(dq_rows + offs_d[None, :], mask=keep, other=0.0)
            tl.store(dq_rows + offs_d[None, :], current + g * picked, mask=keep)


@triton.jit
def _dd_kernel(q_ptr, d_ptr, q_mask_ptr, d_mask_ptr, g_ptr, dd_ptr, B, N, Lq, Ld, D,
               HAS_Q_MASK: tl.constexpr, HAS_D_MASK: tl.constexpr, BLOCK_A: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    j = tl.program_id(0)
    for i in range(0, B):
        g = tl.load(g_ptr + N.to(tl.int64) * i + j)
        for a0 in range(0, Lq, BLOCK_A):
            offs_a = a0 + tl.arange(0, BLOCK_A)
            best, arg = _segment_max(q_ptr, d_ptr, d_mask_ptr, i, j, offs_a, offs_a < Lq, Lq, Ld, D, HAS_D_MASK,
                                     BLOCK_A, BLOCK_T, BLOCK_D, PRECISION, ACC)
            won = _real_query_tokens(q_mask_ptr, i, offs_a, Lq, HAS_Q_MASK) & (best > float("-inf")) & (arg < Ld)
            q_rows = q_ptr + (i * Lq + offs_a).to(tl.int64)[:, None] * D
            for t0 in range(0, Ld, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                w = tl.where(won[:, None] & (offs_t[None, :] == arg[:, None]), g, 0.0).to(ACC)  # [BLOCK_A, BLOCK_T]
                dd_rows = dd_ptr + (j * Ld + offs_t).to(tl.int64)[:, None] * D
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    qa = tl.load(q_rows + offs_d[None, :], mask=(offs_a[:, None] < Lq) & (offs_d[None, :] < D),
                                 other=0.0)
                    keep = (offs_t[:, None] < Ld) & (offs_d[None, :] < D)
                    current = tl.load(dd_rows + offs_d[None, :], mask=keep, other=0.0)
                    scattered = tl.dot(tl.trans(w), qa.to(ACC), current, input_precision=PRECISION, out_dtype=ACC)
                    tl.store(dd_rows + offs_d[None, :], scattered, mask=keep)


def _launch_constants(q, d, q_mask, d_mask) -> dict:
    (_, lq, dim), ld = q.shape, d.shape[1]
    cap_a, cap_t, cap_d = (128, 128, 128) if INTERPRET else GPU_BLOCKS
    return dict(HAS_Q_MASK=q_mask is not None, HAS_D_MASK=d_mask is not None,
                BLOCK_A=min(cap_a, triton.next_power_of_2(max(lq, 16))),
                BLOCK_T=min(cap_t, triton.next_power_of_2(max(ld, 16))),
                BLOCK_D=min(cap_d, triton.next_power_of_2(max(dim, 16))),
                PRECISION=dot_precision(q.dtype), ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
                num_warps=GPU_WARPS)


def _masks(q, d, q_mask, d_mask):
    """int8 masks (Triton reads bool pointers as bytes anyway; int8 keeps the type explicit), or a
    dummy pointer that the kernels never read."""
    def prepare(mask, like):
        return like.new_empty(1, dtype=torch.int8) if mask is None else mask.to(torch.int8).contiguous()
    return prepare(q_mask, q), prepare(d_mask, d)


@quiet_under_interpreter
def maxsim_forward(q, d, q_mask, d_mask) -> torch.Tensor:
    """``s [B, N]`` in the math dtype; q, d contiguous float32 or float64."""
    (b, lq, dim), (n, ld, _) = q.shape, d.shape
    s = q.new_empty((b, n))
    _forward_kernel[(b, n)](q, d, *_masks(q, d, q_mask, d_mask), s, n, lq, ld, dim,
                            **_launch_constants(q, d, q_mask, d_mask))
    return s


@quiet_under_interpreter
def maxsim_backward(q, d, q_mask, d_mask, g, need_q: bool, need_d: bool):
    (b, lq, dim), (n, ld, _) = q.shape, d.shape
    qm, dm = _masks(q, d, q_mask, d_mask)
    meta = _launch_constants(q, d, q_mask, d_mask)
    dq = torch.zeros_like(q) if need_q else q.new_empty(0)
    dd = torch.zeros_like(d) if need_d else d.new_empty(0)
    if need_q:
        _dq_kernel[(b, triton.cdiv(lq, meta["BLOCK_A"]))](q, d, qm, dm, g, dq, n, lq, ld, dim, **meta)
    if need_d:
        _dd_kernel[(n,)](q, d, qm, dm, g, dd, b, n, lq, ld, dim, **meta)
    return dq, dd
