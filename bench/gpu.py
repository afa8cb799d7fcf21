"""CLIP and SigLIP forward+backward on one CUDA GPU: naive PyTorch, fastcl's chunked, triton and cuda
backends, against each loss's GEMM floor (the x @ y.T products of the same shape it cannot avoid: 4, SigLIP 3;
``fastcl.benchmark.cases.floor_gemms``).

Beside each fastcl triton and cuda row (and the floor) stands the performance model's prediction for this GPU
(``fastcl.benchmark.model``: A100, H100 or H200 by name; ``model ms``), so that a run compares
measured with predicted.

Times are medians of ``triton.testing.do_bench`` after one untimed call (compilation and Triton's
autotuning happen there; its duration is reported as ``first_call_s``); memory is the peak the
caching allocator saw above what was allocated before the step, beside the model's workspace
(``model_ws_mib``). One implementation failing (out of memory, a compile error) is a row with its
status, never the end of the run. Rows go to ``<out-dir>/<date>-gpu-<gpu>.json`` (or ``--out``)
with the GPU name, versions and git sha (``FASTCL_GIT_SHA`` when set: an installed copy has no
checkout to ask), the file rewritten after every row so that a run stopped halfway keeps the rows
it finished; the table comes last.

    python bench/gpu.py                               # N=32768 D=1024 and N=8192 D=512, bf16
    python bench/gpu.py --sizes 4096x256 --impls triton,cuda --dtype float16
    python bench/gpu.py --estimate                    # no GPU: the run's expected seconds (gpu_check.sh)
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    description, epilog = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="32768x1024,8192x512", help="comma-separated NxD (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--losses", default="clip,siglip", help="comma-separated (default: %(default)s)")
    p.add_argument("--impls", default="naive,chunked,triton,cuda",
                   help="naive and fastcl backends, comma-separated (default: %(default)s)")
    p.add_argument("--rep-ms", type=int, default=400, help="do_bench's repetition budget per case, ms")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--out", help="the JSON file to write (default: <out-dir>/<date>-gpu-<gpu>.json)")
    p.add_argument("--estimate", action="store_true",
                   help="print the run's expected seconds as JSON and exit (no GPU needed)")
    p.add_argument("--gpu", default="h200", help="--estimate: the model's device (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        args.sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes wants NxD pairs like 32768x1024, got {args.sizes!r}")
    args.losses, args.impls = args.losses.split(","), args.impls.split(",")
    return args


def _note(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def measure(spec: dict, rep_ms: int) -> dict:
    """first_call_s, median_ms and peak_extra_mib of one case, or its status when it cannot run."""
    import torch
    from triton.testing import do_bench

    from fastcl.benchmark import harness
    from fastcl.benchmark.cases import make_step

    step = None
    try:
        step = make_step(spec)
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        median_ms = do_bench(step, warmup=50, rep=rep_ms, return_mode="median")
        peak = harness.cuda_peak_extra_bytes(step)
        return {"status": "ok", "first_call_s": round(first, 3), "median_ms": median_ms,
                "peak_extra_mib": peak / harness.MiB}
    except Exception as exc:  # noqa: BLE001 - every failure is a result here, the run goes on
        return {"status": "oom" if harness.is_oom(exc) else "error", "note": _note(exc)}
    finally:
        del step
        torch.cuda.empty_cache()


def unavailable(impl: str, dtype) -> str | None:
    """Why a fastcl backend cannot run here (its declared reasons), None when it can."""
    import torch

    from fastcl.backend import names, not_supported_reasons

    if impl == "naive":
        return None
    if impl not in names():
        return f"unknown implementation {impl!r}"
    return "; ".join(not_supported_reasons(impl, torch.device("cuda"), dtype)) or None


def _tflops(loss: str, n: int, d: int, ms: float) -> float:
    """Throughput of ``loss``'s floor work (``floor_gemms(loss)`` GEMMs of 2 N^2 D flops) done in ``ms``."""
    from fastcl.benchmark.cases import floor_gemms

    return floor_gemms(loss) * 2 * n * n * d / (ms * 1e-3) / 1e12


def _model_device(gpu_name: str) -> str | None:
    """The model's device key for a GPU's name (None: not modelled)."""
    name = gpu_name.upper()
    return next((k for k in ("h200", "h100", "a100") if k.upper() in name), None)


