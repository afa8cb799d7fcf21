"""``fastcl bench``: sweep the batch size N for losses x implementations x dtypes on this device.

    fastcl bench                                       # CLIP + SigLIP, N = 512..4096, D = 512
    fastcl bench --n 1024,4096,16384 --losses clip --repeat 2
    fastcl bench --losses ntxent,supcon --dtype float32,bfloat16 --backends cpu

Per case it reports the median forward+backward time, its ratio to naive PyTorch and to the loss's
GEMM floor (the x @ y.T products it cannot avoid: 4, SigLIP 3) measured in the same run, the peak
extra memory and its share of naive's. Rows go to
``<out-dir>/<stamp>.json``, the time/memory-vs-N figure to ``<out-dir>/<stamp>.png``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import sys
import time
from pathlib import Path

import torch

from . import cases, harness, sweep

MISSING_HINT = "pip install 'fastcl[bench]'  (or: pip install rich matplotlib)"
UNMEASURED = ("not installed", "unsupported")  # one table line per implementation, not per N


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The options, each help ending in its default. List defaults are written as the comma lists one
    would type (argparse runs a string default through ``type``), so the help shows them that way."""
    p = argparse.ArgumentParser(prog="fastcl bench", description=__doc__.splitlines()[0].split(": ", 1)[1],
                                epilog="Each case runs in a fresh process; progress goes to stderr, the table "
                                       "to stdout.")
    p.add_argument("--losses", type=_str_list, default="clip,siglip",
                   help=f"subset of {','.join(cases.LOSSES)} (default: %(default)s)")
    p.add_argument("--backends", type=_str_list, default=None,
                   help="fastcl backends to compare (default: auto and all available here but reference)")
    p.add_argument("--dtype", type=_str_list, default="float32",
                   help="float32,bfloat16,float16 (comma list; default: %(default)s)")
    p.add_argument("--n", type=_int_list, default="512,1024,2048,4096",
                   help="batch sizes, comma-separated (default: %(default)s)")
    p.add_argument("--d", type=int, default=512, help="feature width (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed calls per case at least, after the memory/warm-up call; a fast case runs more, "
                        "for half a second (default: %(default)s)")
    p.add_argument("--paired", type=int, default=0, metavar="PROCESSES",
                   help="also time each point's implementations interleaved, in this many processes (rounds of "
                        "one call each), and report the median ratio to naive from those: steadier than separate "
                        "runs on a busy or small machine; 3 is a good choice (default: %(default)s, off)")
    p.add_argument("--max-naive-gib", type=float, default=8.0,
                   help="skip naive (and dense anchors) where their N x N temporaries would exceed this "
                        "(default: %(default)s)")
    p.add_argument("--out-dir", type=Path, default="fastcl-bench",
                   help="where <stamp>.json and .png go (default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run (default: cuda when torch sees a GPU, else cpu; here %(default)s)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if bad := [loss for loss in args.losses if loss not in cases.LOSSES]:
        p.error(f"unknown loss {bad}: choose from {','.join(cases.LOSSES)}")
    if bad := [dt for dt in args.dtype if dt not in ("float32", "bfloat16", "float16")]:
        p.error(f"unknown dtype {bad}")
    if args.repeat < 1 or args.d < 1 or not args.n or min(args.n) < 2:
        p.error("--repeat and --d must be positive, --n at least 2")
    if "ntxent" in args.losses and any(n % 2 for n in args.n):
        p.error("ntxent needs even N (two views of N/2 samples)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    args.backends = _backends(p, args)
    return args


def _backends(p: argparse.ArgumentParser, args) -> list[str]:
    """The requested backends, or ``auto`` (what a call without ``backend=`` runs: at small N the
    materialised S) and every backend that runs here for all the dtypes (but reference: it
    materialises S like naive and exists for tests). An unavailable explicit one is an error now
    rather than a column of failures later."""
    import fastcl

    usable = [set(fastcl.backends(args.device, getattr(torch, dt))) | {"auto"} for dt in args.dtype]
    if args.backends is None:
        return ["auto", *(b for b in fastcl.backends(args.device) if b != "reference" and all(b in u for u in usable))]
    if bad := [b for b in args.backends if not all(b in u for u in usable)]:
        p.error(f"backend(s) {bad} cannot run on {args.device} for {','.join(args.dtype)} here; "
                f"available: {sorted(set.intersection(*usable))} (see `fastcl info`)")
    return args.backends


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The terminal table: one line per measured case, one per implementation that never ran."""
    columns = ["loss", "impl", "N", "dtype", "median ms", "x naive", "x floor", "peak MiB", "% naive mem",
               "busy", "status"]
    paired = any(r.get("x_naive_paired") is not None for r in rows)
    if paired:  # interleaved in one process (--paired): beside the separate runs' ratio
        columns.insert(6, "x naive paired")
    cells, seen = [], set()
    for r in rows:
        if r["status"] in UNMEASURED:
            key = (r["loss"], r["impl"], r["dtype"])
            if key not in seen:
                seen.add(key)
                cells.append([r["loss"], r["impl"], "all", r["dtype"], *[""] * (6 + paired),
                              f"{r['status']}: {r['note']}"])
            continue
        ok = r["status"] == "ok"
        status = "ok" if ok else f"{r['status'].upper() if r['status'] == 'oom' else r['status']}: {r['note']}"
        busy = r.get("other_cpu_frac")
        cells.append([
            r["loss"], r["impl"], str(r["n"]), r["dtype"],
            _fmt(r["median_s"] * 1e3 if ok else None, ".1f"), _fmt(r["x_naive"], ".2f"), _fmt(r["x_floor"], ".2f"),
            _fmt(r["peak_extra_bytes"] / harness.MiB if ok else None, ".1f"),
            _fmt(None if r["mem_frac_naive"] is None else 100 * r["mem_frac_naive"], ".1f", "%"),
            _fmt(None if busy is None else 100 * busy, ".0f", "%"), status])
        if paired:
            cells[-1].insert(6, _fmt(r.get("x_naive_paired"), ".2f"))
    return columns, cells


def show(rows: list[dict]) -> None:
    env = rows[0]
    where = env.get("gpu") or f"{env['cpu']} ({env['threads']} threads)"
    sha = env["git_sha"][:10] + ("+dirty" if env["git_dirty"] else "") if env["git_sha"] else "installed"
    title = (f"forward+backward, D={env['d']}, on {env['device']}: {where}; torch {env['torch']}, "
             f"fastcl {env['fastcl']} {sha}\n{cases.FLOOR_NOTE}")
    if any((r.get("other_cpu_frac") or 0) > 0.05 for r in rows):
        title += "\nbusy = CPU used by other processes during the case: above ~5% its time is inflated, rerun"
    columns, cells = table_cells(rows)
    harness.print_table(title, columns, cells, right={"N", "median ms", "x naive", "x naive paired", "x floor",
                                                      "peak MiB", "% naive mem", "busy"})


class _Progress:
    """A rich progress bar on stderr with one log line per finished case; plain lines without rich."""

    def __init__(self, total: int):
        self.total, self.bar, self.said = total, None, set()
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            return
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=True)
        self.task = self.bar.add_task("starting", total=total)

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def __call__(self, i: int, spec: dict, result: dict | None) -> None:
        label = f"{spec['loss']} {spec['impl']} N={spec['n']} {spec['dtype']}"
        if result is None:
            self.t0 = time.perf_counter()
            if self.bar:
                self.bar.update(self.task, description=label)
            return
        if result["status"] == "ok" and "paired" in result:
            first = next(iter(result["paired"].values()))
            done = ", ".join(f"{impl} {t['x_first']:.2f}x" for impl, t in result["paired"].items()) + \
                f" of naive in {first['rounds']} rounds, {result.get('runs', 1)} process(es)"
        elif result["status"] == "ok":
            done = f"{result['median_s'] * 1e3:.1f} ms, +{result['peak_extra_bytes'] / harness.MiB:.1f} MiB"
        else:
            done = f"{result['status']}: {result.get('note', '')}"
        if (result.get("other_cpu_frac") or 0) > 0.05:
            done += f" (other processes used {result['other_cpu_frac']:.0%} of the CPU meanwhile)"
        line = f"[{i + 1}/{self.total}] {label}: {done} ({time.perf_counter() - self.t0:.1f} s)"
        # "not installed" is news once per implementation, not once per N.
        key = (spec["loss"], spec["impl"], spec["dtype"], result["status"])
        quiet = result["status"] in UNMEASURED and key in self.said
        self.said.add(key)
        if self.bar:
            if not quiet:  # soft_wrap: one case, one line, even when stderr is not a terminal
                self.bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
            self.bar.advance(self.task)
        elif not quiet:
            harness.progress(line)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Checked before the sweep, not after minutes of measuring: the figure is part of the result.
    if importlib.util.find_spec("matplotlib") is None:
        harness.progress(f"fastcl bench needs matplotlib for its figure: {MISSING_HINT}")
        return 2
    if importlib.util.find_spec("rich") is None:
        harness.progress(f"rich is not installed, so progress and table are plain text; for rich: {MISSING_HINT}")
    from . import plot

    env = harness.environment(args.device)
    specs = sweep.plan(args.losses, args.backends, args.dtype, args.n, args.d, args.repeat, args.device,
                       paired=args.paired)
    harness.progress(f"fastcl bench: {len(specs)} cases on {args.device}, each in a fresh process; "
                     f"backends {', '.join(args.backends)}")
    t0 = time.perf_counter()
    with _Progress(len(specs)) as bar:
        rows = sweep.run_sweep(specs, env, args.max_naive_gib, on_case=bar)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    json_path = harness.write_json(rows, args.out_dir / f"{stamp}.json")
    show(rows)
    print(f"{len(rows)} rows in {time.perf_counter() - t0:.0f} s -> {json_path}")
    try:  # the rows and the table are already out: a plotting problem must not lose them
        print(f"figure -> {plot.plot(rows, args.out_dir / f'{stamp}.png')}")
    except Exception as exc:  # reported, not raised: the JSON can be replotted after a fix
        harness.progress(f"plotting failed ({type(exc).__name__}: {exc}); "
                         f"retry with: python -m fastcl.benchmark.plot {json_path}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
