"""The sweep: every loss x implementation x dtype over increasing N, one fresh process per case.

Cases run N-major (all implementations at one N, then the next N) so that background load, if
any, hits every implementation alike rather than one whole curve. An implementation's sweep
stops at its first out-of-memory: larger N are recorded as "not run" instead of being tried,
which on CPU would only swap or wake the OOM killer again. Naive (and any anchor that
materialises N x N) is skipped up front where its estimated temporaries exceed a cap.
"""
from __future__ import annotations

import statistics

import torch

from . import cases, harness

CASE_MODULE = "fastcl.benchmark.cases"
ROW_KEYS = ("loss", "impl", "mode", "n", "d", "dtype")
# Statuses a row can end with; "ok" rows carry measurements, the others a note saying why not.
STATUSES = ("ok", "oom", "not run", "skipped", "not installed", "unsupported", "failed")


def implementations(loss: str, backends: list[str]) -> list[str]:
    """Naive first (the baseline every ratio refers to), then fastcl's backends, then the anchors
    that implement ``loss``, installed or not (a missing one still gets its "not installed" rows)."""
    return ["naive", *backends, *(a for a, spec in cases.ANCHORS.items() if loss in spec["losses"])]


def plan(losses: list[str], backends: list[str], dtypes: list[str], ns: list[int], d: int,
         repeat: int, device: str, paired: int = 0) -> list[dict]:
    """Cases in run order: per dtype and N the floor first, then per loss every implementation
    and, with ``paired`` > 0, that many processes each timing those of them that ran interleaved
    (impl ``"paired"``: the result goes into their rows as ``paired_median_s`` and ``x_naive_paired``,
    medians over the processes, and ``x_naive_paired_runs``, each process's ratio)."""
    specs = []
    for dtype in dtypes:
        for n in sorted(ns):
            base = {"n": n, "d": d, "dtype": dtype, "repeat": repeat, "device": device}
            specs.append({**base, "loss": "gemm", "impl": "floor", "mode": f"{cases.FLOOR_GEMMS} x (x @ y.T)"})
            for loss in losses:
                for impl in implementations(loss, backends):
                    specs.append({**base, "loss": loss, "impl": impl, "mode": "fwd+bwd"})
                if paired:
                    specs.append({**base, "loss": loss, "impl": "paired", "mode": "interleaved", "runs": paired})
    return specs


def dense_skip_reason(spec: dict, max_gib: float) -> str | None:
    """Why an implementation that materialises N x N is not run at this N (None: it is)."""
    dense = spec["impl"] == "naive" or cases.ANCHORS.get(spec["impl"], {}).get("dense", False)
    if not dense:
        return None
    need = cases.NAIVE_NXN_COPIES[spec["loss"]] * spec["n"] ** 2 * getattr(torch, spec["dtype"]).itemsize
    if need <= max_gib * harness.GiB:
        return None
    return f"needs ~{need / harness.GiB:.1f} GiB of N x N temporaries > --max-naive-gib {max_gib:g}"


def pre_result(spec: dict, max_naive_gib: float, stopped: dict) -> dict | None:
    """The row's outcome when it is decided without running the case, else None."""
    missing = cases.unavailable(spec["impl"], spec["loss"], spec["device"])
    if missing:
        return {"status": missing[0], "note": missing[1]}
    key = (spec["loss"], spec["impl"], spec["dtype"])
    if key in stopped:
        return {"status": "not run", "note": f"out of memory at N={stopped[key]}"}
    reason = dense_skip_reason(spec, max_naive_gib)
    return {"status": "skipped", "note": reason} if reason else None