def predicted_ms(loss: str, impl: str, n: int, d: int, dtype: str, gpu_name: str,
                 efficiency: str = "compiled") -> float | None:
    """The model's time for a row: the triton or cuda backend's forward+backward (each kernel's
    efficiency read from its code compiled here: the run tests the model), naive PyTorch's, or the
    floor's GEMMs."""
    from fastcl.benchmark import model

    device = _model_device(gpu_name)
    if device is None or impl not in (*model.BACKENDS, "floor") or (impl != "floor" and loss not in model.LOSSES):
        return None
    if impl == "cuda" and dtype == "float64":
        return None
    p = model.predict("clip" if impl == "floor" else loss, n, d, dtype, "triton" if impl == "floor" else impl,
                      efficiency=efficiency, devices=[device])
    return p["floor_ms"][device] if impl == "floor" else p["predicted_ms"][device]


def predicted_workspace_mib(loss: str, impl: str, n: int, d: int, dtype: str) -> float | None:
    """The model's workspace for a triton or cuda row (what the kernels allocate beside inputs, outputs
    and gradients), MiB."""
    from fastcl.benchmark import model

    if impl not in ("triton", "cuda") or loss not in model.LOSSES or (impl == "cuda" and dtype == "float64"):
        return None
    return model.predict(loss, n, d, dtype, impl)["workspace_bytes"] / (1 << 20)


# --estimate: seconds of a run, from the model's times. A process start (torch import, CUDA context,
# cuBLAS handles) and, per row, its setup (inputs, reference allocations) and do_bench: about 5
# estimating calls, then warmup + rep milliseconds of calls, but at least one of each, plus the
# untimed first call and the memory call. Naive PyTorch has no model: NAIVE_X_FLOOR times the floor
# GEMMs bounds it (its N x N softmax passes are memory-bound at well under that).
START_S, ROW_SETUP_S, WARMUP_MS, CALLS_BEYOND_BUDGET, NAIVE_X_FLOOR = 15.0, 1.5, 50, 8, 10.0


def estimate(args) -> dict:
    """The run's expected seconds on the model's ``args.gpu`` (Triton compiles excluded: gpu_check.sh's
    earlier phases fill Triton's cache with the same variants)."""
    from fastcl.benchmark import model
    from fastcl.benchmark.cases import floor_gemms

    if args.gpu not in model.DEVICES:
        raise SystemExit(f"--gpu must be one of {sorted(model.DEVICES)}, got {args.gpu!r}")
    rows = []
    for n, d in args.sizes:
        floor_ms = model.predict("clip", n, d, args.dtype, "triton")["floor_ms"][args.gpu]
        cases = [("gemm", "floor", floor_ms)]
        for loss in args.losses:
            for impl in args.impls:
                ms = predicted_ms(loss, impl, n, d, args.dtype, args.gpu, efficiency="assumed")
                if ms is None:  # naive, chunked: bounded by a multiple of the loss's floor
                    ms = NAIVE_X_FLOOR * floor_ms * floor_gemms(loss) / 4
                cases.append((loss, impl, ms))
        for loss, impl, ms in cases:
            seconds = ROW_SETUP_S + (WARMUP_MS + args.rep_ms) / 1e3 + CALLS_BEYOND_BUDGET * ms / 1e3
            rows.append({"loss": loss, "impl": impl, "n": n, "d": d, "step_ms": round(ms, 3),
                         "seconds": round(seconds, 2)})
    return {"gpu": args.gpu, "dtype": args.dtype, "rows": len(rows), "start_s": START_S,
            "seconds": round(START_S + sum(r["seconds"] for r in rows), 1), "per_row": rows}


