"""``fastcl.cached_backward`` (and ``fastcl.cached_loss(...).backward()``) on 2 gloo ranks with
``fastcl.distributed`` losses: each rank embeds only its own shard, in chunks.

- plain towers, no dropout: the mean over ranks of each parameter's gradient (what DDP's average
  gives) equals the single-process full-batch gradient;
- DDP towers, dropout on, CLIP / SigLIP / SupCon (one DDP module for both views): the parameter
  gradients equal the plain chunked step's on the unwrapped modules, averaged over ranks by hand,
  including the loss's parameters owned by a DDP module; and DDP all-reduced once per module
  (a comm hook counts its bucket reductions). The same for ``cached_loss``, whose second pass runs
  inside the caller's backward (a backward within a backward, for DDP's hooks).

The ranks start once (a module fixture), run every case and save the gradients; the tests compare.
"""
from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fastcl
from cached_cases import build, grads, plain_step
from fastcl.distributed._spawn import run_ranks
from tolerances import assert_close, tol

WORLD, ROWS, CHUNK = 2, 11, 4  # 11 local rows: chunks of 4, 4, 3
LOSSES = ["clip", "siglip", "supcon"]
TIMEOUT_S = 180


def _counting_ddp(counts: list):
    """A DDP wrapper whose comm hook counts the buckets it all-reduces (then averages, as DDP does)."""
    def wrap(module):
        ddp = DDP(module)
        slot = len(counts)
        counts.append(0)

        def hook(state, bucket):
            counts[slot] += 1
            t = bucket.buffer().div_(dist.get_world_size())
            return dist.all_reduce(t, async_op=True).get_future().then(lambda fut: fut.value()[0])

        ddp.register_comm_hook(None, hook)
        return ddp
    return wrap


def _average_over_ranks(g: dict) -> dict:
    out = {}
    for name, t in g.items():
        t = t.clone()
        dist.all_reduce(t)
        out[name] = t / dist.get_world_size()
    return out


def _cached_backward(setup):
    fastcl.cached_backward(setup.loss_fn, setup.encoders, setup.inputs, chunk_size=CHUNK)


def _cached_loss(setup):
    fastcl.cached_loss(setup.loss_fn, setup.encoders, setup.inputs, chunk_size=CHUNK).backward()


def _ddp_case(loss: str, rank: int, step=_cached_backward) -> dict:
    """Cached step through DDP towers vs the plain chunked step on the same (unwrapped) modules with
    the gradients averaged by hand; the same dropout seed on both."""
    counts = []
    cached = build(loss, ROWS, dropout=0.3, distributed=True, wrap=_counting_ddp(counts), rank=rank, world=WORLD)
    torch.manual_seed(100 + rank)
    step(cached)
    plain = build(loss, ROWS, dropout=0.3, distributed=True, rank=rank, world=WORLD)
    torch.manual_seed(100 + rank)
    plain_step(plain, CHUNK)
    return {"cached": grads(cached), "want": _average_over_ranks(grads(plain)), "syncs": counts,
            "modules": len({id(e) for e in cached.encoders})}


class _Hidden(torch.nn.Module):
    """A DDP module inside a module of the caller's (a trainer's loss holding the wrapped model, as
    sentence-transformers' does, inside fastcl's ModelOutput): ``cached_backward`` cannot see the DDP,
    which then syncs on every chunk, the first one's graph kept from the first pass included."""

    def __init__(self, ddp):
        super().__init__()
        self.ddp = ddp

    def forward(self, x):
        return self.ddp(x)


def _hidden_ddp_case(loss: str, rank: int) -> dict:
    counts = []
    count = _counting_ddp(counts)
    cached = build(loss, ROWS, dropout=0.3, distributed=True, wrap=lambda m: _Hidden(count(m)), rank=rank, world=WORLD)
    torch.manual_seed(100 + rank)
    _cached_loss(cached)
    plain = build(loss, ROWS, dropout=0.3, distributed=True, rank=rank, world=WORLD)
    torch.manual_seed(100 + rank)
    plain_step(plain, CHUNK)
    return {"cached": grads(cached), "want": _average_over_ranks(grads(plain)), "syncs": counts}


def _shard_case(loss: str, rank: int) -> dict:
    """Cached step on plain towers (no DDP, no dropout): per-rank gradients, averaged here as DDP would."""
    setup = build(loss, ROWS, dropout=0.0, distributed=True, rank=rank, world=WORLD)
    fastcl.cached_backward(setup.loss_fn, setup.encoders, setup.inputs, chunk_size=CHUNK)
    return {"averaged": _average_over_ranks(grads(setup))}


def _worker(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    results = {}
    for loss in LOSSES:
        for name, case in (("ddp", _ddp_case), ("shard", _shard_case),
                           ("ddp-loss", lambda loss, rank: _ddp_case(loss, rank, _cached_loss)),
                           ("ddp-hidden", _hidden_ddp_case)):
            try:
                results[name, loss] = case(loss, rank)
            except Exception:  # noqa: BLE001
                results[name, loss] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_worker, WORLD, TIMEOUT_S)


def _result(ranks, name, loss, rank):
    res = ranks[rank][name, loss]
    assert not isinstance(res, str), f"rank {rank} raised:\n{res}"
    return res


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", ["ddp", "ddp-loss"])
def test_ddp_gradients_equal_the_plain_step_with_dropout(ranks, name, loss):
    for rank in range(WORLD):
        res = _result(ranks, name, loss, rank)
        assert_close(res["cached"], res["want"], tol("cached gradients"), f"rank {rank}")


def test_ddp_hidden_in_a_module_syncs_every_chunk_with_the_same_gradients(ranks):
    """SupCon: no parameter in the loss. CLIP and SigLIP, whose scale (and bias) the text tower's
    hidden DDP module owns: that gradient cannot join a chunk's backward (DDP expects it in every one
    of them), and fastcl says so, on every rank, before DDP would fail with its own words."""
    for rank in range(WORLD):
        res = _result(ranks, "ddp-hidden", "supcon", rank)
        assert_close(res["cached"], res["want"], tol("cached gradients"), f"rank {rank}")
        assert res["syncs"] == [6], f"rank {rank}: all-reduces {res['syncs']} (2 views x 3 chunks)"
        for loss in ("clip", "siglip"):
            error = ranks[rank]["ddp-hidden", loss]
            assert isinstance(error, str) and "belongs to a DistributedDataParallel module inside encoders[1]" \
                in error, f"rank {rank}, {loss}: {error}"


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", ["ddp", "ddp-loss"])
def test_ddp_syncs_once_per_module(ranks, name, loss):
    for rank in range(WORLD):
        res = _result(ranks, name, loss, rank)
        assert res["syncs"] == [1] * res["modules"], f"rank {rank}: all-reduces per DDP module {res['syncs']}"


@pytest.mark.parametrize("loss", LOSSES)
def test_sharded_batch_gives_the_single_process_gradients(ranks, loss):
    single = build(loss, ROWS * WORLD, dropout=0.0)
    plain_step(single, ROWS * WORLD)
    want = grads(single)
    for rank in range(WORLD):
        assert_close(_result(ranks, "shard", loss, rank)["averaged"], want, tol("cached gradients"), f"rank {rank}")
