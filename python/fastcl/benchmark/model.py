"""Performance model of a fused loss's forward+backward: the work the kernels do, what they move
and what they allocate, derived from the tile, block and workspace parameters the launchers use
(``fastcl/backend/triton/plan.py``; ``fastcl/backend/cuda/plan.py``, the mirror of ``csrc/cuda/params.h`` and
``csrc/cuda/plan.h``, for ``--backend cuda``), and a roofline time on A100 / H100 / H200.

    python -m fastcl.benchmark.model --loss clip --n 65536 --d 1024 --dtype bfloat16 --backend triton --json

Counts (``gemm_equivalents`` in units of ``2 M N D`` flops, padding included) are exact for the
configuration a launch takes with autotuning off (the first of each list in plan.py); the
interpreter's count of executed ``tl.dot`` work agrees with them (tests/test_triton_engine.py).
Times are predictions, not measurements: per kernel, ``max(flops / (peak * efficiency),
bytes / (bandwidth * MEMORY_EFFICIENCY)) + transcendentals / special-function rate + launches *
LAUNCH_S``, summed over the kernels run one after another. ``efficiency`` comes from the kernel's
compiled code (``benchmark/compiled.py``: its cubin built in this run, the bound of its main loop
in SASS, occupancy), capped at ``ACHIEVED_PEAK`` (what cuBLAS measured), by default; library GEMMs
(cuBLAS through ATen) and ``--efficiency assumed`` take the constant ``MATRIX_EFFICIENCY``. The GEMM
floor is the loss's 4 (CLIP) or 3 (SigLIP) GEMMs at ``ACHIEVED_PEAK``. HBM bytes assume each operand of a
block is read from HBM once (L2 serves the re-reads within a block). float32 S tiles use 3xTF32
(torch's default "highest" matmul precision): a third of the TF32 rate.

Losses: ``clip`` (bidirectional, M = N), ``infonce`` (one direction), ``siglip`` and ``mw``
(gradients computed in the forward pass), ``ntxent`` / ``supcon`` (N rows against themselves).
Backends: ``triton``; ``cuda`` (counted in ``model_cuda.py``: 64 x 64 tile kernels for S and G, 3xTF32
for float32; the gradient GEMMs are ATen/cuBLAS calls on each G block: float32 ones at torch's default
full-float32 precision, the model's ``fp32`` rate, 16-bit ones on tensor cores with a float32 result); ``naive`` (what
plain PyTorch does: S materialised by a library GEMM, log-softmax passes over it, the gradient GEMMs;
``NAIVE_BYTES_PER_PAIR`` of HBM traffic per pair of S).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field

import torch

from .model_common import Kernel, _matrix_rate, _shape
from .model_cuda import _cuda_kernels, _cuda_prefix_kernels

LOSSES = ("clip", "infonce", "siglip", "mw", "ntxent", "supcon")
DTYPES = ("float32", "bfloat16", "float16", "float64")

# Datasheet peaks (dense), bytes/s of HBM, multiprocessors and the clock the special-function
# units run at. MUFU: 16 transcendental results per clock per multiprocessor (exp2, log2, rcp).
DEVICES = {
    "a100": {"name": "A100 SXM 80GB", "tc16": 312e12, "tf32": 156e12, "fp32": 19.5e12, "fp64": 19.5e12,
             "hbm": 2.039e12, "sms": 108, "clock": 1.41e9},
    "h100": {"name": "H100 SXM", "tc16": 989e12, "tf32": 494e12, "fp32": 67e12, "fp64": 67e12,
             "hbm": 3.35e12, "sms": 132, "clock": 1.83e9},
    "h200": {"name": "H200 SXM", "tc16": 989e12, "tf32": 494e12, "fp32": 67e12, "fp64": 67e12,
             "hbm": 4.8e12, "sms": 132, "clock": 1.83e9},
}
MATRIX_EFFICIENCY = 0.7  # assumed for library GEMMs and for kernels with no compiled code to read
# The most any tensor-core kernel is taken to reach: cuBLAS's 788 TFLOP/s bf16 (8192^3) on an H200,
# measured here. The compiled-code bound ignores latency, so it is capped there; the GEMM floor is
# the floor's GEMMs at this rate (44.7 ms for CLIP at N = 65536, D = 1024, bf16 on an H200).
ACHIEVED_PEAK = 0.8
MEMORY_EFFICIENCY = 0.9  # a device-to-device copy moved 4.3 of 4.8 TB/s on an H200 here
MUFU_PER_CLOCK = 16
LAUNCH_S = 4e-6


@dataclass
class Prediction:
    loss: str
    n: int
    d: int
    dtype: str
    backend: str
    m: int
    gemm_equivalents: float = 0.0
    workspace_bytes: int = 0
    exps: float = 0.0
    hbm_bytes: float = 0.0
    launches: int = 0
    predicted_ms: dict = field(default_factory=dict)
    floor_ms: dict = field(default_factory=dict)
    kernels: list = field(default_factory=list)


def _rate(device: dict, matrix: str) -> float:
    return device["tf32"] / 3 if matrix == "tf32x3" else device[matrix]


def _tiles(r: int, c: int, cfg) -> tuple[int, int]:
    return math.ceil(r / cfg.block_a), math.ceil(c / cfg.block_b)


def _tile_pass(k: Kernel, blocks, d_pad, cfg, elem, exps_per_pair, g_bytes=0):
    """An S-tile kernel over every block: flops of its padded tiles, transcendentals, HBM traffic."""
    for r0, r1 in blocks[0]:
        for c0, c1 in blocks[1]:
            ta, tb = _tiles(r1 - r0, c1 - c0, cfg)
            pairs = ta * cfg.block_a * tb * cfg.block_b
            k.add(flops=2 * pairs * d_pad, exps=exps_per_pair * pairs,
                  hbm_bytes=((r1 - r0) + (c1 - c0)) * d_pad * elem + (r1 - r0) * (c1 - c0) * g_bytes)


def _gemm_pass(k: Kernel, blocks, windows, gcfg, f_elem, g_elem, acc_elem):
    """The two gradient GEMMs of every block, per window of output columns: ``windows`` holds
    (columns, columns the programs cover): [(D_pad, D_pad)] for one G per block, one per feature
    segment for ``lse_prefixes`` (a segment's G is its own suffix sum of H)."""
    for r0, r1 in blocks[0]:
        for c0, c1 in blocks[1]:
            r, c = r1 - r0, c1 - c0
            for width, covered in windows:
                for p, kk, first in ((r, c, c0 == 0), (c, r, r0 == 0)):
                    steps = math.ceil(kk / gcfg.block_k)
                    flops = 2 * math.ceil(p / gcfg.block_m) * gcfg.block_m * covered * steps * gcfg.block_k
                    out_bytes = p * width * acc_elem * (1 if first else 2)  # write, or read-modify-write
                    k.add(flops=flops, hbm_bytes=r * c * g_elem + kk * width * f_elem + out_bytes)


BACKENDS = ("triton", "cuda", "naive")
# Plain PyTorch at bfloat16 (CLIP, both directions): S written (2 B), each direction's log-softmax
# reads it and writes float32 log-probabilities (2 + 4 B, twice), the backward reads those and
# writes each direction's dS (4 + 4 B, twice), sums them into a 16-bit dS (4 + 4 + 2 B), which the
# two gradient GEMMs read (2 B, twice): 40 bytes per pair, and S's memory.
NAIVE_BYTES_PER_PAIR = 40


def predict(loss: str, n: int, d: int, dtype: str = "bfloat16", backend: str = "triton", *,
            interpreter: bool = False, budget: int | None = None, efficiency: str = "assumed",
            devices=None) -> dict:
    """The model's numbers for one forward+backward of ``loss`` at batch ``n``, width ``d``.
    ``efficiency``: "compiled" reads each kernel's bound from its compiled code (benchmark/compiled.py),
    "assumed" takes MATRIX_EFFICIENCY; ``devices``: the keys of DEVICES to predict for (default all)."""
    if backend not in BACKENDS:
        raise ValueError(f"the model covers backends {BACKENDS}, got {backend!r}")
    if efficiency not in ("compiled", "assumed"):
        raise ValueError(f"efficiency must be 'compiled' or 'assumed', got {efficiency!r}")
    devices = tuple(DEVICES) if devices is None else tuple(devices)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    from ..backend.triton import plan

    tdtype = getattr(torch, dtype)
    settings = (efficiency, devices)
    if backend == "naive":
        m, cols, kind, _, _ = _shape(loss, n)
        gemms = Kernel("library GEMMs (S, dS @ y, dS.T @ x)", matrix=_matrix_rate(tdtype))
        gemms.add(flops=(3 if kind == "pointwise" else 4) * 2 * m * cols * d, hbm_bytes=2 * (m + cols) * d * 2,
                  launches=4)
        passes = Kernel("elementwise passes over S", matrix=_matrix_rate(tdtype))
        passes.add(hbm_bytes=NAIVE_BYTES_PER_PAIR * m * cols, exps=2 * m * cols, launches=8)
        return _prediction(loss, n, d, dtype, backend, m, cols, kind, tdtype, [gemms, passes],
                           3 * 4 * m * cols, 0, settings)
    if backend == "cuda":
        if interpreter:
            raise ValueError("--interpreter models the Triton interpreter's tiles; the cuda engine has none")
        budget = plan.workspace_budget() if budget is None else budget
        kernels, workspace, library, kind, m, cols = _cuda_kernels(loss, n, d, tdtype, budget)
        return _prediction(loss, n, d, dtype, backend, m, cols, kind, tdtype, kernels, workspace, library, settings)
    if interpreter and tdtype == torch.bfloat16:
        tdtype = torch.float32  # the interpreter computes bfloat16 inputs in float32 (tiles.operands)
    budget = plan.workspace_budget() if budget is None else budget
    m, cols, kind, rows_on, cols_on = _shape(loss, n)
    d_pad = plan.padded_features(d)
    acc, g = plan.acc_dtype(tdtype), plan.g_dtype(tdtype)
    elem, acc_elem, g_elem = (torch.empty((), dtype=t).element_size() for t in (tdtype, acc, g))
    family = "lse" if kind == "lse" else "pointwise"
    cfg = plan.tile_configs(tdtype, interpreter, family)[0]
    gcfg = plan.gemm_configs(tdtype, interpreter)[0]
    matrix = _matrix_rate(tdtype)
    steps = d_pad / plan.feature_block(d_pad, tdtype, interpreter)  # main-loop steps per S tile
    kernels = []

    if kind == "lse":
        fr, fc = plan.forward_blocks(m, cols, tdtype, interpreter, budget)
        fwd_blocks = (plan.ranges(m, fr), plan.ranges(cols, fc))
        directions = int(rows_on) + int(cols_on)
        fwd = Kernel("lse forward", matrix=matrix, code=("triton", "lse_forward", steps))
        _tile_pass(fwd, fwd_blocks, d_pad, cfg, elem, directions)
        # the partials lse_forward allocates: sized for the smallest tile any configuration may take
        smallest = min(min(c.block_a, c.block_b) for c in plan.tile_configs(tdtype, interpreter, "lse"))
        forward_ws = ((fr * math.ceil(fc / smallest) if rows_on else 0)
                      + (math.ceil(fr / smallest) * fc if cols_on else 0))
        gr, gc = plan.gradient_blocks(m, cols, tdtype, interpreter, budget)
        grad_blocks = (plan.ranges(m, gr), plan.ranges(cols, gc))
        grad = Kernel("lse gradient tile", matrix=matrix, code=("triton", "lse_gradient", steps))
        _tile_pass(grad, grad_blocks, d_pad, cfg, elem, directions, g_bytes=g_elem)
        kernels += [fwd, grad]
        workspace = max(forward_ws * acc_elem, gr * gc * g_elem)
        # Beside the kernels (primitives/): the target logits (one row-wise product) and the scale's gradient.
        library = 2 * 2 * m * d
    else:
        gr, gc = plan.gradient_blocks(m, cols, tdtype, interpreter, budget)
        grad_blocks = (plan.ranges(m, gr), plan.ranges(cols, gc))
        grad = Kernel("pointwise tile", matrix=matrix, code=("triton", "pointwise", steps))
        # exp2, log and a reciprocal per pair; per-row partial sums are negligible
        _tile_pass(grad, grad_blocks, d_pad, cfg, elem, 3, g_bytes=g_elem)
        kernels.append(grad)
        workspace = gr * gc * g_elem + 2 * gr * math.ceil(gc / cfg.block_b) * acc_elem
        library = 2 * m * d  # the scale's gradient
    gemms = Kernel("gradient GEMMs (G @ y, G.T @ x)", matrix="tf32" if tdtype == torch.float16 else matrix,
                   code=("triton", "gemm", max(gr, gc) / gcfg.block_k))
    _gemm_pass(gemms, grad_blocks, [(d_pad, d_pad)], gcfg, elem, g_elem, acc_elem)
    kernels.append(gemms)
    return _prediction(loss, n, d, dtype, backend, m, cols, kind, tdtype, kernels, workspace, library, settings)


# The losses whose Matryoshka form runs one pass (losses/_matryoshka.py: fused_clip's lse_prefixes,
# fused_siglip's pointwise_prefixes), and the backends whose declaration has those ops on a GPU;
# elsewhere the loop of K losses.
ONE_PASS_LOSSES = {"clip": "lse_prefixes", "infonce": "lse_prefixes", "siglip": "pointwise_prefixes"}
ONE_PASS_BACKENDS = {"triton": ("lse_prefixes", "pointwise_prefixes"), "cuda": ("lse_prefixes", "pointwise_prefixes")}


def predict_matryoshka(loss: str, n: int, dims: list[int], dtype: str = "bfloat16", backend: str = "triton",
                       *, normalize: bool = True, **kw) -> dict:
    """The model for Matryoshka ``loss`` at the prefixes ``dims`` (the last is D) as ``backend`` runs it.
    ``gemm_equivalents`` are in units of the loss at D's (``2 M N D`` flops).

    - ``schedule`` "one pass (lse_prefixes)": CLIP / InfoNCE on triton. Each S tile grows segment by
      segment (``prefix_forward``, ``prefix_gradient``), the gradient GEMMs run per segment on the
      suffix sums of H: 4 GEMM-equivalents whatever K (plus 16 features per S pass at each boundary
      that is not a multiple of 16, and the O(N D K) prefix norms beside the kernels); the exps are
      K per pair and direction in each pass; ``h_bytes`` the K-slot H traffic.
    - ``schedule`` "one pass (pointwise_prefixes)": SigLIP on triton. One S-tile kernel
      (``prefix_pointwise``) grows P segment by segment and forms each prefix's loss and gradient tile,
      then the same per-segment GEMMs on the suffix sums: 3 GEMM-equivalents whatever K (plus the
      same boundary and prefix-norm terms); 3 transcendentals per pair and prefix.
    - the same two schedules on cuda (csrc/cuda/prefixes.cuh), counted from the cuda engine's launches:
      each segment's features in whole 32-feature stages (a segment starts on a 16-byte chunk), K H
      blocks per gradient block, per-segment ATen GEMMs: about 4 (3 for SigLIP) GEMM-equivalents.
    - ``schedule`` "K-loop": everything else (MW, NT-Xent run the loss per prefix), the sum of the K
      predictions at widths ``d_k``: ``4 sum_k d_k / D`` (3 for SigLIP)."""
    if loss in ONE_PASS_LOSSES and ONE_PASS_LOSSES[loss] in ONE_PASS_BACKENDS.get(backend, ()):
        return _one_pass_matryoshka(loss, n, list(dims), dtype, backend, normalize=normalize, **kw)
    parts = [predict(loss, n, d, dtype, backend, **kw) for d in dims]
    d = dims[-1]
    why = ("plain PyTorch" if backend == "naive" else f"{loss} has no one-pass Matryoshka form")
    out = {"loss": loss, "n": n, "d": d, "dims": list(dims), "dtype": dtype, "backend": backend,
           "schedule": "K-loop", "schedule_why": why,
           "gemm_equivalents": sum(p["gemm_equivalents"] * k / d for p, k in zip(parts, dims)),
           "exps": sum(p["exps"] for p in parts), "hbm_bytes": sum(p["hbm_bytes"] for p in parts),
           "predicted_ms": {g: sum(p["predicted_ms"][g] for p in parts) for g in parts[0]["predicted_ms"]},
           "single_at_d": {k: parts[-1][k] for k in ("gemm_equivalents", "exps", "hbm_bytes", "predicted_ms")}}
    return out


def _one_pass_matryoshka(loss: str, n: int, dims: list[int], dtype: str, backend: str, *, normalize: bool,
                         interpreter: bool = False, budget: int | None = None, efficiency: str = "assumed",
                         devices=None) -> dict:
    """triton's lse_prefixes or pointwise_prefixes launches (backend/triton/prefixes.py), from plan.py's
    parameters; cuda's lse_prefixes (``_cuda_prefix_kernels``)."""
    from ..backend.triton import plan

    devices = tuple(DEVICES) if devices is None else tuple(devices)
    tdtype = getattr(torch, dtype)
    if backend == "cuda":
        if interpreter:
            raise ValueError("--interpreter models the Triton interpreter's tiles; the cuda engine has none")
        budget = plan.workspace_budget() if budget is None else budget
        kernels, workspace, library, kind, m, cols, exps, g_elem = _cuda_prefix_kernels(loss, n, dims, tdtype,
                                                                                         budget, normalize)
        out = _prediction(loss, n, dims[-1], dtype, backend, m, cols, kind, tdtype, kernels, workspace, library,
                          ("assumed" if efficiency == "assumed" else efficiency, devices))
        return _one_pass_summary(out, loss, n, dims, dtype, backend, m * cols, exps, g_elem,
                                 {"budget": budget, "efficiency": efficiency, "devices": devices})
    if interpreter and tdtype == torch.bfloat16:
        tdtype = torch.float32  # the interpreter computes bfloat16 inputs in float32 (tiles.operands)
    budget = plan.workspace_budget() if budget is None else budget
    m, cols, kind, rows_on, cols_on = _shape(loss, n)
    d, k = dims[-1], len(dims)
    d_pad = plan.padded_features(d)
    acc, g = plan.acc_dtype(tdtype), plan.g_dtype(tdtype)
    elem, acc_elem, g_elem = (torch.empty((), dtype=t).element_size() for t in (tdtype, acc, g))
    op = ONE_PASS_LOSSES[loss]
    family = "prefixes" if op == "lse_prefixes" else "prefix_pointwise"
    cfg = plan.tile_configs(tdtype, interpreter, family)[0]
    gcfg = plan.gemm_configs(tdtype, interpreter)[0]
    matrix = _matrix_rate(tdtype)
    block_d = plan.feature_block(d_pad, tdtype, interpreter)
    features = plan.prefix_features(dims, block_d)  # what each S tile multiplies over, all segments
    steps = features / block_d
    directions = int(rows_on) + int(cols_on)
    smallest = plan.smallest_tile_edge(tdtype, interpreter, (family,))
    kernels = []
    if op == "lse_prefixes":
        fr, fc = plan.prefix_forward_blocks(m, cols, k, tdtype, interpreter, budget)
        fwd = Kernel(f"lse_prefixes forward ({k} prefixes)", matrix=matrix, code=("triton", "prefix_forward", steps))
        _tile_pass(fwd, (plan.ranges(m, fr), plan.ranges(cols, fc)), features, cfg, elem, k * directions)
        forward_ws = k * ((fr * math.ceil(fc / smallest) if rows_on else 0)
                          + (math.ceil(fr / smallest) * fc if cols_on else 0))
        gr, gc = plan.prefix_gradient_blocks(m, cols, k, tdtype, interpreter, budget)
        # H: K slots written to HBM; the suffix pass reads and rewrites K - 1 of them in the same program
        # right after (a program's K tiles, tens of KiB, stay in L2: ``h_l2_bytes``)
        grad = Kernel(f"lse_prefixes gradient tile ({k} H slots)", matrix=matrix,
                      code=("triton", "prefix_gradient", steps))
        exps = k * directions
        tile_sums = k * (gr * math.ceil(gc / smallest) + math.ceil(gr / smallest) * gc)
        kernels.append(fwd)
    else:  # the loss and its gradient tiles from the one S pass, as pointwise's
        forward_ws = 0
        gr, gc = plan.prefix_pointwise_blocks(m, cols, k, tdtype, interpreter, budget, True)
        grad = Kernel(f"pointwise_prefixes tile ({k} H slots)", matrix=matrix,
                      code=("triton", "prefix_pointwise", steps))
        exps = 3 * k  # exp2, log and a reciprocal per pair and prefix
        # per tile: K loss sums, K row and K column sums of D * T, one row sum of D
        tile_sums = (2 * k + 1) * gr * math.ceil(gc / smallest) + k * math.ceil(gr / smallest) * gc
    grad_blocks = (plan.ranges(m, gr), plan.ranges(cols, gc))
    _tile_pass(grad, grad_blocks, features, cfg, elem, exps, g_bytes=k * g_elem)
    windows = []
    for lo, hi in zip([0, *dims[:-1]], dims):
        block_n = plan.gemm_block_n(plan.padded_features(hi - lo), tdtype, interpreter)
        windows.append((hi - lo, math.ceil((hi - lo) / block_n) * block_n))
    gemms = Kernel("gradient GEMMs per segment (H-suffix @ y, H-suffix.T @ x)",
                   matrix="tf32" if tdtype == torch.float16 else matrix,
                   code=("triton", "gemm_window", max(gr, gc) / gcfg.block_k))
    _gemm_pass(gemms, grad_blocks, windows, gcfg, elem, g_elem, acc_elem)
    workspace = max(forward_ws * acc_elem, k * gr * gc * g_elem + tile_sums * acc_elem)
    # Beside the kernels (losses/_matryoshka.py, primitives/): with normalize the prefix sums of x * x
    # and y * y (one [rows, D] @ [D, K] product each), for CLIP / InfoNCE those of the target products
    # too, and the scale's gradient.
    library = (2 * m * d * k if op == "lse_prefixes" else 0) + (2 * (m + cols) * d * k if normalize else 0) \
        + 2 * m * d
    kernels += [grad, gemms]
    out = _prediction(loss, n, d, dtype, backend, m, cols, kind, tdtype, kernels, workspace, library,
                      ("assumed" if efficiency == "assumed" else efficiency, devices))
    kw = {"interpreter": interpreter, "budget": budget, "efficiency": efficiency, "devices": devices}
    return _one_pass_summary(out, loss, n, dims, dtype, backend, m * cols, exps, g_elem, kw)


def _one_pass_summary(out, loss, n, dims, dtype, backend, pairs, exps, g_elem, kw) -> dict:
    """A one-pass prediction's Matryoshka fields: its schedule, H traffic, and the loop of K losses beside it."""
    op = ONE_PASS_LOSSES[loss]
    k, d = len(dims), dims[-1]
    loop = [predict(loss, n, dk, dtype, backend, **kw) for dk in dims]
    summary = ("gemm_equivalents", "exps", "hbm_bytes", "predicted_ms")
    out.update(dims=list(dims), schedule=f"one pass ({op})",
               schedule_why=f"{backend} declares {op}: every S^k from one pass over the features",
               exps_per_pass=exps * pairs,
               h_bytes=pairs * g_elem * 3 * k,  # HBM: the tiles' K stores, the two GEMMs' reads of each slot
               h_l2_bytes=pairs * g_elem * 2 * (k - 1),  # the suffix pass
               single_at_d={key: loop[-1][key] for key in summary},
               k_loop={"gemm_equivalents": sum(p["gemm_equivalents"] * dk / d for p, dk in zip(loop, dims)),
                       "exps": sum(p["exps"] for p in loop), "hbm_bytes": sum(p["hbm_bytes"] for p in loop),
                       "predicted_ms": {key: round(sum(p["predicted_ms"][key] for p in loop), 3)
                                        for key in loop[0]["predicted_ms"]}})
    return out


def _efficiency(k: Kernel, device: str, tdtype: torch.dtype, d: int, mode: str) -> tuple[float, dict]:
    """(efficiency against the card's peak for the kernel's matrix type, how it was found)."""
    if not k.flops:
        return MATRIX_EFFICIENCY, {"bound": "HBM", "source": "memory traffic only"}
    if k.code is None or mode == "assumed":
        return MATRIX_EFFICIENCY, {"bound": "assumed", "source": "MATRIX_EFFICIENCY" if k.code is not None
                                   else "library GEMM: MATRIX_EFFICIENCY (cuBLAS measured 0.80 on an H200)"}
    from . import compiled

    engine, name, steps, *launch = k.code  # launch: cuda prefix_forward's prefixes per launch
    arch = compiled.ARCH_OF_DEVICE[device]
    try:
        loop = (compiled.cuda_loop(name, tdtype, arch, *launch) if engine == "cuda"
                else compiled.triton_loop(name, tdtype, d, arch))
    except Exception as exc:  # noqa: BLE001 - no compiler here: say so, use the constant
        return MATRIX_EFFICIENCY, {"bound": "assumed", "source": f"not compiled ({type(exc).__name__}: {exc})"[:200]}
    bound_eff = loop.efficiency(steps)
    eff = min(bound_eff, ACHIEVED_PEAK)
    return eff, {"bound": loop.bound, "efficiency": round(eff, 3), "bound_efficiency": round(bound_eff, 3),
                 "source": loop.source,
                 "registers": loop.registers, "ctas_per_sm": loop.ctas_per_sm,
                 "loop_instructions": loop.instructions, "loop_tensor": loop.tensor,
                 "loop_shared_bytes": loop.shared_bytes, "hazards": list(loop.hazards)}


def _prediction(loss, n, d, dtype, backend, m, cols, kind, tdtype, kernels, workspace, library, settings) -> dict:
    mode, devices = settings
    matrix = _matrix_rate(tdtype)
    pred = Prediction(loss, n, d, dtype, backend, m)
    unit = 2 * m * cols * d
    pred.gemm_equivalents = (sum(k.flops for k in kernels) + library) / unit
    pred.workspace_bytes = int(workspace)
    pred.exps = sum(k.exps for k in kernels)
    pred.hbm_bytes = sum(k.hbm_bytes for k in kernels)
    pred.launches = sum(k.launches for k in kernels)
    floor_gemms = 3 if kind == "pointwise" else 4
    found = {}
    for key in devices:
        dev = DEVICES[key]
        mufu = dev["sms"] * dev["clock"] * MUFU_PER_CLOCK
        total = 0.0
        for i, k in enumerate(kernels):
            eff, how = _efficiency(k, key, tdtype, d, mode)
            compute = k.flops / (_rate(dev, k.matrix) * eff) if k.flops else 0.0
            memory = k.hbm_bytes / (dev["hbm"] * MEMORY_EFFICIENCY)
            seconds = max(compute, memory) + k.exps / mufu + k.launches * LAUNCH_S
            total += seconds
            found.setdefault(i, {})[key] = {**how, "ms": round(seconds * 1e3, 3),
                                            "limit": "compute" if compute >= memory else "HBM"}
        pred.predicted_ms[key] = round(total * 1e3, 3)
        pred.floor_ms[key] = round(floor_gemms * unit / (_rate(dev, matrix) * ACHIEVED_PEAK) * 1e3, 3)
    pred.kernels = [{**asdict(k), "devices": found.get(i, {})} for i, k in enumerate(kernels)]
    return asdict(pred)


def _table(p: dict) -> str:
    lines = [f"{p['loss']} N={p['n']} D={p['d']} {p['dtype']} ({p['backend']}): "
             f"{p['gemm_equivalents']:.3f} GEMM-equivalents, workspace {p['workspace_bytes'] / 2**20:.1f} MiB, "
             f"{p['exps'] / 1e9:.2f} G transcendentals, {p['hbm_bytes'] / 1e9:.2f} GB HBM, {p['launches']} launches",
             f"{'device':<8}{'predicted ms':>14}{'GEMM floor ms':>15}"]
    for key in p["predicted_ms"]:
        lines.append(f"{key:<8}{p['predicted_ms'][key]:>14.2f}{p['floor_ms'][key]:>15.2f}")
        for k in p["kernels"]:
            how = k["devices"][key]
            lines.append(f"  {k['name']:<44}{how['ms']:>9.2f} ms  {how['limit']}; loop bound: {how['bound']}"
                         + (f", efficiency {how['efficiency']:.2f}" if "efficiency" in how else "")
                         + f" ({how['source']})")
            lines += [f"    not modelled: {h}" for h in how.get("hazards", [])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Predictions, not measurements: see the module docstring for the model.")
    p.add_argument("--loss", choices=LOSSES, default="clip")
    p.add_argument("--n", type=int, required=True, help="batch size (rows = columns)")
    p.add_argument("--d", type=int, required=True, help="feature width")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="torch dtype name of the features")
    p.add_argument("--backend", default="triton", choices=BACKENDS)
    p.add_argument("--gpu", choices=tuple(DEVICES), action="append", help="predict for this card (repeatable; "
                   "default: all)")
    p.add_argument("--efficiency", choices=("compiled", "assumed"), default="compiled",
                   help="kernels' efficiency from their compiled code (default), or the constant")
    p.add_argument("--workspace-mb", type=float, default=None,
                   help="FASTCL_WORKSPACE_MB to model (default: the environment's, else 256)")
    p.add_argument("--interpreter", action="store_true", help="the interpreter's tiles (what the tests count)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--matryoshka-dims", type=lambda v: [int(d) for d in v.split(",")], default=None,
                   help="Matryoshka prefixes d_1,...,d_K (the last one --d), as the backend runs them: one "
                        "lse_prefixes pass (triton: clip, infonce) or the K-loop (printed as JSON)")
    args = p.parse_args(argv)
    if args.n < 1 or args.d < 1:
        p.error("--n and --d must be positive")
    dims = args.matryoshka_dims
    if dims is not None and (dims != sorted(set(dims)) or dims[0] < 1 or dims[-1] != args.d):
        p.error(f"--matryoshka-dims must increase strictly from 1 up and end at --d ({args.d}), got {dims}")
    budget = None if args.workspace_mb is None else int(args.workspace_mb * (1 << 20))
    kw = {"interpreter": args.interpreter, "budget": budget, "efficiency": args.efficiency, "devices": args.gpu}
    try:
        if dims is not None:
            print(json.dumps(predict_matryoshka(args.loss, args.n, dims, args.dtype, args.backend, **kw)))
            return 0
        out = predict(args.loss, args.n, args.d, args.dtype, args.backend, **kw)
    except ValueError as exc:
        p.error(str(exc))
    print(json.dumps(out) if args.json else _table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