def run(args, on_row=None) -> list[dict]:
    """Every row, in order; ``on_row(rows)`` after each one finishes (the caller writes the file)."""
    import torch

    from fastcl.benchmark import harness
    from fastcl.benchmark.cases import floor_seconds

    env = harness.environment("cuda")
    dtype = getattr(torch, args.dtype)
    rows = []

    def done(row):
        rows.append(row)
        if on_row is not None:
            on_row(rows)

    for n, d in args.sizes:
        base = {**env, "n": n, "d": d, "dtype": args.dtype}
        harness.progress(f"N={n} D={d} {args.dtype}: GEMM floor")
        floor = {**base, "loss": "gemm", "impl": "floor",
                 **measure({"impl": "floor", "n": n, "d": d, "dtype": args.dtype, "device": "cuda"}, args.rep_ms)}
        if floor["status"] == "ok":
            floor.update(x_floor=1.0, floor_tflops=_tflops("gemm", n, d, floor["median_ms"]))
        floor["model_ms"] = predicted_ms("gemm", "floor", n, d, args.dtype, env.get("gpu", ""), "assumed")
        done(floor)
        for loss in args.losses:
            for impl in args.impls:
                row = {**base, "loss": loss, "impl": impl}
                why = unavailable(impl, dtype)
                if why is not None:
                    done({**row, "status": "unavailable", "note": why})
                    continue
                harness.progress(f"N={n} D={d} {args.dtype}: {loss} {impl}")
                spec = {"impl": impl, "loss": loss, "n": n, "d": d, "dtype": args.dtype, "device": "cuda"}
                row.update(measure(spec, args.rep_ms))
                if row["status"] == "ok" and floor["status"] == "ok":
                    row["x_floor"] = row["median_ms"] / floor_seconds(loss, floor["median_ms"])
                if row["status"] == "ok":
                    row["floor_tflops"] = _tflops(loss, n, d, row["median_ms"])
                row["model_ms"] = predicted_ms(loss, impl, n, d, args.dtype, env.get("gpu", ""), "assumed")
                row["model_ws_mib"] = predicted_workspace_mib(loss, impl, n, d, args.dtype)
                done(row)
    # Last, once every measurement is saved: the model from the kernels' code compiled here (a few
    # compiles, cached per kernel), so that a phase limit that stops it costs no measurement.
    for row in rows:
        if row.get("status") != "unavailable":
            harness.progress(f"model from compiled code: {row['loss']} {row['impl']} N={row['n']}")
            row["model_compiled_ms"] = predicted_ms(row["loss"], row["impl"], row["n"], row["d"], args.dtype,
                                                    env.get("gpu", ""), "compiled")
            if on_row is not None:
                on_row(rows)
    return rows


def table(rows: list[dict]) -> None:
    from fastcl.benchmark import harness
    from fastcl.benchmark.cases import FLOOR_NOTE

    columns = ["loss", "impl", "N", "D", "dtype", "median ms", "model ms", "assumed ms", "x floor", "TFLOP/s",
               "first s", "peak MiB", "model ws MiB", "status"]
    fmt = lambda r, k, f: f.format(r[k]) if r.get(k) is not None else "-"
    cells = [[r["loss"], r["impl"], str(r["n"]), str(r["d"]), r["dtype"], fmt(r, "median_ms", "{:.2f}"),
              fmt(r, "model_compiled_ms", "{:.2f}"), fmt(r, "model_ms", "{:.2f}"), fmt(r, "x_floor", "{:.2f}"),
              fmt(r, "floor_tflops", "{:.0f}"),
              fmt(r, "first_call_s", "{:.1f}"), fmt(r, "peak_extra_mib", "{:.0f}"), fmt(r, "model_ws_mib", "{:.0f}"),
              r["status"] + (f" ({r['note'][:60]})" if "note" in r else "")]
             for r in rows]
    gpu = rows[0].get("gpu", "GPU") if rows else "GPU"
    harness.print_table(f"fastcl on {gpu}: forward+backward, median of do_bench; model ms = "
                        f"fastcl.benchmark.model's prediction from the kernels' compiled code, assumed ms = with "
                        f"one assumed efficiency (model ws MiB: its workspace; peak MiB adds outputs and "
                        f"gradients)\n{FLOOR_NOTE}", columns, cells,
                        right={"N", "D", "median ms", "model ms", "assumed ms", "x floor", "TFLOP/s", "first s",
                               "peak MiB", "model ws MiB"})


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.estimate:
        print(json.dumps(estimate(args)))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU and a CUDA build of torch (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    from fastcl.benchmark import harness

    date = datetime.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    path = Path(args.out) if args.out else Path(args.out_dir) / f"{date}-gpu-{slug}.json"
    rows = run(args, on_row=lambda rows: harness.write_json(rows, path))
    harness.progress(f"wrote {path}")
    table(rows)
    return 0 if all(r["status"] in ("ok", "unavailable", "oom") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
