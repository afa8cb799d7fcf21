"""Every Triton kernel of the engine, in every input dtype and every configuration a launch can pick,
compiled ahead of time for sm_80 and sm_90 (no GPU needed): does it build, does it spill registers,
does its shared memory fit the architecture?

    python -m fastcl.triton.aot [--out REPORT] [--arch 80,90] [--jobs N]

Each variant is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
with the specialisations a launch gets (16-byte aligned pointers, D a multiple of 16) and the
heaviest flags (keys, both directions, gradients), and the largest feature blocks (any D that is a
multiple of 128): smaller D only shrinks the blocks. ptxas's own report gives registers, stack
frame and spills; Triton's metadata the shared memory a launch requests. "A launch can pick" is
the configuration list of ``plan.py`` after the pruning rule of ``tiles.py`` (estimated operand
pipeline <= the architecture's shared memory per block). float32 is compiled as 3xTF32 (torch's
default "highest" matmul precision), the heavier of its two precisions.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import torch

from . import plan

# Largest dynamic shared memory one block may opt into, bytes (CUDA programming guide, table of
# compute capabilities): A100 163 KiB, H100 / H200 227 KiB.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FAMILY = {"lse_forward": "lse", "lse_gradient": "lse", "pointwise": "pointwise"}  # S-tile kernels
WIDE_D = 4096  # a multiple of every feature block: the largest blocks


class Variant(NamedTuple):
    arch: int
    kernel: str
    dtype: str  # torch dtype name, without "torch."
    config: tuple  # plan.TileConfig or plan.GemmConfig fields, then BLOCK_D / BLOCK_N

    @property
    def label(self) -> str:
        return "x".join(map(str, self.config))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def variants(archs=(80, 90)) -> list[Variant]:
    """What a launch can compile: every kernel, dtype and configuration that passes the pruning rule."""
    out = []
    for arch in archs:
        limit = SHARED_MEMORY_LIMIT[arch]
        for dtype in DTYPES:
            block_d = plan.feature_block(WIDE_D, dtype, False)
            block_n = plan.gemm_block_n(WIDE_D, dtype, False)
            for kernel, family in FAMILY.items():
                for cfg in plan.tile_configs(dtype, False, family):
                    if plan.tile_smem(cfg, block_d, dtype) <= limit:
                        out.append(Variant(arch, kernel, _name(dtype), (*cfg, block_d)))
            for cfg in plan.gemm_configs(dtype, False):
                if plan.gemm_smem(cfg, block_n, dtype) <= limit:
                    out += [Variant(arch, k, _name(dtype), (*cfg, block_n)) for k in ("gemm", "gemm_transposed")]
    return out


def launch_variants(dims, arch: int = 90, dtypes=DTYPES) -> list[Variant]:
    """The variants launches with these feature widths compile with autotuning off (the first
    configuration of each list): one per kernel, dtype and feature block. The flags of the kernels
    are run-time values and the launchers pass 16-byte aligned pointers and padded D, so nothing
    else multiplies them."""
    out = []
    for dtype in dtypes:
        for d in dims:
            d_pad = plan.padded_features(d)
            block_d = plan.feature_block(d_pad, dtype, False)
            for kernel, family in FAMILY.items():
                out.append(Variant(arch, kernel, _name(dtype), (*plan.tile_configs(dtype, False, family)[0], block_d)))
            gemm = (*plan.gemm_configs(dtype, False)[0], plan.gemm_block_n(d_pad, dtype, False))
            out += [Variant(arch, k, _name(dtype), gemm) for k in ("gemm", "gemm_transposed")]
    return list(dict.fromkeys(out))


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _source(v: Variant):
    """(jit function, signature, constexprs, attrs, num_warps, num_stages) of a variant."""
    from triton.compiler import ASTSource

    from . import gemm, lse, pointwise, tiles

    dtype = getattr(torch, v.dtype)
    t, acc, g = (f"*{_TRITON_TYPES[x]}" for x in (dtype, plan.acc_dtype(dtype), plan.g_dtype(dtype)))
    precision = tiles.dot_precision(dtype) if dtype != torch.float32 else "tf32x3"
    blocks = ["row0", "row_end", "col0", "col_end"]
    if v.kernel == "gemm" or v.kernel == "gemm_transposed":
        block_m, block_k, warps, stages, block_n = v.config
        fn = gemm._gemm_kernel.fn
        sig = {"f_ptr": t, "g_ptr": g, "out_ptr": acc, **dict.fromkeys(["stride_g", "P", "K", "D", "accumulate"],
                                                                        "i32")}
        consts = dict(TRANSPOSED=v.kernel == "gemm_transposed", PRECISION=precision, BLOCK_N=block_n,
                      BLOCK_M=block_m, BLOCK_K=block_k)
    else:
        block_a, block_b, warps, stages, block_d = v.config
        common = dict(BLOCK_D=block_d, PRECISION=precision, BLOCK_A=block_a, BLOCK_B=block_b)
        keys = {"a_keys": "*i64", "b_keys": "*i64"}
        if v.kernel == "lse_forward":
            fn = lse._forward_kernel.fn
            sig = {"a_ptr": t, "b_ptr": t, "scale_ptr": acc, **keys, "row_part": acc, "col_part": acc}
            flags = ["has_keys", "rows", "cols"]
        elif v.kernel == "lse_gradient":
            fn = lse._gradient_kernel.fn
            sig = {"a_ptr": t, "b_ptr": t, "scale_ptr": acc, **keys, "row_g": acc, "row_shift": acc, "col_g": acc,
                   "col_shift": acc, "g_ptr": g}
            flags = ["has_keys", "row_term", "col_term"]
        else:
            fn = pointwise._pointwise_kernel.fn
            sig = {"a_ptr": t, "b_ptr": t, "consts_ptr": acc, **keys, "bias_ptr": acc, "weight_ptr": acc,
                   "loss_part": acc, "dsum_part": acc, "g_ptr": g}
            flags = ["kind", "has_keys", "grads"]
        consts = common
        sig.update({name: "i32" for name in [*blocks, "D", *flags]})
    sig.update({name: "constexpr" for name in consts})
    assert set(sig) == set(fn.arg_names), (v.kernel, sorted(set(sig) ^ set(fn.arg_names)))
    sig = {name: sig[name] for name in fn.arg_names}
    # What a launch specialises on: 16-byte aligned pointers, D % 16 == 0 (the features are padded).
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
             if ty.startswith("*") or name == "D"}
    return ASTSource(fn, sig, consts, attrs), warps, stages


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


@contextlib.contextmanager
def ptxas_report(log: io.StringIO):
    """Compile in a fresh cache (so that ptxas runs) with ptxas's report printed into ``log``; Triton's
    cache directory and report switch are restored afterwards, whatever they were."""
    from triton import knobs

    saved = knobs.cache.dir, knobs.nvidia.dump_ptxas_log
    with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log):
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log = cache, True
        try:
            yield
        finally:
            knobs.cache.dir, knobs.nvidia.dump_ptxas_log = saved


def compile_variant(v: Variant) -> dict:
    """Compile one variant and read its resources from ptxas's report."""
    import triton
    from triton.backends.compiler import GPUTarget

    src, warps, stages = _source(v)
    log = io.StringIO()
    with ptxas_report(log):
        try:
            kernel = triton.compile(src, target=GPUTarget("cuda", v.arch, 32),
                                    options=dict(num_warps=warps, num_stages=stages))
        except Exception as exc:  # noqa: BLE001 - a failed build is a result of the check
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    text = log.getvalue()
    spill, regs = _PTXAS.search(text), _REGS.search(text)
    if spill is None or regs is None:
        return {"error": "no ptxas report in: " + text[-300:]}
    stack, stores, loads = map(int, spill.groups())
    return {"regs": int(regs.group(1)), "stack": stack, "spill_stores": stores, "spill_loads": loads,
            "smem": kernel.metadata.shared}


