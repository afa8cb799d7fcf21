"""The cached training step (``fastcl.cached_backward``) and the streaming top-k (``fastcl.topk``) on CPU.

    python bench/cached_topk.py                                   # all three studies, ~10 minutes on 2 cores
    python bench/cached_topk.py --studies topk --topk-n 8192,65536 --out bench/out/topk.json

Every case runs in a fresh process (``harness.run_isolated``: CPU peak memory is VmHWM after
clear_refs, which needs a process whose heap no earlier case has grown). Studies:

- ``cached-time``: one training step of two MLP towers (``--width``-wide hidden layers, dropout,
  a 256-wide embedding) with the CLIP loss, at a batch that fits both: the plain step
  (``loss_fn(img(x), txt(y)).backward()``) against the cached step in chunks of ``--time-chunk``,
  alternating in one process (both see the same background load; the ratio is the median of the
  rounds' ratios). The cached step runs the towers' forward twice, so its floor is about 4/3 of the
  plain step when the towers dominate; the target is at most 1.4x.
- ``cached-memory``: the peak memory of both steps as the batch grows at a fixed chunk size.
- ``topk``: ``fastcl.topk`` (cpu and chunked backends) against ``torch.topk(x @ y.T)`` for M = N rows,
  D = 256, k = 16: time and peak memory beyond inputs and outputs. ``torch.topk`` is skipped where
  S alone would exceed ``--max-naive-gib``.

Rows carry the machine's load: ``other_cpu_frac`` (CPU time other processes used during the case,
as a share of all cores; above ~5% the times are inflated) and the 1-minute load average before the case.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

import harness

STUDIES = ("cached-time", "cached-memory", "topk")


# --- cases (each in its own process) ---------------------------------------------------------------

def _towers(width: int, dim: int):
    torch.manual_seed(0)

    def tower():
        return nn.Sequential(nn.Linear(512, width), nn.GELU(), nn.Dropout(0.1), nn.Linear(width, width), nn.GELU(),
                             nn.Dropout(0.1), nn.Linear(width, dim))
    return tower(), tower()


def _steps(spec: dict, batch: int):
    """(plain step, cached step) on the same towers and inputs."""
    import fastcl

    img, txt = _towers(spec["width"], spec["dim"])
    scale = nn.Parameter(torch.tensor(2.3))
    params = [*img.parameters(), *txt.parameters(), scale]

    def loss_fn(u, v):
        return fastcl.clip_loss(u, v, scale.exp(), normalize=True)

    x, y = torch.randn(batch, 512), torch.randn(batch, 512)

    def plain():
        loss_fn(img(x), txt(y)).backward()
        for p in params:
            p.grad = None

    def cached():
        fastcl.cached_backward(loss_fn, [img, txt], [x, y], chunk_size=spec["chunk"])
        for p in params:
            p.grad = None

    return plain, cached


def cached_time_case(spec: dict) -> dict:
    """Plain and cached steps alternate in one process, so that both see the same background load;
    the ratio is the median of the per-round ratios."""
    plain, cached = _steps(spec, spec["batch"])
    plain(), cached()  # warm-up
    times = {"plain": [], "cached": []}
    for _ in range(spec["repeat"]):
        for name, step in (("plain", plain), ("cached", cached)):
            times[name] += harness.time_repeats(step, 1, warmup=0)
    ratios = sorted(c / p for p, c in zip(times["plain"], times["cached"]))
    return {"plain": harness.summarize(times["plain"]), "cached": harness.summarize(times["cached"]),
            "ratio_median": ratios[len(ratios) // 2], "ratios": ratios}


def cached_memory_case(spec: dict) -> dict:
    plain, cached = _steps(spec, spec["batch"])
    small_plain, small_cached = _steps(spec, 64)
    if spec["impl"] == "plain":
        return harness.measure(plain, 1, warm_up=small_plain)
    return harness.measure(cached, 1, warm_up=small_cached)


def topk_case(spec: dict) -> dict:
    import fastcl

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(spec["m"], spec["d"], generator=gen), torch.randn(spec["n"], spec["d"], generator=gen)
    k = spec["k"]
    if spec["impl"] == "torch.topk":
        def step():
            return torch.topk(x @ y.T, k, dim=1)
    else:
        def step():
            return fastcl.topk(x, y, k, backend=spec["impl"].split("-")[1])
    small = (x[:64], y[:256])
    if spec["impl"] == "torch.topk":
        def warm():
            return torch.topk(small[0] @ small[1].T, k, dim=1)
    else:
        def warm():
            return fastcl.topk(*small, k, backend=spec["impl"].split("-")[1])
    result = harness.measure(step, spec["repeat"], warm_up=warm)
    result["output_bytes"] = spec["m"] * k * (4 + 8)  # values float32 + indices int64: in the peak, not extra
    result["peak_extra_bytes"] -= result["output_bytes"]
    return result


def run_case(spec: dict) -> None:
    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])
    case = {"topk": topk_case, "cached-time": cached_time_case, "cached-memory": cached_memory_case}[spec["study"]]
    result = case(spec)
    print(json.dumps({"status": "ok", **result}))


# --- the parent ------------------------------------------------------------------------------------

def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def specs(args) -> list[dict]:
    out = []
    threads = {"torch_threads": args.threads} if args.threads else {}
    if "cached-time" in args.studies:
        out.append({"study": "cached-time", "impl": "plain vs cached", "batch": args.time_batch,
                    "chunk": args.time_chunk, "width": args.width, "dim": 256, "repeat": args.time_repeat, **threads})
    if "cached-memory" in args.studies:
        for batch in args.memory_batches:
            for impl in ("plain", "cached"):
                out.append({"study": "cached-memory", "impl": impl, "batch": batch, "chunk": args.chunk,
                            "width": args.width, "dim": 256, "repeat": 1, **threads})
    if "topk" in args.studies:
        for n in args.topk_n:
            for impl in ("fastcl-cpu", "fastcl-chunked", "torch.topk"):
                spec = {"study": "topk", "impl": impl, "m": n, "n": n, "d": 256, "k": 16,
                        "repeat": 1 if n > 16384 else args.repeat, **threads}
                if impl == "torch.topk" and n * n * 4 > args.max_naive_gib * harness.GiB:
                    spec.update(status="skipped", note=f"S alone would take {n * n * 4 / harness.GiB:.0f} GiB")
                out.append(spec)
    return out


def show(rows: list[dict]) -> str:
    """The tables as text (printed, and written beside the JSON)."""
    first = rows[0] if rows else {}
    lines = [f"bench/cached_topk.py on {first.get('cpu', '?')}, {first.get('cores', '?')} cores; torch "
             f"{first.get('torch', '?')}, fastcl {first.get('fastcl', '?')}, git {first.get('git_sha', '?')[:10]}"
             f"{' (dirty)' if first.get('git_dirty') else ''}; {first.get('date', '?')[:10]}", ""]

    def ms(r):
        return f"{r['median_s'] * 1e3:.0f}" if r.get("status") == "ok" else r.get("status", "?")

    def mib(r):
        return f"{r['peak_extra_bytes'] / harness.MiB:.1f}" if r.get("status") == "ok" else r.get("note", "")

    def threads(r):
        return str(r.get("torch_threads") or r.get("threads", ""))

    def table(title, columns, cells):
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        lines.append(title)
        lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        lines.extend("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)
        lines.append("")

    for r in (r for r in rows if r["study"] == "cached-time"):
        if r.get("status") != "ok":
            lines += [f"cached-time: {r.get('status')} {r.get('note', '')}", ""]
            continue
        cells = [[name, str(r["batch"]), str(r["chunk"]), str(r["width"]), f"{r[name]['median_s'] * 1e3:.0f}",
                  f"{r[name]['min_s'] * 1e3:.0f}", f"{r[name]['p90_s'] * 1e3:.0f}"] for name in ("plain", "cached")]
        cells.append(["cached / plain", "", "", "", f"{r['ratio_median']:.2f}x", f"{r['ratios'][0]:.2f}x",
                      f"{r['ratios'][-1]:.2f}x"])
        table(f"cached-time: one training step, two MLP towers + CLIP, {r['repeat']} alternating rounds "
              f"(torch threads: {threads(r)}; busy {r['other_cpu_frac']:.0%}, "
              f"load {r['loadavg']:.2f})", ["step", "batch", "chunk", "width", "median ms", "min", "max"], cells)
    mem = [r for r in rows if r["study"] == "cached-memory"]
    if mem:
        cells = [[r["impl"], threads(r), str(r["batch"]), str(r["chunk"]), mib(r),
                  f"{2 * r['batch'] * r['dim'] * 4 / harness.MiB:.0f}", ms(r), f"{r.get('other_cpu_frac', 0):.0%}",
                  f"{r['loadavg']:.2f}"] for r in mem]
        table("cached-memory: peak memory of one step beyond its inputs, fixed chunk (embeddings: the two\n"
              "towers' [N, D] float32 outputs; the cached step holds a few such O(N * D) tensors)",
              ["step", "threads", "batch", "chunk", "peak MiB", "embeddings MiB", "ms", "busy", "load"], cells)
    tk = [r for r in rows if r["study"] == "topk"]
    if tk:
        naive = {(r["n"], r.get("torch_threads")): r for r in tk
                 if r["impl"] == "torch.topk" and r.get("status") == "ok"}
        cells = []
        for r in tk:
            base = naive.get((r["n"], r.get("torch_threads")))
            ratio = f"{r['median_s'] / base['median_s']:.2f}x" if base and r.get("status") == "ok" else ""
            cells.append([r["impl"], threads(r), str(r["m"]), str(r["n"]), str(r["d"]), str(r["k"]), ms(r), ratio,
                          mib(r),
                          f"{r.get('other_cpu_frac', 0):.0%}" if r.get("status") == "ok" else "",
                          f"{r['loadavg']:.2f}"])
        table("topk: k largest x_i . y_j per row (peak MiB: VmHWM growth minus the outputs' bytes; about 0 means\n"
              "nothing measurable beyond the outputs)",
              ["impl", "threads", "M", "N", "D", "k", "median ms", "x torch", "peak MiB", "busy", "load"], cells)
    lines.append("busy: CPU time other processes used during the case, as a share of both cores (50% = one core\n"
                 "taken throughout: run with --threads 1 then, or torch's 2 threads stall at every parallel region).\n"
                 "load: 1-minute load average before the case (this benchmark's previous case included).")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", default=",".join(STUDIES), type=lambda s: s.split(","))
    p.add_argument("--time-batch", type=int, default=4096)
    p.add_argument("--time-chunk", type=int, default=1024)
    p.add_argument("--time-repeat", type=int, default=5)
    p.add_argument("--memory-batches", default="1024,2048,4096,8192", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--width", type=int, default=2048, help="hidden width of the towers")
    p.add_argument("--topk-n", default="8192,16384,65536", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--max-naive-gib", type=float, default=4.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="JSON rows; the tables go beside it as .txt")
    p.add_argument("--render", action="store_true", help="only rewrite the .txt tables from the rows in --out")
    p.add_argument("--update", action="store_true",
                   help="keep the rows already in --out except those this run replaces (same study, threads, "
                        "implementation and size)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.case:
        run_case(json.loads(args.case))
        return
    if args.render:
        text = show(json.loads(args.out.read_text()))
        args.out.with_suffix(".txt").write_text(text + "\n")
        print(text)
        return
    env = harness.environment("cpu")
    rows = []
    for spec in specs(args):
        harness.progress(" ".join(f"{k}={v}" for k, v in spec.items()))
        load = _load()
        result = spec if spec.get("status") else harness.run_isolated(__file__, spec, timeout=1800)
        rows.append({**spec, **result, "loadavg": load, **env})
    out = args.out or Path(__file__).parent / "out" / "cached-topk.json"
    if args.update and Path(out).exists():
        def key(r):
            return r["study"], r.get("torch_threads"), r["impl"], r.get("n", r.get("batch"))
        fresh = {key(r) for r in rows}
        rows = [r for r in json.loads(Path(out).read_text()) if key(r) not in fresh] + rows
        rows.sort(key=lambda r: STUDIES.index(r["study"]))  # stable: each study's rows keep their order
    text = show(rows)
    print(text)
    harness.write_json(rows, out)
    Path(out).with_suffix(".txt").write_text(text + "\n")
    harness.progress(f"wrote {out} and {Path(out).with_suffix('.txt')}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
