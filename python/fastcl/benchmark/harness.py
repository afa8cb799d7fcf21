"""Benchmark machinery: isolated cases, timing, peak memory, out-of-memory, metadata, tables, JSON.

Every case runs in a fresh Python process (``run_isolated``). That is what makes the CPU memory
numbers honest: glibc keeps freed heap mapped, so after one case has touched 1 GiB the next one
in the same process would reuse those pages and show (almost) no growth. A fresh process also
keeps one case's heap and allocator state from changing another's timing, and an out-of-memory
case (even one the kernel kills) takes down only itself.

A case reports one JSON object on its stdout; the parent turns it into a tidy row (one row per
loss x implementation x shape x dtype, metadata repeated in every row so any row stands alone).
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MiB = 1 << 20
GiB = 1 << 30
PACKAGE_DIR = Path(__file__).resolve().parent.parent
_TORCH_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # top-level since torch 2.5
# Messages that mean "out of memory" rather than a bug: torch's CPU allocator raises a plain
# RuntimeError with the first one; the others cover CUDA and plain Python allocations.
OOM_MARKERS = ("DefaultCPUAllocator: can't allocate", "CUDA out of memory", "out of memory", "MemoryError")


# --- measurement (runs inside the case's own process) -----------------------------------------

def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_extra_bytes(step) -> int:
    """Peak resident memory ``step()`` adds on top of what exists before it (inputs included
    in the baseline, so only the work's own temporaries and its outputs/gradients count).

    Writing "5" to clear_refs resets VmHWM (the resident high-water mark) to the current RSS;
    torch's allocations are invisible to tracemalloc, so the kernel's counter is the only
    reliable one on CPU.
    """
    gc.collect()
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return _status_bytes("VmHWM") - before


def cuda_peak_extra_bytes(step) -> int:
    """The same on CUDA, from the caching allocator's own counters (exact, no process tricks)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def time_repeats(step, repeat: int, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Seconds of ``repeat`` calls of ``step`` after ``warmup`` untimed ones. CPU ops are
    synchronous, so perf_counter around the call is the whole cost; CUDA launches are not, so
    there each call is bracketed by events recorded on the stream the work runs on."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def time_interleaved(steps: dict, min_seconds: float, min_rounds: int, device: str = "cpu") -> dict[str, list[float]]:
    """Seconds of each of ``steps``' calls, taken in rounds: every step once per round, the order
    rotated round to round, for at least ``min_rounds`` rounds and ``min_seconds`` in all (up to
    ``MAX_REPEAT`` rounds). Whatever else the machine does then hits every step alike, so the
    ratio of two steps' times within a round is steadier than that of two separate runs (at a few
    milliseconds a call, separate runs of one step scatter by 10-40% on a shared 2-core machine)."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    t0, rounds = time.perf_counter(), 0
    while rounds < min_rounds or (time.perf_counter() - t0 < min_seconds and rounds < MAX_REPEAT):
        for k in range(len(names)):
            name = names[(rounds + k) % len(names)]
            times[name] += time_repeats(steps[name], 1, warmup=0, device=device)
        rounds += 1
    return times


def paired_ratio(times: list[float], baseline: list[float]) -> float:
    """The median over rounds of a step's time over the baseline's in the same round
    (``time_interleaved``'s lists)."""
    return statistics.median(a / b for a, b in zip(times, baseline))


def summarize(times: list[float]) -> dict:
    """Median, min, p10 and p90 (inclusive quantiles; with one sample they are all that sample)."""
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"median_s": statistics.median(times), "min_s": min(times), "p10_s": qs[0],
            "p90_s": qs[-1], "times_s": times, "repeat": len(times)}


MAX_REPEAT = 200  # the most timed calls min_seconds may ask for


def measure(step, repeat: int, warm_up=None, device: str = "cpu", min_seconds: float = 0.0) -> dict:
    """Memory first, on a cold call (so it sees the allocations a first call really makes), then
    timing. The memory call doubles as the timing warm-up: later calls reuse the heap it grew,
    which is the steady state a training loop sees. ``warm_up``, a tiny version of the step, runs
    before all that: one-time lazy initialisation (imports, op registration, kernel compilation)
    is not the step's memory, and at that size it cannot pre-grow the heap the real call needs.
    ``min_seconds``: time at least ``repeat`` calls and at least that long in all (up to
    ``MAX_REPEAT`` calls): a median of 3 calls of a millisecond is mostly scheduler noise."""
    if warm_up is not None:
        warm_up()
    peak = cuda_peak_extra_bytes(step) if device == "cuda" else peak_extra_bytes(step)
    times = time_repeats(step, 1, warmup=0, device=device)
    more = max(repeat, min(MAX_REPEAT, math.ceil(min_seconds / max(times[0], 1e-9)))) - 1
    times += time_repeats(step, more, warmup=0, device=device) if more > 0 else []
    return {"peak_extra_bytes": peak, **summarize(times)}


def is_oom(exc: BaseException) -> bool:
    """Whether an exception means the case did not fit in memory (as opposed to a bug)."""
    if isinstance(exc, MemoryError | _TORCH_OOM):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MARKERS)