def problems(v: Variant, r: dict) -> list[str]:
    """What is wrong with a compiled variant (empty: nothing)."""
    if "error" in r:
        return [r["error"]]
    out = []
    if r["spill_stores"] or r["spill_loads"] or r["stack"]:
        out.append(f"spills ({r['stack']} B stack, {r['spill_stores']} B stores, {r['spill_loads']} B loads)")
    if r["smem"] > SHARED_MEMORY_LIMIT[v.arch]:
        out.append(f"shared memory {r['smem']} B > {SHARED_MEMORY_LIMIT[v.arch]} B")
    return out


def _worker_init():
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default


def compile_all(vs: list[Variant], jobs: int | None = None) -> list[dict]:
    jobs = jobs or os.cpu_count() or 1
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        return list(pool.map(compile_variant, vs))


def report(vs: list[Variant], results: list[dict]) -> str:
    import triton

    from .. import __version__

    lines = [f"# Triton AOT compile of fastcl's kernels: fastcl {__version__}, triton {triton.__version__}, "
             f"torch {torch.__version__}",
             "# regenerate: python -m fastcl.triton.aot --out <this file> (checked by tests/test_triton_aot.py)",
             "# config: S tiles BLOCK_A x BLOCK_B x num_warps x num_stages x BLOCK_D; GEMMs BLOCK_M x BLOCK_K x "
             "num_warps x num_stages x BLOCK_N",
             f"# shared memory limits (bytes per block): {SHARED_MEMORY_LIMIT}", "",
             f"{'arch':<6}{'kernel':<17}{'dtype':<10}{'config':<16}{'regs':>5}{'stack':>7}{'spill st/ld':>13}"
             f"{'smem':>8}  status"]
    for v, r in sorted(zip(vs, results), key=lambda p: p[0]):
        status = "; ".join(problems(v, r)) or "ok"
        if "error" in r:
            lines.append(f"sm_{v.arch:<3}{v.kernel:<17}{v.dtype:<10}{v.label:<16}{'-':>5}{'-':>7}{'-':>13}{'-':>8}  "
                         + status)
            continue
        spills = f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(f"sm_{v.arch:<3}{v.kernel:<17}{v.dtype:<10}{v.label:<16}{r['regs']:>5}{r['stack']:>7}"
                     f"{spills:>13}{r['smem']:>8}  {status}")
    return "\n".join(lines) + "\n"


def table_rows(text: str) -> list[tuple[str, ...]]:
    """The (arch, kernel, dtype, config) of each row of a report: what a committed report covers."""
    return [tuple(line.split()[:4]) for line in text.splitlines() if line.startswith("sm_")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the report here (default: print it)")
    p.add_argument("--arch", default="80,90", help="compute capabilities (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compilations (default: CPU count)")
    args = p.parse_args(argv)
    vs = variants(tuple(int(a) for a in args.arch.split(",")))
    results = compile_all(vs, args.jobs)
    text = report(vs, results)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0 if not any(problems(v, r) for v, r in zip(vs, results)) else 1


if __name__ == "__main__":
    sys.exit(main())
