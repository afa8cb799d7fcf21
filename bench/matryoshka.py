"""Matryoshka CLIP (or SigLIP) on CPU: the K prefixes from one pass over the features against the loop of K losses.

    python bench/matryoshka.py --out bench/results/DATE-cpu-matryoshka.json        # ~5 minutes on 2 cores
    python bench/matryoshka.py --loss siglip --out bench/results/DATE-cpu-matryoshka-siglip.json

One forward+backward of ``clip_loss(x, y, s, normalize=True, matryoshka_dims=dims)`` (``--loss siglip``:
``siglip_loss(x, y, s, b, ...)``) at N rows, D = 768, dims 64, 128, 256, 512, 768 (K = 5; ``--dims``),
each case in a fresh process (``harness.run_isolated``: CPU peak memory is VmHWM growth):

- ``fastcl one pass``: what ``matryoshka_dims`` runs (op ``lse_prefixes``, SigLIP's ``pointwise_prefixes``,
  backend ``auto``);
- ``fastcl K-loop``: ``sum_k clip_loss(x[:, :d_k], y[:, :d_k], normalize=True)``, what a user
  writes without it (and what sentence-transformers' MatryoshkaLoss does);
- ``naive K-loop``: the same loop over the textbook loss (S materialised; two cross-entropies, or
  SigLIP's log-sigmoid of every pair);
- ``fastcl single`` and ``naive single``: one loss at D, the yardstick of "one pass costs about one loss".

Memory is flat in K when the one pass's peak is about the single loss's. The issue's targets (N = 4096):
one pass <= 0.6x the fastcl K-loop and <= 1.5x the single loss.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import harness

IMPLS = ("fastcl one pass", "fastcl K-loop", "naive K-loop", "fastcl single", "naive single")


def _naive(x, y, s):
    logits = s * F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T
    target = torch.arange(x.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _naive_siglip(x, y, s):
    logits = s * F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T + SIGLIP_BIAS
    labels = 2 * torch.eye(x.shape[0], dtype=x.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / x.shape[0]


SIGLIP_BIAS = -10.0  # SigLIP's initial bias


def _step(impl: str, x, y, s, dims, loss: str = "clip"):
    import fastcl

    d = x.shape[1]
    def fused(x, y, **kw):
        if loss == "siglip":
            return fastcl.siglip_loss(x, y, s, SIGLIP_BIAS, normalize=True, **kw)
        return fastcl.clip_loss(x, y, s, normalize=True, **kw)

    naive = _naive_siglip if loss == "siglip" else _naive
    if impl == "fastcl one pass":
        return lambda: fused(x, y, matryoshka_dims=dims).backward()
    if impl == "fastcl K-loop":
        return lambda: sum(fused(x[:, :k], y[:, :k]) for k in dims).backward()
    if impl == "naive K-loop":
        return lambda: sum(naive(x[:, :k], y[:, :k], s) for k in dims).backward()
    if impl == "fastcl single":
        return lambda: fused(x, y, matryoshka_dims=(d,)).backward()
    return lambda: naive(x, y, s).backward()


def run_case(spec: dict) -> None:
    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])
    gen = torch.Generator().manual_seed(0)
    n, d, dims = spec["n"], spec["d"], tuple(spec["dims"])
    x, y = (torch.randn(n, d, generator=gen).requires_grad_() for _ in range(2))
    s = torch.tensor(10.0)
    small = [t[:64].detach().requires_grad_() for t in (x, y)]
    loss = spec.get("loss", "clip")
    result = harness.measure(_step(spec["impl"], x, y, s, dims, loss), spec["repeat"],
                             warm_up=_step(spec["impl"], *small, s, dims, loss))
    print(json.dumps({"status": "ok", **result}))


def show(rows: list[dict]) -> str:
    first = rows[0] if rows else {}
    lines = [f"bench/matryoshka.py on {first.get('cpu', '?')}, {first.get('cores', '?')} cores; torch "
             f"{first.get('torch', '?')}, git {first.get('git_sha', '?')[:10]}"
             f"{' (dirty)' if first.get('git_dirty') else ''}; "
             f"{first.get('date', '?')[:10]}", "",
             f"{first.get('loss', 'clip').upper()} forward+backward, normalize=True, float32; dims "
             + ",".join(map(str, first.get("dims", []))), ""]
    header = ["impl", "threads", "N", "D", "K", "median ms", "min ms", "x K-loop", "x single", "peak MiB", "busy"]
    cells = []
    by = {(r["impl"], r["n"], r.get("torch_threads")): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            cells.append([r["impl"], "", str(r["n"]), str(r["d"]), str(len(r["dims"])), r.get("status", "?"),
                          "", "", "", r.get("note", "")[:40], ""])
            continue
        key = r["n"], r.get("torch_threads")
        loop, single = by.get(("fastcl K-loop", *key)), by.get(("fastcl single", *key))
        cells.append([r["impl"], str(r.get("torch_threads") or r.get("threads", "")), str(r["n"]), str(r["d"]),
                      str(len(r["dims"])), f"{r['median_s'] * 1e3:.0f}", f"{r['min_s'] * 1e3:.0f}",
                      f"{r['median_s'] / loop['median_s']:.2f}x" if loop else "",
                      f"{r['median_s'] / single['median_s']:.2f}x" if single else "",
                      f"{r['peak_extra_bytes'] / harness.MiB:.0f}", f"{r.get('other_cpu_frac', 0):.0%}"])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(v.rjust(w) for v, w in zip(c, widths)) for c in cells]
    lines += ["", "x K-loop, x single: median time over fastcl's K-loop / single loss at D of the same N and threads.",
              "peak MiB: VmHWM growth of the first call beyond the inputs (gradients included).",
              "busy: CPU time other processes used during the case, as a share of all cores."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="1024,4096", type=lambda s: [int(v) for v in s.split(",")], help="batch sizes")
    p.add_argument("--d", type=int, default=768, help="feature width D")
    p.add_argument("--dims", default="64,128,256,512,768", type=lambda s: [int(v) for v in s.split(",")],
                   help="the Matryoshka prefixes d_1 < ... < d_K <= D")
    p.add_argument("--loss", choices=("clip", "siglip"), default="clip", help="the loss at each prefix")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per case")
    p.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="JSON rows; the table goes beside it as .txt")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        run_case(json.loads(args.case))
        return
    env = harness.environment("cpu")
    rows = []
    for n in args.n:
        for impl in IMPLS:
            spec = {"impl": impl, "loss": args.loss, "n": n, "d": args.d, "dims": args.dims, "repeat": args.repeat,
                    **({"torch_threads": args.threads} if args.threads else {})}
            harness.progress(f"{impl} N={n}")
            rows.append({**spec, **harness.run_isolated(__file__, spec, timeout=1800), **env})
    text = show(rows)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        harness.write_json(rows, args.out)
        args.out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
