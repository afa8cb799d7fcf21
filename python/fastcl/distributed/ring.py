"""The ring: column blocks travel from rank to rank, each rank meets every block with its own rows.

At step ``k`` rank ``r`` holds the block of owner ``q = (r - k) mod W``. While it computes on that
block, the block is already on its way to rank ``r + 1`` and the next one arriving from ``r - 1``
(``batch_isend_irecv``), so transfer overlaps computation. Row statistics are merged as blocks
arrive (``logaddexp``), so a rank holds its own block plus at most two in flight: memory
``O(N_local * D)`` whatever the world size.

Backward (Inf-CL's scheme): the blocks travel again, each with a gradient accumulator for its
owner. A rank adds its ``G.T @ x_local`` to the accumulator of the block at hand and passes both on;
after a full turn the accumulator comes home holding the owner's gradient from every rank. The
rows' own gradient ``G @ y_block`` stays local. The accumulator travels one step behind the
block and overlaps the next block's computation.

The kernels are the engine's raw ``Kernels`` (``lse_forward``, ``lse_backward``, ``pointwise``) on
one block at a time; keys carry global ids (a block from owner ``q`` has ``col_keys + (q - r) * stride``)
so self-exclusion, DCL's sample keys and SigLIP's positives land on the right block.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ..backend.primitives import POINTWISE_KINDS, _finite_shift, _math_inputs
from .comm import Context

_BLOCK_TAG, _GRAD_TAG = 17, 18


class Ring:
    def __init__(self, ctx: Context):
        self.ctx, self.world, self.rank = ctx, ctx.world, ctx.rank
        self.next = ctx.global_peer((ctx.rank + 1) % ctx.world)
        self.prev = ctx.global_peer((ctx.rank - 1) % ctx.world)

    def owner(self, step: int) -> int:
        return (self.rank - step) % self.world

    def _shift(self, send: torch.Tensor, recv: torch.Tensor, tag: int):
        ops = [dist.P2POp(dist.isend, send, self.next, self.ctx.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev, self.ctx.group, tag)]
        return dist.batch_isend_irecv(ops)

    def turn(self, block: torch.Tensor, visit: Callable[[torch.Tensor, int], torch.Tensor | None],
             grads: bool = False) -> torch.Tensor | None:
        """Call ``visit(block_of_q, q)`` for every owner ``q``, our own block first. With ``grads``,
        ``visit`` returns the gradient it adds to that block, and the owner's total comes back:
        the return value is our own block's gradient summed over every rank's visit."""
        block = block.contiguous()
        # Two receive buffers per stream, used in turn (never the caller's block): a fixed set of
        # buffers whatever the world size, so the allocator sees no churn (a fresh buffer per step
        # would leave glibc's heap growing with the number of steps).
        block_bufs = [torch.empty_like(block) for _ in range(2)] if self.world > 1 else []
        acc_bufs: list[torch.Tensor] = []
        pending_acc, acc = None, None
        for step in range(self.world):
            last = step == self.world - 1
            if not last:  # the next block is on its way while we compute on this one
                incoming = block_bufs[step % 2]
                block_reqs = self._shift(block, incoming, _BLOCK_TAG)
            contribution = visit(block, self.owner(step))
            if grads:
                if pending_acc is not None:
                    for req in pending_acc:
                        req.wait()
                    contribution = acc.add_(contribution)
                if self.world == 1:
                    acc = contribution
                else:
                    if not acc_bufs:
                        acc_bufs = [torch.empty_like(contribution) for _ in range(2)]
                    acc = acc_bufs[step % 2]
                    # after the last visit the accumulator goes home: r + 1 owns the block we hold
                    pending_acc = self._shift(contribution.contiguous(), acc, _GRAD_TAG)
            if not last:
                for req in block_reqs:
                    req.wait()
                block = incoming
        if not grads:
            return None
        if pending_acc is not None:
            for req in pending_acc:
                req.wait()
        return acc


def _block_keys(keys, owner: int, rank: int, stride: int):
    if keys is None or owner == rank:
        return keys
    return keys + (owner - rank) * stride


def _scaled(g: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return g.mul_(scale).to(like.dtype)


class RingLSE(torch.autograd.Function):
    """Row log-sum-exp of ``scale * x @ Y_global.T`` over non-keyed pairs; ``y`` is this rank's block."""

    @staticmethod
    def forward(ctx, ring: Ring, kernels, x, y, scale, row_keys, col_keys, stride: int):
        xa, ya = _math_inputs(x, y)
        row_lse = xa.new_full((xa.shape[0],), float("-inf"))

        def visit(block, owner):
            lse, _ = kernels.lse_forward(xa, block, scale, row_keys, _block_keys(col_keys, owner, ring.rank, stride),
                                         True, False)
            torch.logaddexp(row_lse, lse, out=row_lse)

        ring.turn(ya, visit)
        ctx.save_for_backward(x, y, scale, row_keys, col_keys, row_lse)
        ctx.ring, ctx.kernels, ctx.stride = ring, kernels, stride
        return row_lse

    @staticmethod
    def backward(ctx, g_row):
        x, y, scale, row_keys, col_keys, row_lse = ctx.saved_tensors
        ring, kernels = ctx.ring, ctx.kernels
        xa, ya = _math_inputs(x, y)
        shift, g_row, none = _finite_shift(row_lse), g_row.contiguous().to(xa.dtype), xa.new_empty(0)
        gy_total = torch.zeros_like(xa)

        def visit(block, owner):
            keys = _block_keys(col_keys, owner, ring.rank, ctx.stride)
            gy, gx = kernels.lse_backward(xa, block, scale, row_keys, keys, shift, none, g_row, none, True, False)
            gy_total.add_(gy)
            return gx

        gx_own = ring.turn(ya, visit, grads=True)
        need = ctx.needs_input_grad
        dscale = torch.dot(gy_total.reshape(-1), xa.reshape(-1)).to(scale.dtype) if need[4] else None
        return (None, None, _scaled(gy_total, scale, x) if need[2] else None,
                _scaled(gx_own, scale, y) if need[3] else None, dscale, None, None, None)


