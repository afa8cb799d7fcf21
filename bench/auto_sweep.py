"""What ``backend="auto"`` costs against naive PyTorch across batch sizes: one table from the rows of
several ``fastcl bench`` runs (one per thread count and width D).

    for T in 1 2; do for D in 256 768; do
      OMP_NUM_THREADS=$T fastcl bench --losses clip,siglip --backends auto,cpu --paired 3 \\
          --n 128,256,512,1024,2048,4096,8192 --d $D --repeat 5 --out-dir sweep/T$T-D$D
    done; done
    python bench/auto_sweep.py sweep/*/*.json --out bench/results/DATE-cpu-auto-sweep.txt

Per (threads, D, loss, N): the median time of naive, then auto, cpu and (CLIP) torch's
``F.linear_cross_entropy`` as ratios to naive, and the peak memory of auto and naive. With
``--paired`` rows the ratios are the interleaved ones (each implementation's time over naive's in
the same round, median over rounds: ``harness.time_interleaved``; median over the processes), and
``auto sep`` is auto's
ratio from the separate processes, whose times scatter more at a few milliseconds a call. ``auto`` takes
the reference path (S materialised) up to ``registry.MATERIALISE_BELOW_PAIRS[op]`` pairs and the cpu
kernels above. The issue's target (26): auto <= 1.1x naive at every point. ``busy``: the largest
share of the CPU other processes took during the point's cases (above ~5% its times are inflated).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def table(rows: list[dict]) -> str:
    ok = {(r["threads"], r["d"], r["loss"], r["n"], r["impl"]): r for r in rows if r.get("status") == "ok"}
    points = sorted({k[:4] for k in ok if k[4] == "naive"})
    head = ["threads", "D", "loss", "N", "naive ms", "auto", "cpu", "torch_lce", "auto per process", "auto sep",
            "auto MiB", "naive MiB", "busy"]
    cells, worst = [], {}

    def separate(p, impl):
        return ok[(*p, impl)]["median_s"] / ok[(*p, "naive")]["median_s"]

    def value(p, impl):  # the paired ratio where the point was timed interleaved
        r = ok[(*p, impl)]
        return r["x_naive_paired"] if r.get("x_naive_paired") is not None else separate(p, impl)

    def ratio(p, impl):
        return "" if (*p, impl) not in ok else f"{value(p, impl):.2f}x"

    for p in points:
        naive, auto = ok[(*p, "naive")], ok.get((*p, "auto"))
        busy = max(ok[(*p, i)].get("other_cpu_frac", 0) for i in ("naive", "auto", "cpu", "torch_lce")
                   if (*p, i) in ok)
        if auto is not None:
            key = p[:3]
            worst[key] = max(worst.get(key, 0), value(p, "auto"))
        cells.append([str(p[0]), str(p[1]), p[2], str(p[3]), f"{naive['median_s'] * 1e3:.1f}", ratio(p, "auto"),
                      ratio(p, "cpu"), ratio(p, "torch_lce"),
                      "/".join(f"{v:.2f}" for v in (auto or {}).get("x_naive_paired_runs") or []),
                      "" if auto is None else f"{separate(p, 'auto'):.2f}x",
                      "" if auto is None else f"{auto['peak_extra_bytes'] / 2**20:.1f}",
                      f"{naive['peak_extra_bytes'] / 2**20:.1f}", f"{busy:.0%}"])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(c, widths)) for c in cells]
    lines += ["", "worst auto / naive per (threads, D, loss): "
              + ", ".join(f"{t}T D={d} {loss} {v:.2f}x" for (t, d, loss), v in sorted(worst.items()))]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+", type=Path, help="fastcl bench JSON files")
    p.add_argument("--out", type=Path, default=None, help="write the table here too")
    args = p.parse_args(argv)
    rows = [r for f in args.rows for r in json.loads(f.read_text())]
    first = rows[0]
    text = (f"fastcl bench rows on {first.get('cpu', '?')}, {first.get('cores', '?')} cores; "
            f"torch {first.get('torch')}, "
            f"git {first.get('git_sha', '?')[:10]}{' (dirty)' if first.get('git_dirty') else ''}; "
            f"{first.get('date', '?')[:10]}; forward+backward, float32, ratios to naive (below 1 is faster)\n\n"
            + table(rows))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
