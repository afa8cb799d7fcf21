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
the bytes the ring sends per dtype, and the entry points' signatures against the single-process
ones (no ranks needed). The cases and the comparison are in distributed_cases.py; ``backend="triton"``
over a group is test_distributed_triton.py.
"""
from __future__ import annotations

import inspect
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fastcl
from distributed_cases import CASES, GROUP_CASES, LOSSES, TIMEOUT_S, _run_case, check_against_reference
from fastcl.distributed._spawn import run_ranks
from fastcl.distributed.ring import _BLOCK_TAG, _GRAD_TAG
from tolerances import tol

COMBOS = [("allgather", "auto"), ("ring", "auto"), ("allgather", "chunked"), ("ring", "chunked")]
NODE_COMBOS = [("hierarchical", "auto"), ("hierarchical", "chunked")]  # 4 ranks as 2 nodes x 2


# --- the ranks ---------------------------------------------------------------------------------

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


def test_drop_in_modules_match_their_peers(ranks):
    world, results = ranks
    for r, res in enumerate(results):
        for name, err in res["nn"].items():
            assert err <= tol("peer distributed").atol, f"rank {r}: {name} differs from the peer's formula by {err:.3g}"