# --- running cases in fresh processes (parent side) -------------------------------------------

def run_isolated(target: str, spec: dict, timeout: float | None = None) -> dict:
    """Run ``target --case <spec json>`` in a new interpreter (``target`` a script path, or a
    module name run with ``-m``); return the JSON object its last stdout line holds, or
    ``{"status": "oom" | "failed", "note": ...}`` when it did not finish."""
    script = target.endswith(".py") or os.sep in target
    cmd = [sys.executable, *([target] if script else ["-m", target]), "--case", json.dumps(spec)]
    busy0, total0 = _cpu_seconds()
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "note": f"timed out after {timeout:g} s"}
    busy1, total1 = _cpu_seconds()
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time spent by anything but this case while it ran, as a fraction of all cores: other
    # work inflates every time and oversubscribes torch's threads; a row with a large value
    # should be rerun, not believed.
    own = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
    other = max(0.0, (busy1 - busy0) - own) / max(1e-9, total1 - total0)
    if proc.returncode == 0:
        try:
            return {**json.loads(proc.stdout.strip().splitlines()[-1]), "other_cpu_frac": other}
        except (IndexError, json.JSONDecodeError):
            pass
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    last = lines[-1][:200] if lines else ""
    # SIGKILL with no Python traceback is what the kernel's OOM killer leaves behind.
    if proc.returncode == -signal.SIGKILL:
        return {"status": "oom", "note": f"killed (SIGKILL, likely the OOM killer) {last}".strip()}
    if any(m in (proc.stderr or "") for m in OOM_MARKERS):
        return {"status": "oom", "note": last}
    return {"status": "failed", "note": f"exit {proc.returncode}: {last}"}


def progress(msg: str) -> None:
    """Progress goes to stderr so stdout carries only the final table."""
    print(msg, file=sys.stderr, flush=True)


# --- metadata --------------------------------------------------------------------------------

def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _source_tree_git() -> tuple[str, bool]:
    """(sha, dirty) of the fastcl checkout this code runs from; ("", False) for an installed copy
    outside one (a venv inside some other repository must not lend that repository's sha).
    ``FASTCL_GIT_SHA`` wins when set: an installed copy, or a copy of the tree without .git (a GPU
    machine's), has no checkout to ask, so whoever runs it names the commit (a ``+dirty`` suffix:
    uncommitted changes on top of it)."""
    given = os.environ.get("FASTCL_GIT_SHA", "").strip()
    if given:
        sha, dirty = given.removesuffix("+dirty"), given.endswith("+dirty")
        return sha, dirty
    top = _git("rev-parse", "--show-toplevel")
    if not top or not (Path(top) / "python" / "fastcl" / "__init__.py").exists():
        return "", False
    return _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain", "--untracked-files=no"))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict:
    """What every row carries so that results from different machines and commits can be mixed.
    ``git_dirty`` matters: numbers from an uncommitted tree are not reproducible from the sha."""
    import fastcl

    sha, dirty = _source_tree_git()
    env = {
        "device": device,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastcl": fastcl.__version__,
        "python": platform.python_version(),
        "git_sha": sha,
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return env


def _cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(t) for t in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4]) / tick, sum(v) / tick  # idle and iowait are not busy


# --- output ----------------------------------------------------------------------------------

def write_json(rows: list[dict], path: str | Path) -> Path:
    """Tidy rows as one JSON list (``pandas.read_json`` / ``json.load`` ready). Written beside and
    renamed over the file, so that a run killed while writing leaves the previous complete list."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(partial, path)
    return path


def print_table(title: str, columns: list[str], cells: list[list[str]], right: set[str] = frozenset()) -> None:
    """Print a table to stdout: rich if importable, aligned plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

        def fmt(row):
            return "  ".join(v.rjust(w) if c in right else v.ljust(w)
                             for v, w, c in zip(row, widths, columns)).rstrip()

        print(title)
        print(fmt(columns))
        print("  ".join("-" * w for w in widths))
        for row in cells:
            print(fmt(row))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c in right else "left", no_wrap=True)
    for row in cells:
        table.add_row(*row)
    # When piped, rich would assume 80 columns and squeeze the table; give it room instead.
    Console(width=None if sys.stdout.isatty() else 200).print(table)
