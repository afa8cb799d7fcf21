"""Distributed CLIP forward+backward with gloo on CPU: fastcl's strategies vs open_clip's all-gather.

    python bench/distributed.py                                 # B_local=1024, D=256, 2 and 4 ranks
    python bench/distributed.py --batch 2048 --worlds 2,4,8 --out bench/out/dist.json
    python bench/distributed.py --dtype bfloat16 --impls fastcl-ring,fastcl-allgather  # 16-bit features

Every (implementation, world size) case starts its own ranks (fresh processes; see harness.py for
why memory needs them), all ranks run the same steps in lockstep, and each reports its median step
time, its peak extra resident memory (VmHWM over the RSS before the step, inputs excluded) and
what it sent in one more step: point-to-point messages and their bytes, collective calls and the
bytes it put into them. A row holds the slowest rank's time and the largest rank's peak and
traffic. Features are in ``--dtype`` (the ring's blocks travel in it: bfloat16 halves their bytes;
statistics and gradient accumulators stay float32). Implementations:

- ``fastcl-allgather``: ``fastcl.distributed.clip_loss(strategy="allgather")``: O(N_global * D);
- ``fastcl-ring``: ``strategy="ring"``: O(N_local * D), flat in the world size;
- ``fastcl-hier2``: ``strategy="hierarchical", node_size=2``: all-gather within pairs of ranks,
  ring across the pairs: O(2 * N_local * D);
- ``openclip-local``: open_clip ``ClipLoss(local_loss=True, gather_with_grad=True)``: gathered
  features and ``B_local x N_global`` logits per direction;
- ``openclip-global``: open_clip's default ``local_loss=False`` (with ``gather_with_grad=True``):
  the full ``N_global x N_global`` logits on every rank.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import harness
from fastcl.distributed._spawn import run_ranks

TRAFFIC = ("p2p_messages", "p2p_bytes", "collectives", "collective_bytes")
IMPLS = ("fastcl-allgather", "fastcl-ring", "fastcl-hier2", "openclip-local", "openclip-global")


class _GatherWithGrad(torch.autograd.Function):
    """open_clip ``gather_features(gather_with_grad=True)`` (torch.distributed.nn.all_gather)."""

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


def openclip_loss(x, y, s, local_loss: bool):
    all_x, all_y = _GatherWithGrad.apply(x), _GatherWithGrad.apply(y)
    if local_loss:
        per_x, per_y = s * x @ all_y.T, s * y @ all_x.T
        labels = torch.arange(x.shape[0]) + x.shape[0] * dist.get_rank()
    else:
        per_x = s * all_x @ all_y.T
        per_y = per_x.T
        labels = torch.arange(per_x.shape[0])
    return (F.cross_entropy(per_x, labels) + F.cross_entropy(per_y, labels)) / 2


def loss_fn(impl: str):
    import fastcl.distributed as fcd

    return {
        "fastcl-allgather": lambda x, y, s: fcd.clip_loss(x, y, s, strategy="allgather"),
        "fastcl-ring": lambda x, y, s: fcd.clip_loss(x, y, s, strategy="ring"),
        "fastcl-hier2": lambda x, y, s: fcd.clip_loss(x, y, s, strategy="hierarchical", node_size=2),
        "openclip-local": lambda x, y, s: openclip_loss(x, y, s, True),
        "openclip-global": lambda x, y, s: openclip_loss(x, y, s, False),
    }[impl]


class Traffic:
    """What this rank sends while the block runs: point-to-point messages (``batch_isend_irecv``'s
    sends) and their bytes, collective calls and the bytes this rank puts into each."""

    COLLECTIVES = {"all_gather": 1, "all_reduce": 0, "reduce_scatter_tensor": 1, "all_gather_into_tensor": 1}

    def __enter__(self):
        self.p2p = self.p2p_bytes = self.collectives = self.collective_bytes = 0
        self.saved = {name: getattr(dist, name) for name in ("batch_isend_irecv", *self.COLLECTIVES)}

        def p2p(ops):
            for op in ops:
                if op.op is dist.isend:
                    self.p2p += 1
                    self.p2p_bytes += op.tensor.numel() * op.tensor.element_size()
            return self.saved["batch_isend_irecv"](ops)

        def collective(name, arg):
            def call(*args, **kwargs):
                self.collectives += 1
                self.collective_bytes += args[arg].numel() * args[arg].element_size()
                return self.saved[name](*args, **kwargs)
            return call

        dist.batch_isend_irecv = p2p
        for name, arg in self.COLLECTIVES.items():
            setattr(dist, name, collective(name, arg))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)

    def counts(self) -> dict:
        return {"p2p_messages": self.p2p, "p2p_bytes": self.p2p_bytes, "collectives": self.collectives,
                "collective_bytes": self.collective_bytes}


def _rank(rank: int, world: int, spec: dict) -> dict:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    fn = loss_fn(spec["impl"])
    gen = torch.Generator().manual_seed(rank)

    dtype = getattr(torch, spec["dtype"])

    def inputs(b, d):
        x = F.normalize(torch.randn(b, d, generator=gen), dim=-1).to(dtype).requires_grad_()
        y = F.normalize(torch.randn(b, d, generator=gen), dim=-1).to(dtype).requires_grad_()
        return x, y, torch.tensor(10.0, requires_grad=True)

    def make_step(b, d):
        x, y, s = inputs(b, d)

        def step():
            fn(x, y, s).backward()
            x.grad = y.grad = s.grad = None
        return step

    small = make_step(8, spec["dim"])
    step = make_step(spec["batch"], spec["dim"])
    result = harness.measure(step, spec["repeat"], warm_up=small)
    with Traffic() as traffic:
        step()
    return {**result, **traffic.counts()}


def run_case(spec: dict) -> None:
    """Inside the case's own process: start the ranks, print one JSON line."""
    ranks = run_ranks(_rank, spec["world"], 1800, spec)
    print(json.dumps({
        "status": "ok",
        "median_s": max(r["median_s"] for r in ranks),
        **{key: max(r[key] for r in ranks) for key in ("peak_extra_bytes", *TRAFFIC)},
        "per_rank": ranks,
    }))


