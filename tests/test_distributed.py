"""fastcl.distributed with gloo on 127.0.0.1: every loss, ``allgather`` and ``ring`` on 2 and 3 ranks and
``hierarchical`` on 4 ranks as 2 nodes x 2, against the single-process ``reference`` on the
concatenated batch, in float64.

Processes start once per world size (a module fixture); each rank runs every case and writes its
losses and gradients to a file, and the tests compare them here:
- ``mean``/``sum``: the mean over ranks of the losses equals the single-process loss; each rank's
  feature gradients equal ``W`` times the single-process ones (DDP then divides by ``W``); the mean
  over ranks of a replicated scalar's gradient (``logit_scale``, a tensor ``temperature`` or ``t``)
  equals the single-process one, as DDP's average of a parameter's gradients does;
- ``none``: each rank's rows equal the single-process rows at their global positions, gradients
  unscaled (replicated scalars: the sum over ranks).
Also: a process group other than the default, errors raised on every rank without hanging,
``fastcl.nn.ClipLoss`` / ``SigLipLoss`` against open_clip's distributed formulas written out here,
the bytes the ring sends per dtype, and ``backend="triton"`` under Triton's interpreter (2 ranks,
float32 and bfloat16) against the single-process triton result, its kernels getting 16-bit blocks
as they are; and the entry points' signatures against the single-process ones (no ranks needed).
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fastcl
from fastcl.distributed._spawn import run_ranks
from fastcl.distributed.ring import _BLOCK_TAG, _GRAD_TAG
from sessions import skip_unless_triton_runs
from tolerances import assert_close, tol

COMBOS = [("allgather", "auto"), ("ring", "auto"), ("allgather", "chunked"), ("ring", "chunked")]
NODE_COMBOS = [("hierarchical", "auto"), ("hierarchical", "chunked")]  # 4 ranks as 2 nodes x 2
TIMEOUT_S = 240


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


# --- the ranks ---------------------------------------------------------------------------------

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


class _OpenClipGather(torch.autograd.Function):
    """open_clip's ``gather_features(..., gather_with_grad=True)``: all_gather with gradient."""

    @staticmethod
    def forward(ctx, t):
        ctx.rank, ctx.n = dist.get_rank(), t.shape[0]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def _openclip_gather(t, with_grad: bool):
    if with_grad:
        return _OpenClipGather.apply(t)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t  # open_clip: only the local slice keeps its gradient
    return torch.cat(parts)


def openclip_clip(img, txt, s, rank, world, local_loss, gather_with_grad):
    all_img, all_txt = _openclip_gather(img, gather_with_grad), _openclip_gather(txt, gather_with_grad)
    if local_loss:
        per_img, per_txt = s * img @ all_txt.T, s * txt @ all_img.T
        labels = torch.arange(img.shape[0]) + img.shape[0] * rank
    else:
        per_img = s * all_img @ all_txt.T
        per_txt = per_img.T
        labels = torch.arange(per_img.shape[0])
    return (F.cross_entropy(per_img, labels) + F.cross_entropy(per_txt, labels)) / 2


def openclip_siglip(img, txt, s, b, rank, world):
    all_txt = _openclip_gather(txt, True)
    logits = s * img @ all_txt.T + b
    n = img.shape[0]
    labels = -torch.ones_like(logits)
    labels[:, rank * n:(rank + 1) * n] += 2 * torch.eye(n, dtype=logits.dtype)
    return -F.logsigmoid(labels * logits).sum() / n


def _nn_inputs(rank):
    """This rank's image and text rows for the drop-in checks."""
    gen = torch.Generator().manual_seed(7 + rank)
    return tuple(torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(2))


