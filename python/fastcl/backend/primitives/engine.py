"""``Engine``: the primitives over one backend's kernels, as ops with autograd, and the kernels one
block of columns at a time for callers that merge blocks themselves."""
from types import SimpleNamespace

import torch

from .. import registry
from .lse import _lse_op
from .lse_prefixes import _lse_prefixes_op
from .lse_symmetric import _lse_symmetric_op
from .pointwise import _pointwise_op
from .pointwise_prefixes import _pointwise_prefixes_op
from .shared import LSE, POINTWISE_KINDS, Kernels, _finite_shift, _prepared


class Engine:
    """The primitives over one backend's kernels, as its declaration (``registry.py``) names them:
    ``lse`` and ``pointwise``, and ``lse(z, z)`` over half the tiles where it declares ``lse_symmetric``.
    16-bit inputs reach kernels that take them natively as they are; the kernels' statistics and
    gradient accumulators are always in the math dtype.

    The primitives run as ``torch.library`` custom ops (``fastcl::engine_*``) with fake
    implementations and registered autograd, so ``torch.compile`` traces them without graph breaks.
    """

    def __init__(self, name: str):
        self.name = name

    @property
    def symmetric(self) -> bool:
        return registry.provides(self.name, "lse_symmetric")

    def provides(self, op: str) -> bool:
        """Whether this backend declares ``op`` (``registry.OPS``)."""
        return registry.provides(self.name, op)

    @property
    def native_dtypes(self) -> tuple[torch.dtype, ...]:
        return registry.native_dtypes(self.name, "lse")

    @property
    def kernels(self) -> Kernels:
        """The raw kernels of the ops this backend declares, as one namespace (imported on first use)."""
        found = {}
        for op in ("lse", "lse_symmetric", "lse_exclude", "lse_prefixes", "pointwise", "pointwise_prefixes"):
            if registry.provides(self.name, op):
                module = registry.kernels(self.name, op)
                found.update({f: getattr(module, f) for f in registry.OPS[op].functions})
        return SimpleNamespace(**found)

    def lse(self, x, y, scale, *, keys=None, rows: bool = True, cols: bool = False, pair_cols=None,
            exclude=None) -> LSE:
        """Row (``[M]``) and column (``[N]``) log-sum-exp of ``scale * x @ y.T`` over non-keyed pairs,
        in the math dtype. ``pair_cols``: ``"diagonal"`` (``p(i) = i``) or an index tensor ``[M]``
        asks for the logits ``S_{i, p(i)}`` too (a loss's targets). ``exclude [M, E]``: each row's
        columns (``-1`` padded) left out too (op ``lse_exclude``)."""
        diagonal = isinstance(pair_cols, str)
        if diagonal and pair_cols != "diagonal":
            raise ValueError(f"pair_cols must be None, 'diagonal' or an index tensor, got {pair_cols!r}")
        row_keys, col_keys = (None, None) if keys is None else keys
        if self.symmetric and x is y and row_keys is col_keys and rows and not cols and pair_cols is None \
                and exclude is None:
            return LSE(_lse_symmetric_op(self.name, x, scale, row_keys), None, None)
        row_lse, col_lse, pair = _lse_op(self.name, x, y, scale, row_keys, col_keys, rows, cols,
                                         None if diagonal else pair_cols, diagonal, exclude)
        return LSE(row_lse if rows else None, col_lse if cols else None, None if pair_cols is None else pair)

    def lse_prefixes(self, x, y, scale, dims, row_scale=None, col_scale=None, *, cols: bool = False):
        """``(row_lse [K, M], col_lse [K, N] or None)`` of ``S^k = scale * a^k b^k.T * x[:, :d_k] @ y[:, :d_k].T``
        for each of the increasing ``dims`` (op ``lse_prefixes``), all K from one pass over the features.
        ``row_scale [K, M]`` and ``col_scale [K, N]`` are the factors ``a``, ``b`` (None: 1; given: both,
        nonzero), in the math dtype, differentiable."""
        row_scale, col_scale = (None if f is None else f.contiguous() for f in (row_scale, col_scale))
        row_lse, col_lse = _lse_prefixes_op(self.name, x, y, scale, [int(d) for d in dims], row_scale, col_scale,
                                            True, cols)
        return row_lse, col_lse if cols else None

    def pointwise(self, x, y, scale, row_bias=None, *, keys=None, kind: str, reduce: bool):
        """``sum_j loss(scale <x_i, y_j> + row_bias_i)`` per row ``[M]``, or its total if ``reduce``."""
        row_keys, col_keys = (None, None) if keys is None else keys
        grad_on = torch.is_grad_enabled()
        needs = [grad_on and t is not None and t.requires_grad for t in (x, y, scale, row_bias)]
        return _pointwise_op(self.name, x, y, scale, row_bias, row_keys, col_keys, POINTWISE_KINDS[kind], reduce,
                             *needs)[0]

    def pointwise_prefixes(self, x, y, scale, row_bias, dims, row_scale=None, col_scale=None, *, keys=None,
                           kind: str, weights, reduce: bool):
        """``sum_k w_k sum_j loss(S^k_ij + row_bias_i)`` per row ``[M]``, or its total if ``reduce``, for
        ``S^k = scale * a^k b^k.T * x[:, :d_k] @ y[:, :d_k].T`` at each of the increasing ``dims`` with their
        ``weights`` (op ``pointwise_prefixes``), all K from one pass over the features. ``row_scale [K, M]``,
        ``col_scale [K, N]``: as ``lse_prefixes`` takes them, differentiable."""
        row_keys, col_keys = (None, None) if keys is None else keys
        row_scale, col_scale = (None if f is None else f.contiguous() for f in (row_scale, col_scale))
        grad_on = torch.is_grad_enabled()
        needs = [grad_on and t is not None and t.requires_grad for t in (x, y, scale, row_bias, row_scale, col_scale)]
        return _pointwise_prefixes_op(self.name, x, y, scale, row_bias, [int(d) for d in dims], row_scale, col_scale,
                                      row_keys, col_keys, POINTWISE_KINDS[kind], [float(w) for w in weights], reduce,
                                      *needs)[0]

    # --- one block of columns at a time, for callers that merge blocks themselves ----------------
    # The kernels as the ops above call them, without autograd (fastcl.distributed's turns: a rank's
    # rows meet every rank's columns block by block). Statistics and gradient terms are in the math
    # dtype; x and y are best passed through ``operands`` once.

    def operands(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor as this backend's kernels take it (``_prepared`` with ``native_dtypes``)."""
        return _prepared(self.native_dtypes, *tensors)

    def block_lse(self, x, y, scale, *, keys=None, rows: bool = True, cols: bool = False, exclude=None):
        """``(row_lse [M] or [0], col_lse [N] or [0])`` of ``scale * x @ y.T`` over the block's non-keyed pairs
        (and not listed in ``exclude``: the block's column indices)."""
        x, y = self.operands(x, y)
        row_keys, col_keys = (None, None) if keys is None else keys
        if exclude is not None:
            return self.kernels.lse_forward_excluding(x, y, scale, row_keys, col_keys, exclude.contiguous(), rows,
                                                      cols)
        return self.kernels.lse_forward(x, y, scale, row_keys, col_keys, rows, cols)

    def block_lse_grads(self, x, y, scale, row_lse, col_lse, g_row, g_col, *, keys=None, rows: bool = True,
                        cols: bool = False, exclude=None):
        """``(G @ y, G.T @ x)`` for this block's part of ``G = d(sum g_row * row_lse + sum g_col * col_lse) / dS``;
        ``row_lse``, ``col_lse`` are the lines' totals over every block (what ``block_lse`` merged)."""
        x, y = self.operands(x, y)
        row_keys, col_keys = (None, None) if keys is None else keys
        shifts = (_finite_shift(row_lse), _finite_shift(col_lse), g_row, g_col, rows, cols)
        if exclude is not None:
            return self.kernels.lse_backward_excluding(x, y, scale, row_keys, col_keys, exclude.contiguous(), *shifts)
        return self.kernels.lse_backward(x, y, scale, row_keys, col_keys, *shifts)

    def block_pointwise(self, x, y, scale, row_bias=None, *, keys=None, kind: str, g_row=None, grads: bool = False):
        """``(row sums [M], D @ y, D.T @ x, row sums of D)`` of ``loss(scale <x_i, y_j> + row_bias_i)`` over
        the block, ``D = g_row * d loss / dS`` (``g_row`` None: 1); the last three are empty unless ``grads``."""
        x, y = self.operands(x, y)
        row_keys, col_keys = (None, None) if keys is None else keys
        return self.kernels.pointwise(x, y, scale, row_bias, row_keys, col_keys, POINTWISE_KINDS[kind], g_row, grads)