def run_sweep(specs: list[dict], env: dict, max_naive_gib: float = 8.0, runner=None,
              on_case=None, timeout: float | None = None) -> list[dict]:
    """Run ``specs`` in order and return tidy rows with ratios. ``runner(spec)`` measures one
    case (default: a fresh process); ``on_case(i, spec, result)`` is called before (result None)
    and after each case, for progress display."""
    runner = runner or (lambda spec: harness.run_isolated(CASE_MODULE, spec, timeout))
    stopped: dict[tuple, int] = {}  # (loss, impl, dtype) -> the N that ran out of memory
    rows = []
    for i, spec in enumerate(specs):
        if on_case:
            on_case(i, spec, None)
        if spec["impl"] == "paired":
            result = _run_paired(spec, rows, runner)
            if on_case:
                on_case(i, spec, result)
            continue
        result = pre_result(spec, max_naive_gib, stopped)
        if result is None:
            result = runner(spec)
            if result["status"] == "oom":
                stopped[(spec["loss"], spec["impl"], spec["dtype"])] = spec["n"]
        if on_case:
            on_case(i, spec, result)
        rows.append({**{k: spec[k] for k in ROW_KEYS}, "status": None, "median_s": None,
                     "peak_extra_bytes": None, "other_cpu_frac": None, "note": None, "paired_median_s": None,
                     "x_naive_paired": None, "x_naive_paired_runs": None, **result, **env})
    add_ratios(rows)
    return rows


def _run_paired(spec: dict, rows: list[dict], runner) -> dict:
    """Time the point's measured implementations (naive first) interleaved, in ``spec["runs"]``
    processes (a process's state, where its threads run, shifts all its times, and at 2 threads
    and a millisecond a call its ratio: 1.02x to 1.13x for one point here); write the medians over
    the processes into their rows. Skipped without naive or a second implementation to pair it with."""
    point = [r for r in rows if r["status"] == "ok" and all(r[k] == spec[k] for k in ("loss", "n", "d", "dtype"))]
    point.sort(key=lambda r: r["impl"] != "naive")
    if len(point) < 2 or point[0]["impl"] != "naive":
        return {"status": "skipped", "note": "needs naive and another implementation measured at this point"}
    keys = ("loss", "n", "d", "dtype", "repeat", "device")
    job = {**{k: spec[k] for k in keys}, "paired": [{**{k: spec[k] for k in keys}, "impl": r["impl"]} for r in point]}
    runs = [runner(job) for _ in range(spec.get("runs", 1))]
    failed = [run for run in runs if run["status"] != "ok"]
    if failed:
        return failed[0]
    merged = {}
    for r in point:
        each = [run["paired"][r["impl"]] for run in runs]
        r["paired_median_s"] = statistics.median(t["median_s"] for t in each)
        r["x_naive_paired"] = statistics.median(t["x_first"] for t in each)
        r["x_naive_paired_runs"] = [t["x_first"] for t in each]
        merged[r["impl"]] = {"median_s": r["paired_median_s"], "x_first": r["x_naive_paired"],
                             "rounds": sum(t["rounds"] for t in each)}
    return {"status": "ok", "paired": merged, "runs": len(runs),
            "other_cpu_frac": max(run.get("other_cpu_frac") or 0.0 for run in runs)}


def add_ratios(rows: list[dict]) -> None:
    """Ratios to naive (same loss) and to the loss's GEMM floor (same shape), both from this run."""
    ok = {tuple(r[k] for k in ("loss", "impl", "n", "d", "dtype")): r for r in rows if r["status"] == "ok"}
    for r in rows:
        naive = ok.get((r["loss"], "naive", r["n"], r["d"], r["dtype"]))
        floor = ok.get(("gemm", "floor", r["n"], r["d"], r["dtype"]))
        ok_row = r["status"] == "ok"
        r["x_naive"] = r["median_s"] / naive["median_s"] if ok_row and naive else None
        r["floor_gemms"] = cases.floor_gemms(r["loss"])
        r["x_floor"] = r["median_s"] / cases.floor_seconds(r["loss"], floor["median_s"]) if ok_row and floor else None
        r["mem_frac_naive"] = (r["peak_extra_bytes"] / naive["peak_extra_bytes"]
                               if ok_row and naive and naive["peak_extra_bytes"] > 0 else None)
        # Useful throughput: the floor's flop count (floor_gemms x 2 N^2 D) per second of this implementation.
        r["floor_gflops"] = r["floor_gemms"] * 2 * r["n"] ** 2 * r["d"] / r["median_s"] / 1e9 if ok_row else None