def _nn_checks(world, rank):
    """Max |fastcl - peer| over value and gradients, per module configuration."""
    img, txt = _nn_inputs(rank)
    s, b = torch.tensor(2.5, dtype=torch.float64), torch.tensor(-1.5, dtype=torch.float64)
    results = {}

    def compare(name, ours, theirs, n_inputs):
        leaves_a = [t.clone().requires_grad_() for t in (img, txt, s, b)[:n_inputs]]
        leaves_b = [t.clone().requires_grad_() for t in (img, txt, s, b)[:n_inputs]]
        va, vb = ours(*leaves_a), theirs(*leaves_b)
        ga, gb = torch.autograd.grad(va, leaves_a), torch.autograd.grad(vb, leaves_b)
        results[name] = max([(va - vb).abs().item()] + [(x - y).abs().max().item() for x, y in zip(ga, gb)])

    for local_loss in (True, False):
        for with_grad in (True, False):
            strategies = ("allgather", "ring") if with_grad else ("allgather",)
            for strategy in strategies:
                module = fastcl.nn.ClipLoss(local_loss=local_loss, gather_with_grad=with_grad, rank=rank,
                                            world_size=world, strategy=strategy)
                compare(f"ClipLoss(local_loss={local_loss}, gather_with_grad={with_grad}, {strategy})", module,
                        lambda i, t, sc, ll=local_loss, wg=with_grad: openclip_clip(i, t, sc, rank, world, ll, wg), 3)
    for strategy in ("ring", "allgather"):
        module = fastcl.nn.SigLipLoss(rank=rank, world_size=world, strategy=strategy)
        compare(f"SigLipLoss({strategy})", module, lambda i, t, sc, bb: openclip_siglip(i, t, sc, bb, rank, world), 4)
        compare(f"SigLipLoss({strategy}, logit_bias=None)", lambda i, t, sc, m=module: m(i, t, sc, None),
                lambda i, t, sc: openclip_siglip(i, t, sc, 0.0, rank, world), 3)
    results.update(_memory_bank_check(world, rank, img, txt))
    return results


def _memory_bank_check(world, rank, out0, out1):
    """lightly's NTXentLoss(memory_bank_size, gather_distributed=True): the loss is this rank's rows
    against its positives and the bank; then every rank's normalised out1 is enqueued, in rank order."""
    torch.manual_seed(0)  # the same random bank on every rank
    module = fastcl.nn.NTXentLoss(0.3, memory_bank_size=(10, out0.shape[1]), gather_distributed=True).double()
    bank = module.memory_bank.bank.clone()
    q, k = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ bank.T], 1) / 0.3
    expected = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))
    loss = module(out0.clone().requires_grad_(), out1)
    written = F.normalize(torch.cat([_nn_inputs(r)[1] for r in range(world)]), dim=1)[:10]
    bank[:written.shape[0]] = written
    pointer = 4 * world if 4 * world < 10 else 0  # a batch reaching the end fills it and wraps
    what = "NTXentLoss(memory_bank_size, gather_distributed)"
    return {f"{what} loss": (loss - expected).abs().item(),
            f"{what} bank": (module.memory_bank.bank - bank).abs().max().item(),
            f"{what} pointer": abs(int(module.memory_bank.bank_ptr) - pointer)}


