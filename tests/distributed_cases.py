"""The distributed tests' cases: each loss's global inputs marked with how they are sharded
(``Rows``, ``Views``) or replicated (``Rep``), a rank's shard of them, one case run on one rank of a
group or on one process over the whole batch, and the comparison of every rank's results with the
single-process ones (test_distributed.py, test_distributed_triton.py)."""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastcl
from tolerances import assert_close, tol

TIMEOUT_S = 240  # a group's start, every case on every rank, and the results' files


# --- inputs: global tensors marked with how they are sharded --------------------------------

@dataclass
class Rows:  # split along dim 0 (features, labels as global indices)
    t: torch.Tensor


@dataclass
class Views:  # [V, B, D]: split along B
    t: torch.Tensor


@dataclass
class Rep:  # the same on every rank (logit_scale, logit_bias, a learnable temperature)
    t: torch.Tensor


@dataclass(frozen=True)
class DCase:
    id: str
    loss: str
    build: Callable  # (rand, randint, W) -> (args, kwargs) with marked tensors
    order: str = "rows"  # how a rank's "none" rows sit in the global output: "rows" or "views"

    def inputs(self, world: int):
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.id}-{world}".encode()))

        def rand(*shape, grad=True):
            return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)

        def randint(high, *shape):
            return torch.randint(0, high, shape, generator=gen)

        return self.build(rand, randint, world)


def _guide(g, noise):
    """Guide embeddings of rows and columns: each column near its row (its target), so a few other
    columns come within the margin of the target and leave, most do not."""
    return Rows(g), Rows(g + 0.7 * noise)


def _scale(v):
    return Rep(torch.tensor(v, dtype=torch.float64, requires_grad=True))


