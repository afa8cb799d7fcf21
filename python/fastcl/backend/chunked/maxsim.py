"""The ``chunked`` backend's ``maxsim`` kernels (see ``backend/maxsim.py``): plain PyTorch tiles, any device.

A tile is a block of ``bq`` queries against a block of ``bn`` documents: one GEMM
``q_block [bq*Lq, D] @ d_block [bn*Ld, D].T`` gives the token similarities ``[bq, Lq, bn, Ld]``
of that block only. Forward reduces them to the block's scores; backward recomputes them, marks
the winning document token of every (query token, document) pair with ``torch.argmax`` (the
first maximal index: the tie rule), weights the marks by ``g_ij`` and feeds two more GEMMs,
``W @ d_block`` (dq) and ``W.T @ q_block`` (dd). Tiles are visited in a fixed order, so the sums
are deterministic on any device, without scatter atomics. Peak extra memory is a few tiles of
``TILE_ELEMENTS`` (at least one query against one document).
"""
from __future__ import annotations

import math

import torch

# Token similarities held per tile; backward makes ~3 same-sized temporaries (similarities, the
# argmax marks, their weights), so this keeps a pass within a few tens of MiB in float32.
TILE_ELEMENTS = 1 << 20


def _blocks(b: int, n: int, lq: int, ld: int) -> tuple[int, int]:
    """(queries, documents) per tile: about as many query tokens as document tokens (a square GEMM
    uses the cores best), within ``TILE_ELEMENTS``."""
    edge = max(1, math.isqrt(TILE_ELEMENTS))
    bn = max(1, min(n, edge // max(1, ld)))
    bq = max(1, min(b, TILE_ELEMENTS // max(1, lq * ld * bn)))
    return bq, bn


def _similarities(q, d, q_mask, d_mask, qs: slice, ds: slice) -> torch.Tensor:
    """``[bq, Lq, bn, Ld]`` token similarities of one tile, padding document tokens at ``-inf``."""
    qb, db = q[qs], d[ds]
    sim = (qb.reshape(-1, qb.shape[-1]) @ db.reshape(-1, db.shape[-1]).T).view(
        qb.shape[0], qb.shape[1], db.shape[0], db.shape[1])
    if d_mask is not None:
        sim.masked_fill_(~d_mask[ds][None, None], float("-inf"))
    return sim


def maxsim_forward(q, d, q_mask, d_mask) -> torch.Tensor:
    (b, lq, _), (n, ld, _) = q.shape, d.shape
    s = q.new_empty((b, n))
    bq, bn = _blocks(b, n, lq, ld)
    for q0 in range(0, b, bq):
        qs = slice(q0, min(b, q0 + bq))
        for n0 in range(0, n, bn):
            ds = slice(n0, min(n, n0 + bn))
            best = _similarities(q, d, q_mask, d_mask, qs, ds).amax(-1)  # [bq, Lq, bn]
            if q_mask is not None:  # where, not a product: a padding token facing an empty document is -inf
                best = torch.where(q_mask[qs][:, :, None], best, 0.0)
            s[qs, ds] = best.sum(1)
    return s


def maxsim_backward(q, d, q_mask, d_mask, g, need_q: bool, need_d: bool):
    (b, lq, dim), (n, ld, _) = q.shape, d.shape
    dq = torch.zeros_like(q) if need_q else q.new_empty(0)
    dd = torch.zeros_like(d) if need_d else d.new_empty(0)
    if not (need_q or need_d):
        return dq, dd
    bq, bn = _blocks(b, n, lq, ld)
    tokens = torch.arange(ld, device=q.device)
    for q0 in range(0, b, bq):
        qs = slice(q0, min(b, q0 + bq))
        for n0 in range(0, n, bn):
            ds = slice(n0, min(n, n0 + bn))
            sim = _similarities(q, d, q_mask, d_mask, qs, ds)
            winner = sim.argmax(-1, keepdim=True)  # [bq, Lq, bn, 1], ties to the lowest token
            # W[i, a, j, t] = g_ij where t is (i, a, j)'s winner, a is real and t is real (an empty
            # document's argmax points at padding, which must not receive anything)
            w = torch.where(tokens == winner, g[qs][:, None, ds, None], 0.0)
            if q_mask is not None:
                w.mul_(q_mask[qs][:, :, None, None])
            if d_mask is not None:
                w.mul_(d_mask[ds][None, None])
            w = w.view(w.shape[0] * lq, w.shape[2] * ld)
            if need_q:
                dq[qs] += (w @ d[ds].reshape(-1, dim)).view(-1, lq, dim)
            if need_d:
                dd[ds] += (w.T @ q[qs].reshape(-1, dim)).view(-1, ld, dim)
    return dq, dd
