"""Time and peak memory vs N from the sweep's rows (or a saved JSON file), as a PNG.

One row of two panels per (loss, dtype): forward+backward time and peak extra memory against N,
log-log, one line per implementation in the same colour in every panel. The GEMM floor is the
dashed black line in the time panel, scaled to the loss (4 GEMMs for the log-sum-exp losses, 3 for
SigLIP and MW): the distance to it is what is left to gain. A curve that
stopped (out of memory, or skipped over --max-naive-gib) ends in an x, and its legend entry says
where; an implementation with no point at all (not installed) still gets a legend entry.

    python -m fastcl.benchmark.plot rows.json [out.png]
"""
from __future__ import annotations

import json
import math
import sys
from functools import partial
from pathlib import Path

from .cases import floor_gemms, floor_seconds
from .harness import MiB

STOP_LABELS = {"oom": "OOM", "not run": "OOM", "skipped": "skipped", "failed": "failed"}


def _series(rows: list[dict], loss: str, impl: str, dtype: str) -> list[dict]:
    return sorted((r for r in rows if (r["loss"], r["impl"], r["dtype"]) == (loss, impl, dtype)),
                  key=lambda r: r["n"])


def floor_line(rows: list[dict], loss: str, dtype: str) -> tuple[list[int], list[float], str]:
    """N, time in ms and legend label of ``loss``'s GEMM floor: the measured floor case scaled to
    the GEMMs that loss cannot avoid."""
    floor = [r for r in _series(rows, "gemm", "floor", dtype) if r["status"] == "ok"]
    ms = [floor_seconds(loss, r["median_s"]) * 1e3 for r in floor]
    return [r["n"] for r in floor], ms, f"GEMM floor ({floor_gemms(loss)} x (x @ y.T))"


def _label(impl: str, series: list[dict]) -> str:
    """The implementation's name plus why its curve is short or missing, if it is."""
    first_bad = next((r for r in series if r["status"] != "ok"), None)
    if first_bad is None:
        return impl
    status = first_bad["status"]
    if status in ("not installed", "unsupported"):
        return f"{impl} ({status})"
    return f"{impl} ({STOP_LABELS.get(status, status)} at N={first_bad['n']})"


def _minor_label(v: float, _pos, every: bool) -> str:
    """Label 2x and 5x of each decade (every minor tick when the axis spans under a decade): a
    short log axis otherwise shows one number or none."""
    mantissa = v / 10 ** math.floor(math.log10(v)) if v > 0 else 0
    return f"{v:g}" if every or round(mantissa, 6) in (2, 5) else ""


def plot(rows: list[dict], path: str | Path) -> Path:
    """Draw ``rows`` (as ``run_sweep`` returns them or ``json.load`` reads them) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and none is touched when one exists
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    groups = list(dict.fromkeys((r["loss"], r["dtype"]) for r in rows if r["impl"] != "floor"))
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["impl"] != "floor"))
    ns = sorted({r["n"] for r in rows})
    colours = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
    for (loss, dtype), (ax_t, ax_m) in zip(groups, axes):
        floor_n, floor_ms, floor_label = floor_line(rows, loss, dtype)
        if floor_n:
            ax_t.plot(floor_n, floor_ms, "k--", lw=1.2, label=floor_label)
        for impl in dict.fromkeys(r["impl"] for r in rows if r["loss"] == loss):
            series = _series(rows, loss, impl, dtype)
            ok = [r for r in series if r["status"] == "ok"]
            stopped = len(ok) < len(series) and any(r["status"] in STOP_LABELS for r in series)
            style = {"color": colours[impl], "marker": "o", "ms": 4, "lw": 1.6}
            if not ok:  # legend entry only (not installed, unsupported): dotted, no marker
                style.update(marker="", ls=":")
            ax_t.plot([r["n"] for r in ok], [r["median_s"] * 1e3 for r in ok], label=_label(impl, series), **style)
            mem = [r for r in ok if r["peak_extra_bytes"] > 0]  # log axis: a 0 B reading has no place
            ax_m.plot([r["n"] for r in mem], [r["peak_extra_bytes"] / MiB for r in mem], **style)
            if stopped and ok:  # an x where the curve ends early
                ax_t.plot(ok[-1]["n"], ok[-1]["median_s"] * 1e3, "x", color=colours[impl], ms=12, mew=2.5)
                if mem:
                    ax_m.plot(mem[-1]["n"], mem[-1]["peak_extra_bytes"] / MiB, "x", color=colours[impl],
                              ms=12, mew=2.5)
        for ax, what in ((ax_t, "forward+backward time [ms]"), (ax_m, "peak extra memory [MiB]")):
            ax.set_xscale("log", base=2)
            if not any(len(line.get_xdata()) for line in ax.get_lines()):
                ax.text(0.5, 0.5, "no measurement", ha="center", transform=ax.transAxes)
                continue  # nothing to scale: a log axis over no data raises at layout time
            ax.set_yscale("log")
            ax.set_xlabel("batch size N")
            ax.set_ylabel(what)
            ax.set_title(f"{loss}, {dtype}: {what.split(' [')[0]}")
            ax.grid(True, which="both", alpha=0.3)
            # The swept N as tick labels, and plain numbers on y: "4096" reads faster than "2^12".
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            lo, hi = ax.get_ylim()
            ax.yaxis.set_minor_formatter(FuncFormatter(partial(_minor_label, every=hi / max(lo, 1e-30) < 10)))
        ax_t.legend(fontsize=8, loc="upper left")
    env = rows[0]
    where = env.get("gpu") or env.get("cpu", "")
    sha = (env.get("git_sha") or "")[:10] + ("+dirty" if env.get("git_dirty") else "")
    fig.suptitle(f"fastcl bench on {env.get('device')} ({where}, {env.get('threads')} threads), "
                 f"D={env.get('d')}, torch {env.get('torch')}, fastcl {env.get('fastcl')} {sha}".rstrip(),
                 fontsize=10)
    busy = max((r.get("other_cpu_frac") or 0) for r in rows)
    if busy > 0.05:  # the same warning the table gives: such times are inflated, rerun
        fig.text(0.5, 0.005, f"other processes used up to {busy:.0%} of the CPU during some cases: "
                 "those times are inflated", ha="center", fontsize=9, color="tab:red")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.strip().splitlines()[-1])
    src = Path(sys.argv[1])
    print(plot(json.loads(src.read_text()), sys.argv[2] if len(sys.argv) == 3 else src.with_suffix(".png")))
