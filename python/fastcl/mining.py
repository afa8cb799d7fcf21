"""Hard-negative mining without the similarity matrix: streaming top-k, and MoCHi-style mixing.

    values, cols = fastcl.topk(queries, corpus, k=16, row_keys=query_doc_id, col_keys=corpus_doc_id)
    hard = corpus[cols[:, 0]]                      # the hardest negative of every query
    loss = fastcl.infonce_loss(q, pos, 0.05, extra_negatives=hard)

``topk`` keeps per row only its running k best while the tiles of ``S = scale * x @ y.T`` stream
past, on every backend (``reference`` materialises S, for tests). ``mix_hard_negatives`` synthesises
harder negatives from the mined ones (Kalantidis et al., "Hard Negative Mixing for Contrastive
Learning", NeurIPS 2020).
"""
# No `from __future__ import annotations`: torch.library.custom_op reads evaluated annotations on
# torch < 2.5 (see backend/primitives/__init__.py).
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import backend as dispatch
from ._checks import math_dtype
from .backend.topk import _topk_op


class TopK(NamedTuple):
    values: torch.Tensor   # [M, k] the k largest S_ij of each row, descending
    indices: torch.Tensor  # [M, k] their columns j (int64)


def topk(
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    *,
    exclude_diagonal: bool = False,
    row_keys: torch.Tensor | None = None,
    col_keys: torch.Tensor | None = None,
    scale: float = 1.0,
    normalize: bool = False,
    backend: str = "auto",
) -> TopK:
    r"""The ``k`` largest ``S_ij = scale * <x_i, y_j>`` of every row, never holding ``S``.

    Returns ``(values, indices)``, each ``[M, k]``: per row the ``k`` largest entries over the
    eligible columns in descending order, ties to the lower column index, NaN above everything
    (the order of ``torch.sort(S, descending=True, stable=True)``). Equal to ``torch.topk(S, k)``
    up to the order of ties, which ``torch.topk`` leaves unspecified. Memory
    ``O((M + N) * D + M * k)`` plus a few tiles, on every backend but ``reference``.

    Eligible columns of row ``i``: all ``j``, except ``j == i`` if ``exclude_diagonal`` (``x`` and
    ``y`` the same batch: skip the positive), and except ``row_keys[i] == col_keys[j]`` (e.g. the
    document id of a query's positive, or a class label: never mine a false negative).

    Args:
        x, y: ``[M, D]`` and ``[N, D]`` of one floating dtype and device; 16-bit inputs are compared
            in float32 (values are returned in the input dtype). ``M = 0`` gives ``[0, k]`` results.
        k: ``0 <= k <=`` the number of eligible columns of every row (``ValueError`` naming ``k``
            otherwise: a row short of candidates has no meaningful k-th negative). ``k = 0`` gives
            ``[M, 0]`` results.
        row_keys, col_keys: integer tensors ``[M]`` and ``[N]``, both or neither. The check that every
            row keeps ``k`` columns reads them (skipped under ``torch.compile``).
        scale: positive multiplier of the values (a logit scale); it does not change the order.
        normalize: L2-normalise ``x`` and ``y`` first (cosine similarity).
        backend: ``"auto"``, or one of the backends that declare the ``topk`` op
            (``fastcl.backends(device, op="topk")``; ``fastcl info`` lists each one's ops and limits).

    ``values`` carry gradients to ``x`` and ``y`` (as ``torch.topk``'s do) if they require them;
    ``indices`` are integers.
    """
    m, n = _check(x, y, k, row_keys, col_keys, scale, exclude_diagonal)
    name = dispatch.resolve(backend, x, op="topk", k=k)
    _check_enough_columns(m, n, k, row_keys, col_keys, exclude_diagonal)
    row_keys = None if row_keys is None else row_keys.long().contiguous()
    col_keys = None if col_keys is None else col_keys.long().contiguous()
    if normalize:
        x, y = _normalize(x), _normalize(y)
    scale_t = torch.tensor(float(scale), dtype=math_dtype(x.dtype), device=x.device)
    if name == "reference":
        values, indices = _reference(x, y, scale_t, k, row_keys, col_keys, exclude_diagonal)
    else:
        values, indices = _topk_op(name, x, y, scale_t, k, row_keys, col_keys, exclude_diagonal)
    return TopK(values.to(x.dtype), indices)