class RingPointwise(torch.autograd.Function):
    """``sum_j loss(scale <x_i, y_j> + row_bias_i)`` over global columns, per row or in total.

    In total (``reduce``) the gradients are computed in the forward turn (one scalar upstream
    gradient), blocks and accumulators travelling together; backward only rescales. Per row,
    backward makes a second turn with the rows' upstream gradients."""

    @staticmethod
    def forward(ctx, ring: Ring, kernels, kind: str, reduce: bool, x, y, scale, row_bias, row_keys, col_keys,
                stride: int):
        xa, ya = _math_inputs(x, y)
        bias = None if row_bias is None else row_bias.to(xa.dtype).contiguous()
        code = POINTWISE_KINDS[kind]
        need = ctx.needs_input_grad[4:8]
        want = reduce and any(need)
        row_sum = xa.new_zeros(xa.shape[0])
        gy_total = torch.zeros_like(xa) if want else None
        d_bias = xa.new_zeros(xa.shape[0]) if want else None

        def visit(block, owner):
            s, gy, gx, db = kernels.pointwise(xa, block, scale, bias, row_keys,
                                              _block_keys(col_keys, owner, ring.rank, stride), code, None, want)
            row_sum.add_(s)
            if want:
                gy_total.add_(gy)
                d_bias.add_(db)
                return gx
            return None

        gx_own = ring.turn(ya, visit, grads=want)
        ctx.ring, ctx.kernels, ctx.code, ctx.reduce, ctx.stride = ring, kernels, code, reduce, stride
        if reduce:
            ctx.save_for_backward(*_pair_grads(x, y, xa, scale, gy_total, gx_own, d_bias, need) if want else ())
            return row_sum.sum()
        ctx.save_for_backward(x, y, scale, row_bias, row_keys, col_keys)
        return row_sum

    @staticmethod
    def backward(ctx, g):
        need = ctx.needs_input_grad[4:8]
        if ctx.reduce:
            grads = [None if t is None or t.numel() == 0 else t * g.to(t.dtype) for t in ctx.saved_tensors]
        else:
            x, y, scale, row_bias, row_keys, col_keys = ctx.saved_tensors
            ring, kernels = ctx.ring, ctx.kernels
            xa, ya = _math_inputs(x, y)
            bias = None if row_bias is None else row_bias.to(xa.dtype).contiguous()
            g_row = g.contiguous().to(xa.dtype)
            gy_total, d_bias = torch.zeros_like(xa), xa.new_zeros(xa.shape[0])

            def visit(block, owner):
                _, gy, gx, db = kernels.pointwise(xa, block, scale, bias, row_keys,
                                                  _block_keys(col_keys, owner, ring.rank, ctx.stride), ctx.code,
                                                  g_row, True)
                gy_total.add_(gy)
                d_bias.add_(db)
                return gx

            gx_own = ring.turn(ya, visit, grads=True)
            grads = _pair_grads(x, y, xa, scale, gy_total, gx_own, d_bias, need)
        grads = [None if t is None or not wanted else t for t, wanted in zip(grads, need)]
        return (None, None, None, None, *grads, None, None, None)


def _pair_grads(x, y, xa, scale, gy, gx, d_bias, need):
    """dx, dy, dscale, d_bias from ``gy = G @ Y`` and ``gx`` (our block's ``G.T @ X`` over all ranks)."""
    dscale = torch.dot(gy.reshape(-1), xa.reshape(-1)).to(scale.dtype) if need[2] else None
    dx = _scaled(gy, scale, x) if need[0] else None
    dy = _scaled(gx, scale, y) if need[1] and gx is not None else None
    return dx, dy, dscale, d_bias if need[3] else None


class RingTake(torch.autograd.Function):
    """``Y_global[index]`` (rows by global index, ``[M, D]``) without gathering ``Y``: each rank
    picks its rows as the blocks pass; backward sends the row gradients home in the accumulators."""

    @staticmethod
    def forward(ctx, ring: Ring, y, index):
        n = y.shape[0]
        out = y.new_empty((index.shape[0], *y.shape[1:]))

        def visit(block, owner):
            hit = (index >= owner * n) & (index < (owner + 1) * n)
            out[hit] = block[index[hit] - owner * n]

        ring.turn(y, visit)
        ctx.ring, ctx.n = ring, n
        ctx.save_for_backward(index)
        return out

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        ring, n = ctx.ring, ctx.n
        g = g.contiguous()

        def visit(block, owner):
            hit = (index >= owner * n) & (index < (owner + 1) * n)
            return g.new_zeros((n, *g.shape[1:])).index_add_(0, index[hit] - owner * n, g[hit])

        # nothing needs to travel but the accumulators: an empty stand-in block keeps the schedule
        return None, ring.turn(g.new_empty(0), visit, grads=True), None