def show(rows: list[dict]) -> None:
    columns = ["impl", "world", "B_local", "N_global", "D", "step (s)", "peak/rank (MiB)", "peak vs 2 ranks"]
    traffic_columns = ["impl", "world", "p2p msgs/rank", "p2p MiB/rank", "collectives/rank", "coll. MiB/rank"]
    base = {r["impl"]: r["peak_extra_bytes"] for r in rows if r.get("status") == "ok" and r["world"] == min(
        x["world"] for x in rows)}
    cells, traffic = [], []
    for r in rows:
        if r.get("status") != "ok":
            cells.append([r["impl"], str(r["world"]), str(r["batch"]), str(r["batch"] * r["world"]), str(r["dim"]),
                          "failed", r.get("note", ""), ""])
            continue
        ratio = r["peak_extra_bytes"] / base[r["impl"]] if base.get(r["impl"]) else float("nan")
        cells.append([r["impl"], str(r["world"]), str(r["batch"]), str(r["batch"] * r["world"]), str(r["dim"]),
                      f"{r['median_s']:.3f}", f"{r['peak_extra_bytes'] / harness.MiB:.1f}", f"{ratio:.2f}x"])
        traffic.append([r["impl"], str(r["world"]), str(r["p2p_messages"]), f"{r['p2p_bytes'] / harness.MiB:.2f}",
                        str(r["collectives"]), f"{r['collective_bytes'] / harness.MiB:.2f}"])
    dtypes = ", ".join(sorted({r["dtype"] for r in rows}))
    harness.print_table(f"CLIP forward+backward per step, {dtypes} features, gloo on CPU (slowest rank's median, "
                        "largest rank's peak)", columns, cells, right=set(columns) - {"impl"})
    harness.print_table(f"What a rank sends in one step, {dtypes} features (the largest rank's): point-to-point "
                        "messages and bytes, collective calls and the bytes it puts in", traffic_columns, traffic,
                        right=set(traffic_columns) - {"impl"})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1024, help="local batch per rank")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the features' dtype")
    p.add_argument("--worlds", default="2,4", help="comma-separated world sizes")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--case", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.case:
        run_case(json.loads(args.case))
        return
    env = harness.environment("cpu")
    rows = []
    for world in (int(w) for w in args.worlds.split(",")):
        for impl in args.impls.split(","):
            spec = {"impl": impl, "world": world, "batch": args.batch, "dim": args.dim, "repeat": args.repeat,
                    "loss": "clip", "dtype": args.dtype, "backend": "gloo"}
            harness.progress(f"{impl} world={world} B_local={args.batch} D={args.dim} {args.dtype}")
            rows.append({**spec, **harness.run_isolated(__file__, spec), **env})
    show(rows)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = harness.write_json(rows, args.out or Path(__file__).parent / "out" / f"distributed-{stamp}.json")
    harness.progress(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