def mix_hard_negatives(
    query: torch.Tensor,
    negatives: torch.Tensor,
    hardest: torch.Tensor,
    *,
    num_mixed: int,
    num_query_mixed: int = 0,
    query_weight_max: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""MoCHi synthetic hard negatives (Kalantidis et al. 2020), per query, without gradient.

    For query ``i`` with hardest negatives ``hardest[i]`` (column indices into ``negatives``, e.g.
    ``fastcl.topk(query, negatives, h).indices``):

    - ``num_mixed`` of ``normalize(a * n_p + (1 - a) * n_q)``, ``p, q`` drawn from ``hardest[i]``,
      ``a ~ U(0, 1)``;
    - ``num_query_mixed`` of ``normalize(b * q_i + (1 - b) * n_p)``, ``b ~ U(0, query_weight_max)``
      (harder still: part query, part hardest negative).

    Returns ``[M, num_mixed + num_query_mixed, D]`` unit vectors (``query`` and ``negatives`` are
    L2-normalised first, as MoCHi's features are). Two ways to use them:

    - shared columns: ``infonce_loss(q, k, t, extra_negatives=torch.cat([queue, mixed.flatten(0, 1)]))``:
      every query sees every synthetic negative (MoCHi's are per query; the others' are extra,
      mostly easy, negatives), ``O(M * s * D)`` memory;
    - per query, exactly MoCHi: add them to each row's normaliser beside the fused loss,
      ``base = infonce_loss(q, k, t, reduction="none")`` (``lse_i - pos_i``),
      ``pos = (q * k).sum(1) / t``, ``extra = torch.einsum("md,msd->ms", q, mixed) / t``,
      ``loss = (torch.logaddexp(base + pos, extra.logsumexp(1)) - pos).mean()``.
    """
    if query.dim() != 2 or negatives.dim() != 2 or query.shape[1] != negatives.shape[1]:
        raise ValueError(f"query [M, D] and negatives [K, D] must share D, got {tuple(query.shape)} and "
                         f"{tuple(negatives.shape)}")
    if hardest.dim() != 2 or hardest.shape[0] != query.shape[0] or hardest.shape[1] < 1:
        raise ValueError(f"hardest must be [M, h] with M = {query.shape[0]} and h >= 1, got {tuple(hardest.shape)}")
    for name, count in (("num_mixed", num_mixed), ("num_query_mixed", num_query_mixed)):
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {count!r}")
    if not 0.0 <= query_weight_max <= 1.0:
        raise ValueError(f"query_weight_max must be in [0, 1], got {query_weight_max}")
    with torch.no_grad():
        q, bank = F.normalize(query.detach(), dim=1), F.normalize(negatives.detach(), dim=1)
        m, h = hardest.shape

        def draw(count):  # [M, count] rows of bank, each from its query's hardest
            pick = torch.randint(0, h, (m, count), generator=generator, device=hardest.device)
            return bank[hardest.gather(1, pick)]

        def weights(count, high):
            return torch.rand((m, count, 1), generator=generator, device=q.device, dtype=q.dtype) * high

        a = weights(num_mixed, 1.0)
        mixed = a * draw(num_mixed) + (1 - a) * draw(num_mixed)
        b = weights(num_query_mixed, query_weight_max)
        query_mixed = b * q[:, None, :] + (1 - b) * draw(num_query_mixed)
        return F.normalize(torch.cat([mixed, query_mixed], 1), dim=2)


# --- checks -----------------------------------------------------------------------------------

def _check(x, y, k, row_keys, col_keys, scale, exclude_diagonal) -> tuple[int, int]:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, D], got shape {tuple(t.shape)}")
    if y.dtype != x.dtype:
        raise TypeError(f"y has dtype {y.dtype} but x has {x.dtype}; cast them to one dtype")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"y has feature width D={y.shape[1]} but x has D={x.shape[1]}")
    m, n = x.shape[0], y.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, N] with N = {n} columns (rows of y), got k={k}")
    if (row_keys is None) != (col_keys is None):
        raise ValueError("pass both row_keys and col_keys, or neither")
    for name, keys, length in (("row_keys", row_keys, m), ("col_keys", col_keys, n)):
        if keys is None:
            continue
        if not isinstance(keys, torch.Tensor) or keys.is_floating_point() or keys.is_complex() \
                or keys.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {getattr(keys, 'dtype', type(keys).__name__)}")
        if keys.shape != (length,):
            raise ValueError(f"{name} must have shape [{length}], got {tuple(keys.shape)}")
        if keys.device != x.device:
            raise ValueError(f"{name} is on {keys.device} but x is on {x.device}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < float(scale) < float("inf"):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if not isinstance(exclude_diagonal, bool):
        raise TypeError(f"exclude_diagonal must be a bool, got {type(exclude_diagonal).__name__}")
    return m, n


def _check_enough_columns(m, n, k, row_keys, col_keys, exclude_diagonal) -> None:
    """Every row must keep at least k eligible columns. Counted in O((M + N) log N) from the
    sorted column keys; with keys it reads values (a device sync), so eager mode only."""
    if m == 0 or k == 0 or torch.compiler.is_compiling():
        return
    if row_keys is None:
        eligible = n - 1 if exclude_diagonal and n > 0 else n
        if k > eligible:
            raise ValueError(f"k={k} exceeds the {eligible} eligible columns of every row (N = {n}, "
                             "diagonal excluded)")
        return
    sorted_keys = col_keys.sort().values
    row_keys = row_keys.to(sorted_keys.dtype)
    same = torch.searchsorted(sorted_keys, row_keys, right=True) - torch.searchsorted(sorted_keys, row_keys)
    eligible = n - same
    if exclude_diagonal:  # (i, i) is excluded once, even if its keys are equal too
        d = min(m, n)
        eligible[:d] -= (row_keys[:d] != col_keys[:d]).long()
    fewest, row = eligible.min(0)
    if k > int(fewest):
        raise ValueError(f"k={k} exceeds the {int(fewest)} eligible columns of row {int(row)} (N = {n}, pairs with "
                         f"equal keys{' and the diagonal' if exclude_diagonal else ''} excluded): lower k")


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t.to(math_dtype(t.dtype)), dim=-1).to(t.dtype)


# --- reference ----------------------------------------------------------------------------------

def _reference(x, y, scale, k, row_keys, col_keys, exclude_diagonal):
    """The definition on the materialised S: a stable descending sort, eligible columns first."""
    acc = math_dtype(x.dtype)
    s = scale * x.to(acc) @ y.to(acc).T
    excluded = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    if exclude_diagonal:
        excluded.fill_diagonal_(True)
    if row_keys is not None:
        excluded |= row_keys[:, None] == col_keys[None, :]
    order = s.detach().sort(dim=1, descending=True, stable=True).indices
    order = order.gather(1, excluded.gather(1, order).to(torch.uint8).sort(dim=1, stable=True).indices)
    indices = order[:, :k]
    return s.gather(1, indices), indices
