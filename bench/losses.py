"""Contrastive losses forward+backward: naive PyTorch vs every fastcl backend vs the GEMM floor.

    python bench/losses.py                                  # CLIP, SigLIP, N=4096, D=512: ~1 minute
    python bench/losses.py --n 8192 --d 512                 # the acceptance point
    python bench/losses.py --n 8192 --losses ntxent,supcon  # self-supervised, N = V * B rows
    python bench/losses.py --n 65536 --d 256 --losses clip --repeat 1

Per (loss, implementation, N, D, dtype) it reports the median time of forward+backward (gradients
for x, y, logit_scale and, for SigLIP, logit_bias), its ratio to naive PyTorch and to the GEMM
floor measured in the same run, and the peak extra resident memory. Every case runs in its own
process (see harness.py). Progress goes to stderr, the table to stdout, all rows to --out as JSON.

Backends come from ``fastcl.backends("cpu")`` minus ``reference`` (it materialises S like naive
and exists for tests), so a newly built backend appears here without editing this file.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import harness

LOSSES = ("clip", "siglip", "ntxent", "supcon")
DEFAULT_LOSSES = ["clip", "siglip"]
SUPCON_CLASSES = 100  # labels for SupCon: N rows over this many classes
# Resident N x N copies naive PyTorch holds at its peak (logits, softmax/its gradient, the
# SigLIP label matrix and products), measured at N=8192 fp32 with this script: about 4.1 for
# CLIP and 5.1 for SigLIP; rounded up so the estimate errs on the safe side.
NAIVE_NXN_COPIES = {"clip": 5, "siglip": 6, "ntxent": 6, "supcon": 7}
# The floor multiplies into a reused output buffer of at most this size, in row blocks: it
# measures GEMM arithmetic only (the fused loss never allocates N x N either) and still runs at
# N=65536, where one x @ y.T would be 16 GiB.
FLOOR_BUFFER_BYTES = 256 * harness.MiB
FLOOR_GEMMS = 4  # forward 1 + backward 3 (recompute S, G @ y, G.T @ x): see DESIGN.md


# --- the naive baselines: what a user writes without fastcl -----------------------------------

def naive_clip(x, y, logit_scale):
    """open_clip ClipLoss (one process): cross-entropy over image->text and text->image logits.
    One GEMM, transposed for the second direction (open_clip's get_logits computes
    ``y @ x.T`` again, which only makes naive slower; we compare against the stronger one)."""
    logits = logit_scale * x @ y.T
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def naive_siglip(x, y, logit_scale, logit_bias):
    """open_clip SigLipLoss (one process), exactly: a dense +-1 label matrix and logsigmoid."""
    logits = logit_scale * x @ y.T + logit_bias
    labels = 2 * torch.eye(x.shape[0], device=x.device, dtype=x.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / x.shape[0]


def naive_ntxent(z, temperature=0.5):
    """SimCLR NT-Xent as lightly writes it (V = 2, rows view-major): one (2B)^2 logit matrix, self
    similarity masked out, cross-entropy with the other view as target. Features already unit-norm."""
    n = z.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.arange(n, device=z.device).roll(n // 2)
    return F.cross_entropy(logits, targets)


def naive_supcon(z, labels, temperature=0.1):
    """Supervised contrastive loss as pytorch-metric-learning computes it: dense logits, dense
    positive mask, log-softmax without the diagonal, mean over each anchor's positives."""
    n = z.shape[0]
    logits = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = logits - logits.masked_fill(self_mask, float("-inf")).logsumexp(1, keepdim=True)
    n_pos = positives.sum(1)
    per_row = -(log_prob * positives).sum(1) / n_pos.clamp(min=1)
    return per_row[n_pos > 0].mean()


# --- one case, in its own process ------------------------------------------------------------