def _error_checks(world, rank, strategies=("allgather", "ring")):
    """(exception type, message) per bad call; each call must raise on every rank, none may hang."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3 * world, 4, generator=gen, dtype=torch.float64)
    mine = x[rank * 3:(rank + 1) * 3]
    out = {}

    def attempt(name, loss, *args, **kwargs):
        try:
            getattr(fastcl.distributed, loss)(*args, **kwargs)
            out[name] = ("no error", "")
        except Exception as e:  # noqa: BLE001
            out[name] = (type(e).__name__, str(e))

    last = world - 1
    for strategy in strategies:
        longer = torch.cat([mine, mine[:1]]) if rank == last else mine
        attempt(f"shape-{strategy}", "clip_loss", longer, longer, 2.0, strategy=strategy)
        other = mine.float() if rank == last else mine
        attempt(f"dtype-{strategy}", "siglip_loss", other, other, 2.0, 0.0, strategy=strategy)
        labels = torch.tensor([0, 1, 99 if rank == 0 else 2])
        attempt(f"labels-{strategy}", "clip_loss", mine, mine, 2.0, labels=labels, bidirectional=False,
                strategy=strategy)
    # the group still works after the errors: nobody is stuck in a half-finished collective
    attempt("after", "clip_loss", mine, mine, 2.0, strategy="ring")
    return out


def _run_all(world, rank, combos, **options):
    results = {}
    for case in CASES:
        for strategy, backend in combos:
            try:
                results[(case.id, strategy, backend)] = _run_case(case, world, rank, strategy, backend, **options)
            except Exception:  # noqa: BLE001
                results[(case.id, strategy, backend)] = traceback.format_exc()
    return results


def _worker(rank, world):
    torch.set_num_threads(1)
    results = {"group": {}}
    try:
        results["cases"] = _run_all(world, rank, COMBOS)
        if world == 3:  # a group that leaves out rank 0 (its group ranks are not the global ones)
            sub = dist.new_group([1, 2])
            if rank > 0:
                for case in GROUP_CASES:
                    for strategy in ("allgather", "ring"):
                        try:
                            results["group"][(case.id, strategy)] = _run_case(case, 2, rank - 1, strategy, "auto",
                                                                              group=sub)
                        except Exception:  # noqa: BLE001
                            results["group"][(case.id, strategy)] = traceback.format_exc()
        results["errors"] = _error_checks(world, rank)
        results["nn"] = _nn_checks(world, rank)
        results["traffic"] = _ring_traffic()
    except Exception:  # noqa: BLE001
        results["fatal"] = traceback.format_exc()
    return results


TRAFFIC_DTYPES = (torch.float64, torch.float32, torch.bfloat16)


def _ring_traffic():
    """What this rank sends on the ring in a symmetric CLIP step (4 rows of width 6, a learned scale),
    per dtype and pass: ``(tag, bytes)`` of each message, sorted."""
    sent, original = [], dist.batch_isend_irecv

    def counting(ops):
        sent.extend((op.tag, op.tensor.numel() * op.tensor.element_size()) for op in ops if op.op is dist.isend)
        return original(ops)

    out = {}
    dist.batch_isend_irecv = counting
    try:
        for dtype in TRAFFIC_DTYPES:
            x, y = (torch.randn(4, 6).to(dtype).requires_grad_() for _ in range(2))
            loss = fastcl.distributed.clip_loss(x, y, torch.tensor(2.0, requires_grad=True), strategy="ring")
            out[dtype, "forward"], sent[:] = sorted(sent), []
            loss.backward()
            out[dtype, "backward"], sent[:] = sorted(sent), []
    finally:
        dist.batch_isend_irecv = original
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"W{w}")
def ranks(request):
    results = run_ranks(_worker, request.param, TIMEOUT_S)
    for r, res in enumerate(results):
        assert "fatal" not in res, f"rank {r}: {res['fatal']}"
    return request.param, results


def _node_worker(rank, world):
    """2 "nodes" x 2 ranks. ``auto`` takes the node size from ``node_size=2``, ``chunked`` from
    ``LOCAL_WORLD_SIZE`` (torchrun's variable)."""
    from fastcl.distributed.ring import Ring
    from fastcl.distributed.world import GroupWorld

    torch.set_num_threads(1)
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    results = {}
    try:
        results["cases"] = _run_all(world, rank, NODE_COMBOS[:1], node_size=2)
        results["cases"].update(_run_all(world, rank, NODE_COMBOS[1:]))
        ring = Ring(GroupWorld(None, "hierarchical"))
        results["topology"] = (ring.nodes, ring.node_size, ring.next, ring.prev)
        results["errors"] = _error_checks(world, rank, ("hierarchical",))
        mine = torch.randn(3, 4, dtype=torch.float64)
        for name, node_size in (("node_size", 3), ("no node size", None)):
            if node_size is None:
                del os.environ["LOCAL_WORLD_SIZE"]
            try:
                fastcl.distributed.clip_loss(mine, mine, 2.0, strategy="hierarchical", node_size=node_size)
                results["errors"][name] = ("no error", "")
            except Exception as e:  # noqa: BLE001
                results["errors"][name] = (type(e).__name__, str(e))
    except Exception:  # noqa: BLE001
        results["fatal"] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def node_ranks():
    results = run_ranks(_node_worker, 4, TIMEOUT_S)
    for r, res in enumerate(results):
        assert "fatal" not in res, f"rank {r}: {res['fatal']}"
    return results


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


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_single_process(ranks, case, combo):
    world, results = ranks
    per_rank = [res["cases"][(case.id, *combo)] for res in results]
    check_against_reference(case, world, per_rank, f"{case.id} {combo} W={world}")


@pytest.mark.parametrize("combo", NODE_COMBOS, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hierarchical_matches_single_process(node_ranks, case, combo):
    per_rank = [res["cases"][(case.id, *combo)] for res in node_ranks]
    check_against_reference(case, 4, per_rank, f"{case.id} {combo} W=4 as 2x2")


def test_hierarchical_nodes_and_errors(node_ranks):
    for r, res in enumerate(node_ranks):
        peer = (r + 2) % 4  # the same local rank of the other node: the ring of two nodes
        assert res["topology"] == (2, 2, peer, peer), (r, res["topology"])
        errors = res["errors"]
        kind, msg = errors["shape-hierarchical"]
        assert kind == "DistributedInputError" and "rank 3 passed shape (4, 4)" in msg, (r, kind, msg)
        assert errors["after"] == ("no error", "")
        for name, text in (("node_size", "node_size must divide the group's 4 ranks"),
                           ("no node size", "LOCAL_WORLD_SIZE")):
            kind, msg = errors[name]
            assert kind in ("ValueError", "DistributedInputError") and text in msg, (r, name, kind, msg)


def test_a_batch_without_negatives_gives_exactly_zero(ranks):
    world, results = ranks
    if world != 2:
        pytest.skip("only two rows in all: needs two ranks")
    for combo in COMBOS:
        for r, res in enumerate(results):
            out, grads = res["cases"][("supcon-no-negatives", *combo)]
            assert out.item() == 0.0 and all(bool((g == 0).all()) for g in grads), (combo, r, out, grads)


def test_every_loss_is_covered():
    assert LOSSES == set(fastcl.distributed.__all__) - {"DistributedInputError"}


@pytest.mark.parametrize("name", fastcl.losses.__all__)
def test_entry_point_has_the_single_process_signature_and_defaults(name):
    """``fastcl.distributed.<loss>`` takes exactly ``fastcl.<loss>``'s parameters (names, kinds, defaults,
    annotations, order), then ``group``, ``strategy``, ``node_size``."""
    ours = inspect.signature(getattr(fastcl.distributed, name)).parameters
    theirs = inspect.signature(getattr(fastcl, name)).parameters
    assert list(ours) == [*theirs, "group", "strategy", "node_size"]
    for param in theirs.values():
        assert ours[param.name] == param, f"{name}: {ours[param.name]} vs the single-process {param}"
    assert (ours["group"].default, ours["strategy"].default, ours["node_size"].default) == (None, "allgather", None)


def _toy_loss(x, y, scale=2.0, *, reduction="mean", backend="auto"):
    """A loss declared for the drift tests."""


def test_a_composition_that_drifts_from_its_loss_fails_at_import(monkeypatch):
    """A loss that gains a parameter its composition does not take cannot make an entry point."""
    def composition(world, x, y, scale, *, reduction):  # no backend
        raise AssertionError("not called")

    monkeypatch.setattr(fastcl.losses, "toy_loss", _toy_loss, raising=False)
    monkeypatch.setitem(fastcl.losses.COMPOSITIONS, "toy_loss", composition)
    with pytest.raises(TypeError, match="does not take toy_loss's arguments.*backend"):
        fastcl.distributed.losses.over_group("toy_loss")


def test_an_entry_point_passes_the_single_process_defaults(monkeypatch):
    """Defaults come from the single-process signature, as it is when the entry point is made."""
    calls = []

    def composition(world, x, y, scale, *, reduction, backend):
        calls.append((world, x, y, scale, reduction, backend))
        return "loss"

    monkeypatch.setattr(fastcl.losses, "toy_loss", _toy_loss, raising=False)
    monkeypatch.setitem(fastcl.losses.COMPOSITIONS, "toy_loss", composition)
    monkeypatch.setattr(fastcl.distributed.losses, "GroupWorld", lambda *a, **k: (a, k))
    entry = fastcl.distributed.losses.over_group("toy_loss")
    assert entry("x", y="y", strategy="ring") == "loss"
    assert calls == [(((None, "ring"), {"node_size": None}), "x", "y", 2.0, "mean", "auto")]
    with pytest.raises(TypeError, match="unexpected keyword argument 'temperature'"):
        entry("x", "y", temperature=0.1)


def test_every_loss_has_a_composition():
    assert set(fastcl.losses.COMPOSITIONS) == set(fastcl.losses.__all__)


@pytest.mark.parametrize("ranks", [3], indirect=True, ids=lambda w: f"W{w}")  # the subgroup {1, 2} of 3 ranks
@pytest.mark.parametrize("strategy", ["allgather", "ring"])
@pytest.mark.parametrize("case", GROUP_CASES, ids=lambda c: c.id)
def test_non_default_group(ranks, case, strategy):
    world, results = ranks
    assert world == 3
    per_rank = [res["group"][(case.id, strategy)] for res in results[1:]]
    check_against_reference(case, 2, per_rank, f"{case.id} {strategy} on group [1, 2]")


@pytest.mark.parametrize("strategy", ["allgather", "ring"])
def test_errors_raise_on_every_rank(ranks, strategy):
    world, results = ranks
    last = world - 1
    for r, res in enumerate(results):
        kind, msg = res["errors"][f"shape-{strategy}"]
        assert kind == "DistributedInputError" and f"rank {last} passed shape (4, 4)" in msg, (r, kind, msg)
        kind, msg = res["errors"][f"dtype-{strategy}"]
        assert kind == "DistributedInputError" and "torch.float32" in msg, (r, kind, msg)
        kind, msg = res["errors"][f"labels-{strategy}"]
        if r == 0:
            assert kind == "ValueError" and "labels must lie in" in msg, (kind, msg)
        else:
            assert kind == "DistributedInputError" and "rank 0" in msg and "labels must lie in" in msg, (r, msg)
        assert res["errors"]["after"] == ("no error", "")


def _sent(traffic, dtype, phase, tag) -> list[int]:
    return [nbytes for t, nbytes in traffic[dtype, phase] if t == tag]


def test_symmetric_ring_sends_only_y(ranks):
    """One turn over y: W - 1 blocks of y (4 x 6 doubles) and W column-statistics accumulators (4 doubles)."""
    world, results = ranks
    for r, res in enumerate(results):
        traffic = res["traffic"]
        assert _sent(traffic, torch.float64, "forward", _BLOCK_TAG) == [4 * 6 * 8] * (world - 1), (r, traffic)
        assert _sent(traffic, torch.float64, "forward", _GRAD_TAG) == [4 * 8] * world, (r, traffic)


def test_bfloat16_blocks_are_half_the_bytes_of_float32_blocks(ranks):
    """The blocks of y travel in the features' dtype: in bfloat16 half the bytes of float32 (forward:
    y; backward: y with its column statistics and their upstream gradients, float32 in both). The
    accumulators (column statistics; y's gradient and the owner's scale-gradient term) are float32
    in both: 16-bit inputs, float32 statistics."""
    world, results = ranks
    n, d = 4, 6
    for r, res in enumerate(results):
        traffic = res["traffic"]
        blocks = {(dt, phase): _sent(traffic, dt, phase, _BLOCK_TAG)
                  for dt in (torch.float32, torch.bfloat16) for phase in ("forward", "backward")}
        assert blocks[torch.float32, "forward"] == [n * d * 4] * (world - 1), (r, traffic)
        assert [2 * b for b in blocks[torch.bfloat16, "forward"]] == blocks[torch.float32, "forward"], (r, traffic)
        stats = 2 * n * 4  # the column log-sum-exps and their upstream gradients, float32
        assert blocks[torch.float32, "backward"] == [n * d * 4 + stats] * (world - 1), (r, traffic)
        assert blocks[torch.bfloat16, "backward"] == [n * d * 2 + stats] * (world - 1), (r, traffic)
        for phase, size in (("forward", n * 4), ("backward", (n * d + 1) * 4)):
            for dt in (torch.float32, torch.bfloat16):
                assert _sent(traffic, dt, phase, _GRAD_TAG) == [size] * world, (r, dt, phase, traffic)


# --- backend="triton" under Triton's interpreter, float32 and bfloat16 ------------------------------

TRITON_CASES = [c for c in CASES if c.id in ("clip", "siglip", "mw-labels-none", "supcon")]
TRITON_DTYPES = [torch.float32, torch.bfloat16]
TRITON_STRATEGIES = ["allgather", "ring"]


class _KernelDtypes:
    """The triton backend's lse and pointwise kernels (its declared op modules), wrapped in place to
    note the dtypes of the features each call gets."""

    def __init__(self):
        from fastcl.backend import registry

        self.seen = set()
        for op in ("lse", "pointwise"):
            module = registry.kernels("triton", op)
            for name in registry.OPS[op].functions:
                setattr(module, name, self._noting(getattr(module, name)))

    def _noting(self, kernel):
        def call(x, y, *args):
            self.seen.add((x.dtype, y.dtype))
            return kernel(x, y, *args)
        return call


def _triton_worker(rank, world):
    """Each triton case over the group, with the dtypes its kernels got; rank 0 also runs it in one
    process on the whole batch. Runs under TRITON_INTERPRET=1 (set before the ranks start)."""
    torch.set_num_threads(1)
    kernels = _KernelDtypes()
    results = {}
    for case in TRITON_CASES:
        for dtype in TRITON_DTYPES:
            for strategy in TRITON_STRATEGIES:
                kernels.seen = set()
                try:
                    results[case.id, dtype, strategy] = (_run_case(case, world, rank, strategy, "triton", dtype),
                                                         kernels.seen)
                except Exception:  # noqa: BLE001
                    results[case.id, dtype, strategy] = traceback.format_exc()
            if rank == 0:
                try:
                    results[case.id, dtype, "one process"] = single_process(case, world, "triton", dtype)
                except Exception:  # noqa: BLE001
                    results[case.id, dtype, "one process"] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def triton_ranks():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    return run_ranks(_triton_worker, 2, TIMEOUT_S, env={"TRITON_INTERPRET": "1"})


@pytest.mark.parametrize("strategy", TRITON_STRATEGIES)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.id)
def test_triton_matches_single_process_triton(triton_ranks, case, dtype, strategy):
    """2 ranks against one process on the same backend and dtype (outputs in the dtype, so within its
    rounding: the "low precision" tolerance, in norm); the kernels took the blocks as they travelled (bfloat16 as
    it is, accumulated in float32 by the kernels), not upcast copies."""
    skip_unless_triton_runs(dtype)
    what = f"{case.id} {strategy} triton {dtype}"
    single = triton_ranks[0][case.id, dtype, "one process"]
    assert not isinstance(single, str), f"{what}: the single-process run raised\n{single}"
    per_rank = [res[case.id, dtype, strategy] for res in triton_ranks]
    for r, res in enumerate(per_rank):
        assert not isinstance(res, str), f"{what}: rank {r} raised\n{res}"
    low = tol("low precision", dtype)
    check_against_reference(case, 2, [res[0] for res in per_rank], what, want=single,
                            close=lambda got, want, where: assert_close(got, want, low, where))
    for r, (_, seen) in enumerate(per_rank):
        assert seen == {(dtype, dtype)}, f"{what}: rank {r}'s kernels got features of dtypes {seen}"


def test_drop_in_modules_match_their_peers(ranks):
    world, results = ranks
    for r, res in enumerate(results):
        for name, err in res["nn"].items():
            assert err <= tol("peer distributed").atol, f"rank {r}: {name} differs from the peer's formula by {err:.3g}"