CASES = [
    DCase("clip", "clip_loss", lambda r, ri, w: ((Rows(r(3 * w, 5)), Rows(r(3 * w, 5)), _scale(2.3)), {})),
    DCase("clip-smooth-sum", "clip_loss", lambda r, ri, w: (
        (Rows(r(4 * w, 5)), Rows(r(4 * w, 5)), _scale(1.7)), {"label_smoothing": 0.1, "reduction": "sum"})),
    DCase("clip-none-norm", "clip_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 4)), Rows(r(3 * w, 4)), 4.0), {"reduction": "none", "normalize": True})),
    DCase("clip-labels", "clip_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 4)), Rows(r(4 * w, 4)), _scale(1.3)),
        {"labels": Rows(ri(4 * w, 3 * w)), "bidirectional": False, "label_smoothing": 0.2})),
    DCase("clip-negatives-none", "clip_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 4)), Rows(r(3 * w, 4)), _scale(2.0)),
        {"extra_negatives": Rows(r(2 * w, 4)), "bidirectional": False, "label_smoothing": 0.05,
         "reduction": "none"})),
    DCase("infonce-labels", "infonce_loss", lambda r, ri, w: (
        (Rows(r(2 * w, 5)), Rows(r(3 * w, 5))), {"temperature": 0.7, "labels": Rows(ri(3 * w, 2 * w))})),
    # false negatives: keys compared across ranks as they are (3 values: many keyed pairs per rank)
    DCase("clip-keys", "clip_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 5)), Rows(r(3 * w, 5)), _scale(2.3)), {"row_keys": Rows(ri(3, 3 * w)),
                                                             "col_keys": Rows(ri(3, 3 * w))})),
    DCase("infonce-joint-positives-keys", "infonce_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 5)), Rows(r(3 * w, 5))), {"temperature": 0.6, "positives": Rows(ri(3 * w + 1, 3 * w, 2) - 1),
                                                 "multi_positive": "joint", "row_keys": Rows(ri(4, 3 * w)),
                                                 "col_keys": Rows(ri(4, 3 * w))})),
    DCase("clip-matryoshka", "clip_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 9)), Rows(r(3 * w, 9)), _scale(2.1)),
        {"matryoshka_dims": (2, 5, 9), "matryoshka_weights": (1.0, 0.5, 2.0), "normalize": True})),
    DCase("siglip-matryoshka-none", "siglip_loss", lambda r, ri, w: (
        (Rows(r(2 * w, 7)), Rows(r(2 * w, 7)), _scale(3.0), _scale(-1.5)),
        {"matryoshka_dims": (3, 7), "reduction": "none"})),
    DCase("infonce-decoupled-positives-keys-none", "infonce_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 5)), Rows(r(3 * w, 5))), {"temperature": 0.6, "positives": Rows(ri(3 * w + 1, 3 * w, 2) - 1),
                                                 "multi_positive": "decoupled", "row_keys": Rows(ri(5, 3 * w)),
                                                 "col_keys": Rows(ri(5, 3 * w)), "reduction": "none"})),
    DCase("infonce-guide", "infonce_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 5)), Rows(r(3 * w, 5))),
        {"temperature": 0.6, "guide_margin": 0.2, "guide": _guide(r(3 * w, 3, grad=False), r(3 * w, 3, grad=False))})),
    DCase("infonce-keys-labels-none", "infonce_loss", lambda r, ri, w: (
        (Rows(r(2 * w, 5)), Rows(r(3 * w, 5))), {"temperature": 0.7, "labels": Rows(ri(3 * w, 2 * w)),
                                                 "row_keys": Rows(ri(4, 2 * w)), "col_keys": Rows(ri(4, 3 * w)),
                                                 "reduction": "none"})),
    DCase("siglip", "siglip_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 5)), Rows(r(3 * w, 5)), _scale(2.2), _scale(-1.0)), {})),
    DCase("siglip-none-norm", "siglip_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 4)), Rows(r(3 * w, 4)), _scale(5.0), _scale(-2.0)), {"reduction": "none", "normalize": True})),
    DCase("siglip-sum", "siglip_loss", lambda r, ri, w: (
        (Rows(r(2 * w, 3)), Rows(r(2 * w, 3)), 0.7, 0.3), {"reduction": "sum"})),
    DCase("ntxent", "ntxent_loss", lambda r, ri, w: ((Views(r(2, 3 * w, 5)),), {"temperature": 0.3})),
    DCase("ntxent-V3-none-norm", "ntxent_loss", lambda r, ri, w: (
        (Views(r(3, 2 * w, 4)),), {"reduction": "none", "normalize": True}), order="views"),
    DCase("supcon", "supcon_loss", lambda r, ri, w: (
        (Rows(r(4 * w, 5)), Rows(ri(3 * w, 4 * w))), {"temperature": 0.5})),
    DCase("supcon-views-sum", "supcon_loss", lambda r, ri, w: (
        (Views(r(2, 3 * w, 4)), Rows(ri(3, 3 * w))), {"reduction": "sum"})),
    DCase("supcon-singletons-none", "supcon_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 4)), Rows(torch.arange(3 * w) // 2 * (torch.arange(3 * w) % 3 > 0))),
        {"reduction": "none", "normalize": True})),
    # one row per rank, one class: at W=2 no row has a negative, so every term is exactly 0 (the rule
    # pytorch-metric-learning follows and the shared composition states)
    DCase("supcon-no-negatives", "supcon_loss", lambda r, ri, w: ((Rows(r(w, 4)), Rows(torch.zeros(w).long())), {})),
    DCase("dcl", "dcl_loss", lambda r, ri, w: ((Rows(r(3 * w, 5)), Rows(r(3 * w, 5))), {})),
    DCase("dcl-vmf", "dcl_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 5)), Rows(r(3 * w, 5)), 0.5), {"weighting": "vmf", "sigma": 0.7, "normalize": True})),
    DCase("dcl-weightfn-none", "dcl_loss", lambda r, ri, w: (
        (Rows(r(2 * w, 4)), Rows(r(2 * w, 4)), 0.6),
        {"weighting": lambda u, v: 1 + (u * v).sum(-1).tanh(), "reduction": "none"})),
    DCase("mv_infonce", "mv_infonce_loss", lambda r, ri, w: ((Views(r(3, 2 * w, 4)), 0.5), {})),
    DCase("mv_infonce-none-norm", "mv_infonce_loss", lambda r, ri, w: (
        (Views(r(2, 3 * w, 4)),), {"reduction": "none", "normalize": True})),
    DCase("mv_dhel", "mv_dhel_loss", lambda r, ri, w: ((Views(r(3, 2 * w, 4)), 0.5), {})),
    DCase("mv_dhel-sum-norm", "mv_dhel_loss", lambda r, ri, w: (
        (Views(r(2, 3 * w, 5)),), {"reduction": "sum", "normalize": True, "temperature": 0.3})),
    DCase("cwcl", "cwcl_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 5)), Rows(r(3 * w, 5)), _scale(2.5), Rows(r(3 * w, 7, grad=False))), {})),
    DCase("cwcl-rows-none", "cwcl_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 4)), Rows(r(3 * w, 4)), 1.5, Rows(r(3 * w, 3, grad=False))),
        {"bidirectional": False, "reduction": "none"})),
    DCase("mw", "mw_loss", lambda r, ri, w: ((Rows(r(3 * w, 5)), Rows(r(3 * w, 5))), {})),
    DCase("mw-labels-none", "mw_loss", lambda r, ri, w: (
        (Rows(r(2 * w, 4)), Rows(r(3 * w, 4)), 0.5), {"labels": Rows(ri(3 * w, 2 * w)), "reduction": "none"})),
    DCase("mw-sum-norm", "mw_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 4)), Rows(r(3 * w, 4)), 0.2), {"reduction": "sum", "normalize": True})),
    DCase("uniformity", "uniformity_loss", lambda r, ri, w: ((Rows(r(3 * w, 5)), 1.5), {"normalize": True})),
    DCase("uniformity-none", "uniformity_loss", lambda r, ri, w: ((Rows(r(3 * w, 4)), 0.8), {"reduction": "none"})),
    # learnable temperatures: a tensor replicated on every rank, as DDP keeps a parameter
    DCase("infonce-learned-t", "infonce_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 5)), Rows(r(3 * w, 5)), _scale(0.7)), {})),
    DCase("ntxent-learned-t", "ntxent_loss", lambda r, ri, w: ((Views(r(2, 3 * w, 5)), _scale(0.3)), {})),
    DCase("supcon-learned-t", "supcon_loss", lambda r, ri, w: (
        (Rows(r(4 * w, 5)), Rows(ri(3 * w, 4 * w)), _scale(0.5)), {})),
    DCase("dcl-learned-t", "dcl_loss", lambda r, ri, w: ((Rows(r(3 * w, 5)), Rows(r(3 * w, 5)), _scale(0.4)), {})),
    DCase("mv_infonce-learned-t", "mv_infonce_loss", lambda r, ri, w: ((Views(r(3, 2 * w, 4)), _scale(0.5)), {})),
    DCase("mv_dhel-learned-t-sum", "mv_dhel_loss", lambda r, ri, w: (
        (Views(r(2, 3 * w, 5)), _scale(0.3)), {"reduction": "sum"})),
    DCase("mw-learned-t", "mw_loss", lambda r, ri, w: ((Rows(r(3 * w, 5)), Rows(r(3 * w, 5)), _scale(0.5)), {})),
    DCase("mw-learned-t-labels-none", "mw_loss", lambda r, ri, w: (
        (Rows(r(2 * w, 4)), Rows(r(3 * w, 4)), _scale(0.2)), {"labels": Rows(ri(3 * w, 2 * w)), "reduction": "none"})),
    DCase("uniformity-learned-t", "uniformity_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 5)), _scale(1.5)), {"normalize": True})),
    DCase("uniformity-learned-t-none", "uniformity_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 4)), _scale(0.8)), {"reduction": "none"})),
    DCase("alignment", "alignment_loss", lambda r, ri, w: ((Rows(r(3 * w, 4)), Rows(r(3 * w, 4))), {})),
    DCase("alignment-sum", "alignment_loss", lambda r, ri, w: (
        (Rows(r(3 * w, 4)), Rows(r(3 * w, 4)), 1.5), {"reduction": "sum", "normalize": True})),
    # token-level scores (the plan's columns() turn; masks and symmetric in test_maxsim_distributed.py)
    DCase("maxsim", "maxsim_loss", lambda r, ri, w: ((Rows(r(2 * w, 3, 4)), Rows(r(2 * w, 5, 4)), 0.5), {})),
]
LOSSES = {c.loss for c in CASES}
GROUP_CASES = [c for c in CASES if c.id in ("clip", "siglip", "ntxent", "mw-labels-none", "supcon")]


def _map(value, fn):
    if isinstance(value, (Rows, Views, Rep, torch.Tensor)):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return value


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(t.requires_grad) if t.is_floating_point() else t.clone()


def _in(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def global_inputs(case: DCase, world: int, dtype: torch.dtype | None = None):
    """Fresh leaves of the whole batch (floating ones in ``dtype``, default float64); the leaves that
    take a gradient, with their marks."""
    marked = []

    def unwrap(v):
        t = _leaf(_in(v.t if not isinstance(v, torch.Tensor) else v, dtype))
        if t.requires_grad:
            marked.append((v, t))
        return t

    args, kwargs = _map(case.inputs(world), unwrap)
    return args, kwargs, marked


def shard_inputs(case: DCase, world: int, rank: int, dtype: torch.dtype | None = None):
    marked = []

    def cut(v):
        t = v.t if not isinstance(v, torch.Tensor) else v
        if isinstance(v, Rows):
            n = t.shape[0] // world
            t = t[rank * n:(rank + 1) * n]
        elif isinstance(v, Views):
            n = t.shape[1] // world
            t = t[:, rank * n:(rank + 1) * n]
        t = _leaf(_in(t, dtype))
        if t.requires_grad:
            marked.append((v, t))
        return t

    args, kwargs = _map(case.inputs(world), cut)
    return args, kwargs, marked


def none_positions(case: DCase, world: int, rank: int, numel: int, views: int) -> torch.Tensor:
    if case.order == "views":
        b = numel // views
        return (torch.arange(views)[:, None] * (b * world) + rank * b + torch.arange(b)).reshape(-1)
    return torch.arange(rank * numel, (rank + 1) * numel)


def _weights(n: int) -> torch.Tensor:
    return torch.linspace(0.5, 1.5, n, dtype=torch.float64)


def _views_of(case, args):
    first = args[0]
    return first.shape[0] if first.dim() == 3 else 1


# --- one case on one rank, and on one process --------------------------------------------------

def _run_case(case, world, rank, strategy, backend, dtype=None, **options):
    args, kwargs, marked = shard_inputs(case, world, rank, dtype)
    fn = getattr(fastcl.distributed, case.loss)
    out = fn(*args, **kwargs, backend=backend, strategy=strategy, **options)
    if out.dim() == 0:
        total = out
    else:
        pos = none_positions(case, world, rank, out.numel(), _views_of(case, args))
        total = (out * _weights(out.numel() * world)[pos].to(out.dtype)).sum()
    grads = torch.autograd.grad(total, [t for _, t in marked])
    return out.detach(), [g.detach() for g in grads]


def single_process(case: DCase, world: int, backend: str, dtype: torch.dtype | None = None):
    """The loss and gradients of one process on the whole batch, with the marks of the gradients."""
    args, kwargs, marked = global_inputs(case, world, dtype)
    out = getattr(fastcl, case.loss)(*args, **kwargs, backend=backend)
    total = out if out.dim() == 0 else (out * _weights(out.numel()).to(out.dtype)).sum()
    grads = torch.autograd.grad(total, [t for _, t in marked])
    return out.detach(), [(m, g.detach()) for (m, _), g in zip(marked, grads)]


# --- comparisons -------------------------------------------------------------------------------

def _close(got, want, what):
    assert_close(got, want, tol("float64"), what)


def check_against_reference(case, world, per_rank, what, want=None, close=_close):
    """``per_rank[r] = (out, grads)`` of rank ``r`` against ``want``, the single-process ``(out, marked
    grads)`` (default: the ``reference`` backend in float64), each comparison by ``close``."""
    for r, res in enumerate(per_rank):
        assert not isinstance(res, str), f"{what}: rank {r} raised\n{res}"
    ref_out, ref_grads = want or single_process(case, world, "reference")
    outs = [res[0] for res in per_rank]
    scalar = ref_out.dim() == 0
    if scalar:
        close(torch.stack(outs).double().mean(), ref_out.double(), f"{what}: mean over ranks of the loss")
    factor = world if scalar else 1
    for i, (mark, ref_g) in enumerate(ref_grads):
        if isinstance(mark, Rep):
            close(sum(res[1][i].double() for res in per_rank) / factor, ref_g.double(),
                  f"{what}: gradient {i} (replicated)")
            continue
        for r, res in enumerate(per_rank):
            n = ref_g.shape[0 if isinstance(mark, Rows) else 1] // world
            want_r = ref_g[r * n:(r + 1) * n] if isinstance(mark, Rows) else ref_g[:, r * n:(r + 1) * n]
            close(res[1][i], factor * want_r, f"{what}: rank {r} gradient {i}")
    if not scalar:
        for r, out in enumerate(outs):
            v = _views_of(case, shard_inputs(case, world, r)[0])
            close(out, ref_out[none_positions(case, world, r, out.numel(), v)], f"{what}: rank {r} rows")
