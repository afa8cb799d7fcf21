"""fastcl.distributed.maxsim_loss: documents travel, queries stay. Every strategy (2 ranks; 4 as
2 nodes x 2 for hierarchical) against the single-process reference in float64 at 1e-9: the loss
averaged over ranks, and each rank's gradients of its own tokens (``W`` times the single-process
ones under ``mean``, as for every distributed loss)."""
import pytest
import torch

import fastcl
from fastcl.distributed._spawn import run_ranks
from tolerances import assert_close, tol

B, LQ, LD, D, K = 3, 4, 5, 7, 2  # per rank: queries, query tokens, document tokens, width, extra docs
TIMEOUT_S = 240
CASES = {
    "plain": {},
    "masks_labels_extra": {"masks": True, "labels": True, "extra": True, "normalize_scores": True},
    "symmetric": {"symmetric": True, "masks": True},
}


def _global(world: int, case: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = B * world
    t = {"q": torch.randn(n, LQ, D, generator=g, dtype=torch.float64),
         "d": torch.randn(n, LD, D, generator=g, dtype=torch.float64),
         "temperature": torch.tensor(0.3, dtype=torch.float64)}
    if case.get("masks"):
        t["q_mask"] = torch.rand(n, LQ, generator=g) > 0.3
        t["d_mask"] = torch.rand(n, LD, generator=g) > 0.3
        t["q_mask"][:, 0] = t["d_mask"][:, 0] = True
    if case.get("labels"):
        t["labels"] = torch.randint(0, n, (n,), generator=g)
    if case.get("extra"):
        t["extra_docs"] = torch.randn(K * world, LD, D, generator=g, dtype=torch.float64)
    return t


def _call(t: dict, case: dict, fn, **kw):
    leaves = {k: t[k].clone().requires_grad_() for k in ("q", "d", "temperature", "extra_docs") if k in t}
    args = {k: t[k] for k in ("q_mask", "d_mask", "labels") if k in t}
    if "extra_docs" in leaves:
        args["extra_docs"] = leaves["extra_docs"]
    loss = fn(leaves["q"], leaves["d"], leaves["temperature"], normalize_scores=case.get("normalize_scores", False),
              symmetric=case.get("symmetric", False), **args, **kw)
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


def _shard(t: dict, rank: int, world: int) -> dict:
    out = dict(t)
    for k in ("q", "d", "q_mask", "d_mask", "labels"):
        if k in t:
            out[k] = t[k][rank * B:(rank + 1) * B]
    if "extra_docs" in t:
        out["extra_docs"] = t["extra_docs"][rank * K:(rank + 1) * K]
    return out


def _worker(rank: int, world: int, runs: list) -> dict:
    out = {}
    for name, strategy, node_size, backend in runs:
        case = CASES[name]
        t = _shard(_global(world, case), rank, world)
        try:
            out[name, strategy, backend] = _call(t, case, fastcl.distributed.maxsim_loss, strategy=strategy,
                                                 node_size=node_size, backend=backend)
        except Exception as e:  # noqa: BLE001 -- reported by the test
            out[name, strategy, backend] = repr(e)
    return out


def _runs(strategies):
    return [(name, s, n, backend) for name in CASES for s, n in strategies for backend in ("chunked", "cpu")]


RUNS = {2: _runs([("allgather", None), ("ring", None)]), 4: _runs([("hierarchical", 2)])}


@pytest.fixture(scope="module", params=sorted(RUNS))
def ranks(request):
    world = request.param
    return world, run_ranks(_worker, world, TIMEOUT_S, RUNS[world])


def test_every_strategy_equals_the_single_process_reference(ranks):
    world, results = ranks
    for name, strategy, _, backend in RUNS[world]:
        case = CASES[name]
        t = _global(world, case)
        want_loss, want = _call(t, case, fastcl.maxsim_loss, backend="reference")
        got = [results[r][name, strategy, backend] for r in range(world)]
        for r, res in enumerate(got):
            assert not isinstance(res, str), f"{name} {strategy} {backend} rank {r} raised {res}"
        where = f"{name} {strategy} {backend}"
        assert_close(torch.stack([g[0] for g in got]).mean(), want_loss, tol("maxsim distributed"), where)
        # temperature: a replicated parameter, averaged over ranks as DDP does
        assert_close(torch.stack([g[1]["temperature"] for g in got]).mean(), want["temperature"],
                     tol("maxsim distributed"), f"{where} dtemperature")
        for r, (_, grads) in enumerate(got):
            mine = _shard(want, r, world)
            for k in ("q", "d", "extra_docs"):
                if k in grads:
                    assert_close(grads[k], world * mine[k], tol("maxsim distributed"), f"{where} rank {r} d{k}")