def make_step(spec: dict):
    """Create the inputs and return a closure doing one forward+backward (or the floor GEMMs)."""
    n, d, dtype = spec["n"], spec["d"], getattr(torch, spec["dtype"])
    gen = torch.Generator().manual_seed(0)
    # Unit-norm features and open_clip's usual scale/bias, so exp() sees realistic logits.
    x = F.normalize(torch.randn(n, d, generator=gen), dim=1).to(dtype)
    y = F.normalize(torch.randn(n, d, generator=gen), dim=1).to(dtype)

    if spec["impl"] == "floor":
        rows = max(1, min(n, FLOOR_BUFFER_BYTES // (n * x.element_size())))
        out = x.new_zeros(rows, n)  # touched now: its page faults are not GEMM work

        def floor():
            for _ in range(FLOOR_GEMMS):
                for r0 in range(0, n, rows):
                    r1 = min(r0 + rows, n)
                    torch.mm(x[r0:r1], y.T, out=out[: r1 - r0])
        return floor

    x.requires_grad_()
    y.requires_grad_()
    loss = spec["loss"]
    if loss == "clip":
        params = [x, y, torch.tensor(100.0, requires_grad=True)]
    elif loss == "siglip":  # SigLIP's initialisation: scale 10, bias -10
        params = [x, y, torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)]
    else:  # self-similarity losses: x holds all N = V * B rows
        params = [x]
    labels = torch.randint(0, SUPCON_CLASSES, (n,), generator=gen)
    if spec["impl"] == "naive":
        naive = {"clip": naive_clip, "siglip": naive_siglip, "ntxent": naive_ntxent,
                 "supcon": lambda z: naive_supcon(z, labels)}[loss]
        loss_fn = naive
    else:
        import fastcl

        impl = spec["impl"]
        loss_fn = {
            "clip": lambda *a: fastcl.clip_loss(*a, backend=impl),
            "siglip": lambda *a: fastcl.siglip_loss(*a, backend=impl),
            "ntxent": lambda z: fastcl.ntxent_loss(z.view(2, n // 2, d), 0.5, backend=impl),
            "supcon": lambda z: fastcl.supcon_loss(z, labels, 0.1, backend=impl),
        }[loss]

    def step():
        for p in params:  # gradients are outputs: each call allocates them afresh, as training does
            p.grad = None
        loss_fn(*params).backward()
    return step


def run_case(spec: dict) -> None:
    warm_up = None if spec["impl"] == "floor" else make_step({**spec, "n": 64, "d": 16})
    result = harness.measure(make_step(spec), spec["repeat"], warm_up)
    print(json.dumps({"status": "ok", **result}))


# --- the study (parent process) --------------------------------------------------------------

def plan(args, backends: list[str]) -> list[dict]:
    """Cases in run order: per shape the floor first, then per loss naive and each backend."""
    cases = []
    for n in args.n:
        for d in args.d:
            base = {"n": n, "d": d, "dtype": args.dtype, "repeat": args.repeat}
            cases.append({**base, "loss": "gemm", "impl": "floor", "mode": f"{FLOOR_GEMMS} x (x @ y.T)"})
            for loss in args.losses:
                for impl in ["naive", *backends]:
                    cases.append({**base, "loss": loss, "impl": impl, "mode": "fwd+bwd"})
    return cases


def naive_skip_reason(spec: dict, max_gib: float) -> str | None:
    need = NAIVE_NXN_COPIES[spec["loss"]] * spec["n"] ** 2 * getattr(torch, spec["dtype"]).itemsize
    if need <= max_gib * harness.GiB:
        return None
    return f"skipped (would need ~{need / harness.GiB:.0f} GiB > --max-naive-gib {max_gib:g})"


def add_ratios(rows: list[dict]) -> None:
    """Ratios to naive (same loss) and to the floor (same shape), both from this run."""
    ok = {(r["loss"], r["impl"], r["n"], r["d"], r["dtype"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        naive = ok.get((r["loss"], "naive", r["n"], r["d"], r["dtype"]))
        floor = ok.get(("gemm", "floor", r["n"], r["d"], r["dtype"]))
        ok_row = r["status"] == "ok"
        r["x_naive"] = r["median_s"] / naive["median_s"] if ok_row and naive else None
        r["x_floor"] = r["median_s"] / floor["median_s"] if ok_row and floor else None
        r["mem_frac_naive"] = (r["peak_extra_bytes"] / naive["peak_extra_bytes"]
                               if ok_row and naive and naive["peak_extra_bytes"] > 0 else None)
        # Useful throughput: the 4-GEMM flop count (8 N^2 D) per second of this implementation.
        r["gflops_4gemm"] = 8 * r["n"] ** 2 * r["d"] / r["median_s"] / 1e9 if ok_row else None


def show(rows: list[dict]) -> None:
    def fmt(v, spec, suffix=""):
        return "-" if v is None else format(v, spec) + suffix
    columns = ["loss", "impl", "N", "D", "dtype", "median ms", "x naive", "x floor",
               "peak extra MiB", "% naive mem"]
    cells = []
    for r in rows:
        if r["status"] != "ok":
            cells.append([r["loss"], r["impl"], str(r["n"]), str(r["d"]), r["dtype"], r["note"],
                          "", "", "", ""])
            continue
        impl = f"floor: {r['mode']}" if r["impl"] == "floor" else r["impl"]
        cells.append([r["loss"], impl, str(r["n"]), str(r["d"]), r["dtype"],
                      f"{r['median_s'] * 1e3:.0f}" + (" *" if r["other_cpu_frac"] > 0.05 else ""), fmt(r["x_naive"], ".2f"), fmt(r["x_floor"], ".2f"),
                      f"{r['peak_extra_bytes'] / harness.MiB:.1f}",
                      fmt(None if r["mem_frac_naive"] is None else 100 * r["mem_frac_naive"], ".1f", "%")])
    env = rows[0]
    title = (f"forward+backward on {env['cpu']} ({env['threads']} threads), torch {env['torch']}, "
             f"fastcl {env['fastcl']} @ {env['git_sha'][:10]}{'+dirty' if env['git_dirty'] else ''}")
    if any(r.get("other_cpu_frac", 0) > 0.05 for r in rows):
        title += "  (* other processes used the cores during this case: time inflated)"
    harness.print_table(title, columns, cells,
                        right={"N", "D", "median ms", "x naive", "x floor", "peak extra MiB", "% naive mem"})


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int_list, default=[4096], help="batch sizes, comma-separated")
    p.add_argument("--d", type=int_list, default=[512], help="feature widths, comma-separated")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--losses", type=lambda s: s.split(","), default=DEFAULT_LOSSES,
                   help="comma-separated subset of " + ",".join(LOSSES))
    p.add_argument("--repeat", type=int, default=5, help="timed calls per case, after one warm-up")
    p.add_argument("--max-naive-gib", type=float, default=8.0,
                   help="skip naive where its N x N temporaries would exceed this")
    p.add_argument("--out", default=None, help="JSON rows (default bench/out/losses-<date>.json)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args(argv)
    if any(loss not in LOSSES for loss in args.losses):
        p.error(f"--losses must be a subset of {','.join(LOSSES)}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.case:
        run_case(json.loads(args.case))
        return
    import fastcl

    env = harness.environment("cpu")
    backends = [b for b in fastcl.backends("cpu", getattr(torch, args.dtype)) if b != "reference"]
    cases = plan(args, backends)
    harness.progress(f"{len(cases)} cases, each in a fresh process; backends: {', '.join(backends)}")
    rows, t_start = [], time.perf_counter()
    for i, spec in enumerate(cases, 1):
        label = f"[{i}/{len(cases)}] {spec['loss']:6} {spec['impl']:6} N={spec['n']} D={spec['d']} {spec['dtype']}"
        reason = naive_skip_reason(spec, args.max_naive_gib) if spec["impl"] == "naive" else None
        t0 = time.perf_counter()
        result = {"status": "skipped", "note": reason} if reason else harness.run_isolated(__file__, spec)
        if result["status"] == "ok":
            done = (f"median {result['median_s'] * 1e3:.0f} ms, "
                    f"peak +{result['peak_extra_bytes'] / harness.MiB:.1f} MiB")
            if result["other_cpu_frac"] > 0.05:
                done += (f"; WARNING: other processes used {result['other_cpu_frac']:.0%} of the "
                         "cores meanwhile, this time is inflated")
        else:
            done = result["note"]
        harness.progress(f"{label}: {done}  ({time.perf_counter() - t0:.1f} s)")
        rows.append({**{k: spec[k] for k in ("loss", "impl", "mode", "n", "d", "dtype")},
                     "median_s": None, "peak_extra_bytes": None, "note": None, **result, **env})
    add_ratios(rows)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = harness.write_json(rows, args.out or Path(__file__).parent / "out" / f"losses-{stamp}.json")
    harness.progress(f"done in {time.perf_counter() - t_start:.0f} s; rows written to {out}")
    show(rows)


if __name__ == "__main__":
    sys.exit(main())
