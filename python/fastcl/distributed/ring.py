"""The turn: this rank's rows meet every rank's columns, one node's columns at a time.

The ranks form ``K`` nodes of ``L`` ranks (``GroupWorld.node_size``) in rank order: ``allgather`` is one
node of every rank, ``ring`` is ``W`` nodes of one, ``hierarchical`` the machines. A turn has ``K``
steps. At step ``k`` the rank with local index ``l`` in node ``j`` holds the piece of rank ``l`` of
node ``q = (j - k) mod K`` (a rank's piece: all its column tensors packed in one buffer), and the
node all-gathers its pieces (fast links), so every rank holds node ``q``'s columns and meets them
with its own rows. While it computes, the piece is already on its way to the same local rank of
the next node and the next one is arriving (``batch_isend_irecv``): cross-node transfer overlaps
computation and each link carries one block per node. A rank holds one node's columns, the piece
at hand and the one arriving (and two accumulators): memory ``O(L * N_local * D)``, the node-local
gather's, plus ``O(N_local * D)`` for the ring.

Accumulators (Inf-CL's scheme for gradients): what the visits add to a piece's columns (gradients,
or column log-sum-exp partials) follows the piece. The node combines its ranks' additions to its
pieces (reduce-scatter of the sum; for log-sum-exps an all-gather of the few floats a column, then
a log-sum-exp: a sum of exponentials would overflow), each rank merges its piece's share into the
accumulator at hand and passes it on, one step behind the piece (which leaves before the visit, to
overlap); after a full turn the accumulator comes home with its owner's total over every rank.

CLIP's and CWCL's two directions (``TurnLSE`` with ``cols``) are one turn over ``y``, each block of
S computed once (the kernels give a block's row and column statistics, or both its gradients, from
one pass): rather than both directions' columns travelling, only ``y`` does, half the bytes and
buffers. The price: the column statistics are a second (tiny) accumulator message a step. A block's
row terms are our rank's and its column terms its owner's; to keep each rank's ``scale`` gradient
that of its own terms (open_clip's per-rank value; DDP averages them anyway), and under
``gather_with_grad=False`` its feature gradients too, backward differentiates the other ranks'
blocks in two passes then (one when the scale is fixed).

Precision: a rank's column tensors travel packed in one buffer of bytes, each in its own dtype, so
a bfloat16 block is half a float32 block's bytes; it meets the backend's kernels as the primitives
layer prepares them (``Engine.operands``: as it is on triton and cuda, which accumulate 16-bit inputs
in float32, upcast on arrival on chunked and cpu). Statistics and gradient accumulators are in the
math dtype (float32 for 16-bit inputs), as in one process.

Keys carry global ids: the columns of group rank ``p`` have ``col_keys + (p - rank) * stride``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist

from .._checks import math_dtype
from ..backend.primitives.shared import feature_grad, scale_grad
from .comm import all_gather, reduce_scatter

_BLOCK_TAG, _GRAD_TAG = 17, 18
_NODE_GROUPS: dict[tuple[int, ...], object] = {}  # global ranks of a node -> its process group


class Ring:
    """The turn's topology in ``world`` (a ``world.GroupWorld``): this rank's node, its neighbours in
    the ring of nodes, and the node's process group."""

    def __init__(self, world):
        self.world, self.rank, self.size, self.gather_grad = world, world.rank, world.size, world.gather_grad
        self.node_size = world.node_size
        self.nodes = world.size // self.node_size
        self.node, self.local = divmod(world.rank, self.node_size)
        self.next = world.global_rank(((self.node + 1) % self.nodes) * self.node_size + self.local)
        self.prev = world.global_rank(((self.node - 1) % self.nodes) * self.node_size + self.local)
        self.node_group = self._node_group(world)

    def _node_group(self, world):
        if self.node_size in (1, world.size):
            return world.group
        members = tuple(world.global_rank(self.node * self.node_size + i) for i in range(self.node_size))
        if members not in _NODE_GROUPS:  # only the node's own ranks take part in creating it
            _NODE_GROUPS[members] = dist.new_group(list(members), use_local_synchronization=True)
        return _NODE_GROUPS[members]

    def keys(self, col_keys, stride: int | None, owner: int):
        """The keys of group rank ``owner``'s columns: global ids (``col_keys`` shifted by ``stride`` per
        rank), or with ``stride=None`` keys compared as they are (a user's document ids), ``col_keys``
        then being the list of every rank's."""
        if stride is None and col_keys is not None:
            return col_keys[owner]
        return col_keys if col_keys is None or owner == self.rank else col_keys + (owner - self.rank) * stride

    def _shift(self, send: torch.Tensor, recv: torch.Tensor, tag: int):
        ops = [dist.P2POp(dist.isend, send, self.next, self.world.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev, self.world.group, tag)]
        return dist.batch_isend_irecv(ops)

    def _node_pieces(self, piece: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """``[L, P]``: the pieces of the node's ranks (of one owner node), in rank order."""
        if out is None:
            return piece[None].expand(self.node_size, -1)
        return all_gather(piece, self.node_group, self.node_size, out)

    def _piece_grad(self, grad: torch.Tensor, lse: bool) -> torch.Tensor:
        """Our piece's share of ``grad [L, P]``, what the node's ranks add to its pieces: their sum,
        or (``lse``) their log-sum-exp, over the node's gathered partials (a few floats a column)."""
        if lse:
            return all_gather(grad, self.node_group, self.node_size)[:, self.local].logsumexp(0)
        return reduce_scatter(grad.reshape(-1), self.node_group, self.local, self.node_size, fresh=True)

    def turn(self, parts: list[torch.Tensor], visit: Callable[[list[torch.Tensor], int], list | None],
             grads: bool = False, grad_shapes=None, lse: bool = False,
             grad_dtype: torch.dtype | None = None) -> list[torch.Tensor] | None:
        """Call ``visit(columns, owner)`` with every group rank's ``parts`` (``columns[i]`` is rank
        ``owner``'s ``parts[i]``, in its own dtype), our own first. With ``grads``, ``visit`` returns
        the gradients it adds to ``columns`` (of ``grad_shapes``, default the parts' shapes), and our
        ``parts``' totals over every rank's visit come back in ``grad_dtype`` (default the math dtype
        of ``parts[0]``; ``lse``: log-sum-exps of column statistics, not sums)."""
        layout = _Layout(parts)
        grad_shapes = layout.shapes if grad_shapes is None else grad_shapes
        grad_dtype = math_dtype(parts[0].dtype) if grad_dtype is None else grad_dtype
        piece = layout.pack(parts)  # our own copy: it doubles as a receive buffer
        moving = self.nodes > 1 and layout.nbytes > 0
        # Receive buffers used in turn: a fixed set whatever the world size, so the allocator sees no
        # churn (a fresh buffer per step left glibc's heap growing with the steps).
        bufs = [torch.empty_like(piece), piece] if moving else []
        size = sum(shape.numel() for shape in grad_shapes)
        # accumulators: the one we add to and the one the previous node's arrives in (one node: the
        # node's reduced share is the total)
        empty, merge = (float("-inf"), _logaddexp) if lse else (0.0, torch.Tensor.add_)
        accs = [piece.new_full((size,), empty, dtype=grad_dtype)
                for _ in range(2 if self.nodes > 1 else self.node_size == 1)] if grads else []
        gathered = self.node_size > 1 and layout.nbytes > 0
        # the node's pieces and their gradients: one buffer each for the whole turn
        node_buf = piece.new_empty((self.node_size, piece.numel())) if gathered else None
        sink = piece.new_empty((self.node_size, size), dtype=grad_dtype) if grads and self.node_size > 1 else None
        pending, acc = None, None
        for step in range(self.nodes):
            last = step == self.nodes - 1
            if moving and not last:  # the next piece is on its way while we compute on this one
                incoming = bufs[step % 2]
                reqs = self._shift(piece, incoming, _BLOCK_TAG)
            pieces = self._node_pieces(piece, node_buf)
            if self.nodes == 1:
                piece = None  # the node's pieces hold it now
            first = (self.node - step) % self.nodes * self.node_size
            if sink is not None:
                sink.fill_(empty)
            for local in range(self.node_size):  # each rank's columns apart: views, no copies
                contribution = visit(layout.unpack(pieces[local]), first + local)
                for segment, c in zip(_split(sink[local], grad_shapes) if sink is not None else (), contribution or ()):
                    merge(segment, c)
            if grads:
                share = None if sink is None else self._piece_grad(sink, lse)
                for req in pending or ():  # the accumulator travelled while we computed
                    req.wait()
                target = share if self.nodes == 1 and share is not None else accs[step % 2]
                if share is not None and target is not share:
                    merge(target, share)
                for segment, c in zip(_split(target, grad_shapes), contribution if share is None else ()):
                    merge(segment, c)
                if self.nodes == 1:
                    acc = target
                else:  # after the last visit the accumulator goes home: the next node owns the piece we hold
                    acc = accs[(step + 1) % 2]
                    pending = self._shift(target, acc, _GRAD_TAG)
            if moving and not last:
                for req in reqs:
                    req.wait()
                piece = incoming
        if not grads:
            return None
        for req in pending or ():
            req.wait()
        return _split(acc, grad_shapes)


class _Layout:
    """A rank's column tensors packed into one byte buffer, each in its own dtype (a 16-bit block
    travels in 16 bits beside float32 statistics), each starting on a 16-byte boundary so that it
    is viewed in place, aligned for vector loads."""

    ALIGN = 16

    def __init__(self, parts: list[torch.Tensor]):
        self.shapes = [p.shape for p in parts]
        self.dtypes = [p.dtype for p in parts]
        self.offsets, end = [], 0
        for p in parts:
            self.offsets.append(end)
            end += -(-p.numel() * p.element_size() // self.ALIGN) * self.ALIGN
        self.nbytes = end

    def unpack(self, piece: torch.Tensor) -> list[torch.Tensor]:
        """Views of the tensors packed in ``piece`` (a row of bytes starting on a boundary)."""
        out = []
        for offset, shape, dtype in zip(self.offsets, self.shapes, self.dtypes):
            nbytes = shape.numel() * dtype.itemsize
            out.append(piece[offset:offset + nbytes].view(dtype).view(shape))
        return out

    def pack(self, parts: list[torch.Tensor]) -> torch.Tensor:
        piece = parts[0].new_empty(self.nbytes, dtype=torch.uint8)
        for view, p in zip(self.unpack(piece), parts):
            view.copy_(p)
        return piece


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.logaddexp(a, b, out=a)


def _split(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    """One rank's packed gradients (one dtype), as views."""
    out, offset = [], 0
    for shape in shapes:
        out.append(flat[offset:offset + shape.numel()].view(shape))
        offset += shape.numel()
    return out


class TurnLSE(torch.autograd.Function):
    """Row log-sum-exp of ``scale * x @ Y.T`` over non-keyed pairs (``Y``: every rank's ``y``) and,
    with ``cols``, the column log-sum-exp of our ``y`` over every rank's ``x``, in one turn over ``y``
    (backward: ``y`` with its owner's column statistics and upstream gradient). ``keys = (row_keys,
    col_keys, stride, exclude)`` (each may be None; ``exclude``: each row's global column indices,
    left out too) or ``None``. Called as ``apply(ring, engine, keys, cols, scale, x, y)``: the
    blocks travel in ``y``'s dtype and meet ``engine``'s kernels as those take them (``operands``),
    statistics and gradients are accumulated in the math dtype."""

    @staticmethod
    def forward(ctx, ring: Ring, engine, keys, cols: bool, scale, x, y):
        (xa,) = engine.operands(x)  # our rows, once; the blocks travel as they are and meet the kernels in visit
        rk, ck, stride, ex = keys or (None, None, 0, None)
        row_lse = torch.full((xa.shape[0],), float("-inf"), dtype=math_dtype(x.dtype), device=x.device)

        def visit(blocks, owner):
            lse, col = engine.block_lse(xa, blocks[0], scale, keys=(rk, ring.keys(ck, stride, owner)), cols=cols,
                                        exclude=_owned(ex, owner, blocks[0].shape[0]))
            torch.logaddexp(row_lse, lse, out=row_lse)
            return [col]

        col_lse = ring.turn([y], visit, cols, [y.shape[:1]], lse=True)
        col_lse = col_lse[0] if cols else row_lse.new_empty(0)
        ctx.save_for_backward(scale, x, y, row_lse, col_lse)
        ctx.ring, ctx.engine, ctx.keys, ctx.cols = ring, engine, keys, cols
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, g_row, g_col):
        ring, engine, cols = ctx.ring, ctx.engine, ctx.cols
        scale, x, y, row_lse, col_lse = ctx.saved_tensors
        (xa,) = engine.operands(x)
        rk, ck, stride, ex = ctx.keys or (None, None, 0, None)
        none = row_lse.new_empty(0)
        g_row = _upstream(g_row, row_lse)
        parts = [y, col_lse, _upstream(g_col, col_lse)] if cols else [y]
        need = ctx.needs_input_grad
        dx, dscale = torch.zeros_like(xa, dtype=row_lse.dtype), row_lse.new_zeros(())
        apart = cols and (need[4] or not ring.gather_grad)

        def visit(blocks, owner):
            yb, col_total, gc = blocks if cols else (blocks[0], none, none)
            grads = engine.block_lse_grads
            args = (xa, yb, scale, row_lse, col_total, g_row, gc)
            keys = (rk, ring.keys(ck, stride, owner))
            grads = functools.partial(grads, exclude=_owned(ex, owner, yb.shape[0]))
            theirs = row_lse.new_zeros(1)  # the owner's columns' terms' part of its scale gradient
            if apart and owner != ring.rank:  # the owner's columns' terms, then our rows' terms, apart
                cy, gx = grads(*args, keys=keys, rows=False, cols=True)
                theirs += scale_grad(gx, yb)
                if ring.gather_grad:  # else open_clip's gather_with_grad=False: a rank's terms move its tensors only
                    dx.add_(cy)
                del cy  # one [N, D] buffer less at the peak
                gy, rows_gx = grads(*args, keys=keys, rows=True, cols=False)
                if ring.gather_grad:
                    gx.add_(rows_gx)
            else:
                gy, gx = grads(*args, keys=keys, rows=True, cols=cols)
                if not (ring.gather_grad or owner == ring.rank):
                    gx.zero_()
            if need[4]:
                dscale.add_(scale_grad(gy, xa))
            dx.add_(gy)
            return [gx, theirs]

        dy, theirs = ring.turn(parts, visit, True, [y.shape, torch.Size([1])], grad_dtype=row_lse.dtype)
        return (None, None, None, None, (dscale + theirs[0]).to(scale.dtype) if need[4] else None,
                feature_grad(dx, scale, x) if need[5] else None, feature_grad(dy, scale, y) if need[6] else None)


def _owned(exclude, owner: int, n: int):
    """Of each row's excluded global columns, those of rank ``owner``'s ``n`` columns, as indices
    into them (-1: none)."""
    if exclude is None:
        return None
    local = exclude - owner * n
    return torch.where((exclude >= 0) & (local >= 0) & (local < n), local, -1)


def _upstream(g, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g.contiguous().to(like.dtype)


class TurnPointwise(torch.autograd.Function):
    """``sum_j loss(scale <x_i, y_j> + row_bias_i)`` over global columns, per row or in total.

    In total (``reduce``) the gradients are computed in the forward turn (one scalar upstream
    gradient), columns and accumulators travelling together; backward only rescales. Per row,
    backward makes a second turn with the rows' upstream gradients."""

    @staticmethod
    def forward(ctx, ring: Ring, engine, kind: str, reduce: bool, keys, x, y, scale, row_bias):
        want = reduce and any(ctx.needs_input_grad[5:9])
        row_sum, grads = _pointwise_turn(ring, engine, kind, keys, x, y, scale, row_bias, None, want,
                                         ctx.needs_input_grad[5:9])
        ctx.ring, ctx.engine, ctx.kind, ctx.reduce, ctx.keys = ring, engine, kind, reduce, keys
        if reduce:
            ctx.save_for_backward(*grads)
            return row_sum.sum()
        ctx.save_for_backward(x, y, scale, row_bias)
        return row_sum

    @staticmethod
    def backward(ctx, g):
        need = ctx.needs_input_grad[5:9]
        if ctx.reduce:  # (nothing saved: no input needed a gradient, and backward is not called)
            grads = [None if t is None else t * g.to(t.dtype) for t in ctx.saved_tensors]
        else:
            x, y, scale, row_bias = ctx.saved_tensors
            _, grads = _pointwise_turn(ctx.ring, ctx.engine, ctx.kind, ctx.keys, x, y, scale, row_bias, g, True, need)
        return (None, None, None, None, None, *[t if wanted else None for t, wanted in zip(grads, need)])


def _pointwise_turn(ring, engine, kind, keys, x, y, scale, row_bias, g_row, want: bool, need):
    """Row sums, and with ``want`` (dx, dy, dscale, d_bias) for upstream ``g_row`` (None: 1)."""
    (xa,) = engine.operands(x)
    acc = math_dtype(x.dtype)
    bias = None if row_bias is None else row_bias.to(acc).contiguous()
    g_row = None if g_row is None else g_row.contiguous().to(acc)
    rk, ck, stride = keys
    row_sum = torch.zeros(xa.shape[0], dtype=acc, device=x.device)
    gy_total = torch.zeros_like(xa, dtype=acc) if want else None
    d_bias = torch.zeros_like(row_sum) if want else None

    def visit(blocks, owner):
        s, gy, gx, db = engine.block_pointwise(xa, blocks[0], scale, bias, keys=(rk, ring.keys(ck, stride, owner)),
                                               kind=kind, g_row=g_row, grads=want)
        row_sum.add_(s)
        if want:
            gy_total.add_(gy)
            d_bias.add_(db)
            return [gx]
        return None

    col_grads = ring.turn([y], visit, grads=want)
    if not want:
        return row_sum, ()
    dscale = scale_grad(gy_total, xa).to(scale.dtype) if need[2] else None
    return row_sum, (feature_grad(gy_total, scale, x) if need[0] else None,
                     feature_grad(col_grads[0], scale, y) if need[1] else None, dscale, d_bias if need[3] else None)


class TurnTake(torch.autograd.Function):
    """``Y[index]`` (rows by global index, ``[M, D]``) without holding ``Y``: each rank picks its
    rows as the columns pass; backward sends the row gradients home in the accumulators."""

    @staticmethod
    def forward(ctx, ring: Ring, y, index):
        n = y.shape[0]
        out = y.new_empty((index.shape[0], *y.shape[1:]))

        def visit(blocks, owner):
            hit = (index >= owner * n) & (index < (owner + 1) * n)
            out[hit] = blocks[0][index[hit] - owner * n]

        ring.turn([y], visit)
        ctx.ring, ctx.shape, ctx.dtype = ring, y.shape, y.dtype
        ctx.save_for_backward(index)
        return out

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        g, n = g.contiguous(), ctx.shape[0]
        acc = math_dtype(g.dtype)

        def visit(blocks, owner):
            hit = (index >= owner * n) & (index < (owner + 1) * n)
            return [g.new_zeros(ctx.shape, dtype=acc).index_add_(0, index[hit] - owner * n, g[hit].to(acc))]

        # nothing needs to travel but the accumulators: an empty stand-in for the columns
        dy = ctx.ring.turn([g.new_empty((0, *g.shape[1:]))], visit, True, [ctx.shape])[0]
        return None, dy.to(ctx.dtype), None


class TurnColumns(torch.autograd.Function):
    """``fn(rows, C, *K)`` against every rank's columns, side by side in rank order (``[R, sum n]``):
    ``C`` (differentiable) and constants ``K`` travel together, each in its own dtype. ``fn`` is
    differentiable torch code; backward makes a second turn, differentiating it one rank's block at a
    time, and the columns' gradients go home in the accumulators (math dtype). For scores that are
    not ``x @ y.T`` (MaxSim). Called as ``apply(ring, fn, rows, column, *constants)``."""

    @staticmethod
    def forward(ctx, ring: Ring, fn, rows, column, *constants):
        blocks = [None] * ring.size

        def visit(parts, owner):
            blocks[owner] = fn(rows, *parts)

        ring.turn([column, *constants], visit)
        ctx.ring, ctx.fn, ctx.widths = ring, fn, [b.shape[-1] for b in blocks]
        ctx.save_for_backward(rows, column, *constants)
        return torch.cat(blocks, -1)

    @staticmethod
    def backward(ctx, g):
        rows, column, *constants = ctx.saved_tensors
        need_rows, need_column = ctx.needs_input_grad[2:4]
        g_blocks = g.split(ctx.widths, -1)
        d_rows = torch.zeros_like(rows) if need_rows else None

        def visit(parts, owner):
            with torch.enable_grad():
                r = rows.detach().requires_grad_(need_rows)
                c = parts[0].detach().requires_grad_(need_column)
                out = ctx.fn(r, c, *parts[1:])
                wrt = [t for t in (r, c) if t.requires_grad]
                got = list(torch.autograd.grad(out, wrt, g_blocks[owner])) if wrt else []
            if need_rows:
                d_rows.add_(got.pop(0))
            return [got.pop(0) if need_column else torch.zeros_like(c)]

        d_column = ctx.ring.turn([column, *constants], visit, True, [column.shape])[0]
        return (None, None, d_rows, d_column.to(column.dtype) if need_column else None, *(None for _ in constants))
