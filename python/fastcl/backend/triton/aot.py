"""Every Triton kernel of fastcl, in every input dtype and every configuration a launch can pick,
compiled ahead of time for sm_80 and sm_90 (no GPU needed): does it build, does it spill registers,
does its shared memory fit the architecture?

    python -m fastcl.backend.triton.aot [--out REPORT] [--arch 80,90] [--jobs N]

Each variant is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
with the specialisations a launch gets (16-byte aligned pointers; D, and the block bounds a kernel
lets Triton specialise, multiples of 16; a ``ragged`` twin where a block's column end may not be) and
the heaviest flags (keys, both directions, gradients; the lse kernels' exclude list is a run-time
loop over its width E, compiled into every variant), and the largest feature blocks (any D that is
a multiple of 128): smaller D only shrinks the blocks. Registers, stack frame and local memory are read
from the cubin with ``cuobjdump -res-usage`` (a spill needs a stack frame: none means no spill), the
same way under every Triton of the supported range (``versions.py``); the shared memory a launch
requests from Triton's metadata. "A launch can pick" is the configuration list of ``plan.py`` after
the pruning rule of ``tiles.py`` (estimated operand pipeline <= the architecture's shared memory per
block), and the launch constants of ``topk.py`` and ``maxsim.py``. float32 is compiled as 3xTF32
(torch's default "highest" matmul precision), the heavier of its two precisions.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import torch

from . import plan

# Largest dynamic shared memory one block may opt into, bytes (CUDA programming guide, table of
# compute capabilities): A100 163 KiB, H100 / H200 227 KiB.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FAMILY = {"lse_forward": "lse", "lse_gradient": "lse", "pointwise": "pointwise",  # S-tile kernels
          "prefix_forward": "prefixes", "prefix_gradient": "prefixes", "prefix_pointwise": "prefix_pointwise"}
# The gradient GEMMs by layout, full width or on a window of columns (lse_prefixes' segments)
GEMMS = ("gemm", "gemm_transposed", "gemm_window", "gemm_window_transposed")
MAXSIM = ("maxsim_forward", "maxsim_dq", "maxsim_dd")
MAXSIM_DTYPES = (torch.float32, torch.float64)  # the host upcasts 16-bit tokens (backend/maxsim.py)
KERNELS = (*FAMILY, *GEMMS, "topk", *MAXSIM)
WIDE_D = 4096  # a multiple of every feature block: the largest blocks
# The int arguments that end a block's columns (``lse.py``, ``pointwise.py``: col_end; ``gemm.py``:
# cols_g): multiples of 128 but in the matrix's last column block, where they are N's remainder. A
# kernel that lets Triton specialise one of them compiles a second, ragged, variant there when N is
# not a multiple of 16 (and a third for N == 1, a constant to Triton, which no variant here models).
COLUMN_ENDS = ("col_end", "cols_g")
# The top-k's running set per row: the largest (topk.MAX_K) and a typical one (a mining k of 10-16).
TOPK_K_PAD = (16, 256)


class Variant(NamedTuple):
    arch: int
    kernel: str
    dtype: str  # torch dtype name, without "torch."
    config: tuple  # the kernel's launch constants (see ``report``'s legend)
    ragged: bool = False  # compiled for a last column block whose end is not a multiple of 16

    @property
    def label(self) -> str:
        return "x".join(map(str, self.config)) + ("-ragged" if self.ragged else "")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _engine_variants(arch: int, dtype: torch.dtype, d_pad: int, first_only: bool) -> list[Variant]:
    """The S-tile kernels and gradient GEMMs at one padded feature width."""
    limit = SHARED_MEMORY_LIMIT[arch]
    block_d = plan.feature_block(d_pad, dtype, False)
    block_n = plan.gemm_block_n(d_pad, dtype, False)
    pick = (lambda cs: cs[:1]) if first_only else (lambda cs: cs)
    out = []
    for kernel, family in FAMILY.items():
        for cfg in pick(plan.tile_configs(dtype, False, family)):
            if first_only or plan.tile_smem(cfg, block_d, dtype) <= limit:
                out.append(Variant(arch, kernel, _name(dtype), (*cfg, block_d)))
    for cfg in pick(plan.gemm_configs(dtype, False)):
        if first_only or plan.gemm_smem(cfg, block_n, dtype) <= limit:
            out += [Variant(arch, k, _name(dtype), (*cfg, block_n)) for k in GEMMS]
    return out + [v._replace(ragged=True) for v in out if set(COLUMN_ENDS) & set(specialised(v.kernel))]


def _kernel(name: str):
    """The JITFunction behind an engine kernel's name."""
    from . import gemm, lse, pointwise, prefixes

    return {"lse_forward": lse._forward_kernel, "lse_gradient": lse._gradient_kernel,
            "pointwise": pointwise._pointwise_kernel, "prefix_forward": prefixes._prefix_forward_kernel,
            "prefix_gradient": prefixes._prefix_gradient_kernel, "prefix_pointwise": prefixes._prefix_pointwise_kernel,
            **dict.fromkeys(GEMMS, gemm._gemm_kernel)}[name].fn


def specialised(kernel: str) -> list[str]:
    """The arguments of an engine kernel that Triton specialises at launch (on 16-byte alignment,
    divisibility by 16, and ints equal to 1): those not in its ``do_not_specialize``, constexprs aside."""
    return [p.name for p in _kernel(kernel).params if not p.is_constexpr and not p.do_not_specialize]


def _topk_variants(arch: int, dtype: torch.dtype, k_pads=TOPK_K_PAD) -> list[Variant]:
    from .topk import GPU_BLOCK_D, GPU_SHAPES

    return [Variant(arch, "topk", _name(dtype), (*shape, GPU_BLOCK_D, k_pad)) for shape in GPU_SHAPES
            for k_pad in k_pads]


def _maxsim_variants(arch: int, dtype: torch.dtype) -> list[Variant]:
    from .maxsim import GPU_BLOCKS, GPU_WARPS

    return [Variant(arch, k, _name(dtype), (*GPU_BLOCKS, GPU_WARPS)) for k in MAXSIM]


def variants(archs=(80, 90)) -> list[Variant]:
    """What a launch can compile: every kernel, dtype and configuration that passes the pruning rule
    (with any Triton: ``compile_variant`` says which of them the installed one cannot build)."""
    out = []
    for arch in archs:
        for dtype in DTYPES:
            out += _engine_variants(arch, dtype, WIDE_D, first_only=False)
            out += _topk_variants(arch, dtype)
            if dtype in MAXSIM_DTYPES:
                out += _maxsim_variants(arch, dtype)
    return out


def launch_variants(dims, arch: int = 90, dtypes=DTYPES) -> list[Variant]:
    """The variants the engine's launches with these feature widths compile with autotuning off (the
    first configuration of each list), which is what the GPU tests and the benchmark launch: one per
    kernel, dtype and feature block, and a ragged twin of the kernels that specialise a column end
    (the GPU tests' shapes have ragged N; N == 1 adds a variant not counted here). The kernels' flags
    are run-time values and the launchers pass 16-byte aligned pointers and padded D, so nothing else
    multiplies them."""
    out = []
    for dtype in dtypes:
        for d in dims:
            out += _engine_variants(arch, dtype, plan.padded_features(d), first_only=True)
    return list(dict.fromkeys(out))


def unsupported(v: Variant, triton_version: str | None = None) -> str | None:
    """Why a variant cannot be built with this Triton (None: it can); the launchers refuse the same
    calls with the same reason (``triton_limits``)."""
    from .versions import triton_limits

    return triton_limits(v.kernel, v.dtype, version=triton_version)


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _source(v: Variant):
    """(jit function, signature, constexprs, attrs, num_warps, num_stages) of a variant."""
    from triton.compiler import ASTSource

    from . import tiles

    dtype = getattr(torch, v.dtype)
    t, acc, g = (f"*{_TRITON_TYPES[x]}" for x in (dtype, plan.acc_dtype(dtype), plan.g_dtype(dtype)))
    precision = tiles.dot_precision(dtype) if dtype != torch.float32 else "tf32x3"
    blocks = ["row0", "row_end", "col0", "col_end"]
    if v.kernel == "topk":
        return _topk_source(v, t, acc, precision)
    if v.kernel in MAXSIM:
        return _maxsim_source(v, t, precision)
    fn = _kernel(v.kernel)
    if v.kernel in GEMMS:
        block_m, block_k, warps, stages, block_n = v.config
        sig = {"f_ptr": t, "g_ptr": g, "out_ptr": acc,
               **dict.fromkeys(["rows_g", "cols_g", "D", "W", "accumulate"], "i32")}
        consts = dict(TRANSPOSED=v.kernel.endswith("transposed"), WINDOW="window" in v.kernel, PRECISION=precision,
                      BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k)
    else:
        block_a, block_b, warps, stages, block_d = v.config
        common = dict(BLOCK_D=block_d, PRECISION=precision, BLOCK_A=block_a, BLOCK_B=block_b)
        keys = {"a_keys": "*i64", "b_keys": "*i64"}
        if v.kernel == "lse_forward":  # exclude and E: op lse_exclude's list, a run-time loop in the same kernel
            sig = {"a_ptr": t, "b_ptr": t, "scale_ptr": acc, **keys, "exclude": "*i64", "row_part": acc,
                   "col_part": acc}
            flags = ["E", "has_keys", "rows", "cols"]
        elif v.kernel == "lse_gradient":
            sig = {"a_ptr": t, "b_ptr": t, "scale_ptr": acc, **keys, "exclude": "*i64", "row_g": acc, "row_shift": acc,
                   "col_g": acc, "col_shift": acc, "g_ptr": g}
            flags = ["E", "has_keys", "row_term", "col_term"]
        elif v.kernel == "pointwise":
            sig = {"a_ptr": t, "b_ptr": t, "consts_ptr": acc, **keys, "bias_ptr": acc, "weight_ptr": acc,
                   "loss_part": acc, "dsum_part": acc, "g_ptr": g}
            flags = ["kind", "has_keys", "grads"]
        elif v.kernel == "prefix_pointwise":  # pointwise_prefixes: dims and K a run-time loop, as below
            sig = {"a_ptr": t, "b_ptr": t, "consts_ptr": acc, "dims_ptr": "*i32", "a_scale": acc, "b_scale": acc,
                   **keys, "bias_ptr": acc, "weight_ptr": acc, "loss_part": acc, "dsum_part": acc, "row_part": acc,
                   "col_part": acc, "h_ptr": g}
            flags = ["M", "N", "K", "has_scales", "kind", "has_keys", "grads"]
        else:  # lse_prefixes: dims and K a run-time loop, the factors on (the heavier flags)
            prefix = {"a_ptr": t, "b_ptr": t, "scale_ptr": acc, "dims_ptr": "*i32", "a_scale": acc, "b_scale": acc}
            if v.kernel == "prefix_forward":
                sig = {**prefix, "row_part": acc, "col_part": acc}
                flags = ["M", "N", "K", "has_scales", "rows", "cols"]
            else:
                sig = {**prefix, "row_g": acc, "row_shift": acc, "col_g": acc, "col_shift": acc, "row_part": acc,
                       "col_part": acc, "h_ptr": g}
                flags = ["M", "N", "K", "has_scales", "row_term", "col_term"]
        consts = common
        sig.update({name: "i32" for name in [*blocks, "D", *flags]})
    sig.update({name: "constexpr" for name in consts})
    assert set(sig) == set(fn.arg_names), (v.kernel, sorted(set(sig) ^ set(fn.arg_names)))
    sig = {name: sig[name] for name in fn.arg_names}
    # What a launch specialises on: 16-byte aligned pointers (torch's allocations), and the ints the
    # kernel does not exempt multiples of 16: D (the features are padded) and block bounds (multiples
    # of 128), but a ragged variant's column end.
    divisible = set(specialised(v.kernel)) - (set(COLUMN_ENDS) if v.ragged else set())
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
             if ty.startswith("*") or name in divisible}
    return ASTSource(fn, sig, consts, attrs), warps, stages


def _topk_source(v: Variant, t: str, acc: str, precision: str):
    """The top-k kernel with keys and the diagonal excluded (the heaviest flags)."""
    import triton.language as tl

    from . import topk

    block_a, block_b, warps, stages, block_d, k_pad = v.config
    wide = v.dtype == "float64"
    fn = topk._topk_kernel.fn
    sig = {"x_ptr": t, "y_ptr": t, "scale_ptr": acc, "row_keys": "*i64", "col_keys": "*i64", "values_ptr": acc,
           "cols_ptr": "*i64", **dict.fromkeys(["M", "N", "D", "K"], "i32")}
    consts = dict(HAS_KEYS=True, EXCLUDE_DIAGONAL=True, K_PAD=k_pad, KEY_DTYPE=tl.int64 if wide else tl.int32,
                  MAGNITUDE=2**63 - 1 if wide else 2**31 - 1, SENTINEL=-(2**63) if wide else -(2**31),
                  BLOCK_D=block_d, PRECISION=precision, BLOCK_A=block_a, BLOCK_B=block_b)
    return _ast(fn, sig, consts), warps, stages


def _maxsim_source(v: Variant, t: str, precision: str):
    """A MaxSim kernel with both token masks (the heaviest flags)."""
    import triton.language as tl

    from . import maxsim

    block_a, block_t, block_d, warps = v.config
    fn = getattr(maxsim, {"maxsim_forward": "_forward_kernel", "maxsim_dq": "_dq_kernel",
                          "maxsim_dd": "_dd_kernel"}[v.kernel])  # not autotuned: the JITFunction itself
    out = {"maxsim_forward": {"s_ptr": t}, "maxsim_dq": {"g_ptr": t, "dq_ptr": t},
           "maxsim_dd": {"g_ptr": t, "dd_ptr": t, "B": "i32"}}[v.kernel]
    sig = {"q_ptr": t, "d_ptr": t, "q_mask_ptr": "*i8", "d_mask_ptr": "*i8", **out,
           **dict.fromkeys(["N", "Lq", "Ld", "D"], "i32")}
    consts = dict(HAS_Q_MASK=True, HAS_D_MASK=True, BLOCK_A=block_a, BLOCK_T=block_t, BLOCK_D=block_d,
                  PRECISION=precision, ACC=tl.float64 if v.dtype == "float64" else tl.float32)
    return _ast(fn, sig, consts), warps, 3


def _ast(fn, sig, consts):
    """The ASTSource of ``fn``: ``consts`` in the signature as ``constexpr``, pointers specialised as
    16-byte aligned (what torch's allocations give a launch)."""
    from triton.compiler import ASTSource

    sig = {**sig, **dict.fromkeys(consts, "constexpr")}
    assert set(sig) == set(fn.arg_names), (fn.__name__, sorted(set(sig) ^ set(fn.arg_names)))
    sig = {name: sig[name] for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(sig.values()) if ty.startswith("*")}
    return ASTSource(fn, sig, consts, attrs)


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cuobjdump() -> str:
    """The cuobjdump that Triton's wheel ships (every supported release does), else the CUDA
    toolkit's on PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError("cuobjdump: neither in Triton's wheel nor on PATH")
    return found


def resources(cubin: bytes, function: str | None = None) -> dict:
    """Registers, stack frame, static shared memory and local memory of the kernel in ``cubin``
    (``cuobjdump -res-usage``); of the function named ``function`` (mangled, exactly) when given."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    if function is not None:
        blocks = dict(re.findall(r"Function (\S+):\s*\n([^\n]*)", text))
        if function not in blocks:
            raise ValueError(f"no resource usage of {function} in: {sorted(blocks)}")
        text = blocks[function]
    found = [tuple(map(int, m)) for m in _RESOURCES.findall(text)]
    if not found:
        raise ValueError("no resource usage in: " + text[-300:])
    # The kernel and any function it calls (Triton may outline some; a CUDA cubin may hold several
    # instantiations): the largest of each.
    regs, stack, shared, local = (max(column) for column in zip(*found))
    return {"regs": regs, "stack": stack, "shared": shared, "local": local}


def _compile(v: Variant):
    import triton
    from triton.backends.compiler import GPUTarget

    src, warps, stages = _source(v)
    return triton.compile(src, target=GPUTarget("cuda", v.arch, 32), options=dict(num_warps=warps, num_stages=stages))


def cubin(v: Variant) -> bytes:
    """The variant's machine code, as a launch would load it (``fastcl.benchmark.sass`` reads it)."""
    return _compile(v).asm["cubin"]


def compile_variant(v: Variant) -> dict:
    """Compile one variant and read its resources from the cubin."""
    if os.environ.get("FASTCL_AOT_TEST_CRASH") == v.kernel:  # a compiler abort, for tests/test_triton_aot.py
        os.abort()
    reason = unsupported(v)
    if reason is not None:
        return {"unsupported": reason}
    try:
        kernel = _compile(v)
    except Exception as exc:  # noqa: BLE001 - a failed build is a result of the check
        lines = [line for line in str(exc).splitlines() if line.strip()]
        # Triton's CompilationError says where first ("at 13:8:"), then the source, then why.
        return {"error": f"{type(exc).__name__}: {lines[0][:120] if lines else ''} {lines[-1][:200] if lines else ''}"}
    return {**resources(kernel.asm["cubin"]), "smem": kernel.metadata.shared}


def known_spill(v: Variant, triton_version: str | None = None) -> str | None:
    """Why a variant may spill (None: it must not). Speed, not correctness: a spill costs local-memory
    traffic. The engine must not spill under the newest Triton fastcl is tested with; older ones
    allocate registers less well (3.5 spills 16-32 B in float32 3xTF32 tiles on sm_80), so there only
    the GPU tests' sm_90 launches in the training dtypes (``launch_variants``, tests/test_triton_aot.py)
    must not."""
    from .versions import NEWEST_TESTED, installed, parse

    version = triton_version or installed()
    if v.kernel in (*FAMILY, *GEMMS) and version is not None and parse(version) < NEWEST_TESTED:
        return f"Triton {version} (< {NEWEST_TESTED[0]}.{NEWEST_TESTED[1]}) allocates registers less well"
    if v.kernel == "topk":
        return ("the running set ([BLOCK_A, K_PAD] keys and columns) and the S tile share the registers "
                "of a program; a speed matter, not a result one")
    if v.kernel in MAXSIM and v.dtype == "float64":
        return "float64 MaxSim is the exactness check, not a training dtype"
    return None


def problems(v: Variant, r: dict) -> list[str]:
    """What is wrong with a compiled variant (empty: nothing). A variant the installed Triton cannot
    build is no problem here: the launchers refuse it with the same reason."""
    if "unsupported" in r:
        return []
    if "error" in r:
        return [r["error"]]
    out = []
    if (r["stack"] or r["local"]) and known_spill(v) is None:
        out.append(f"spills ({r['stack']} B stack frame, {r['local']} B local memory)")
    if r["smem"] > SHARED_MEMORY_LIMIT[v.arch]:
        out.append(f"shared memory {r['smem']} B > {SHARED_MEMORY_LIMIT[v.arch]} B")
    return out


def status(v: Variant, r: dict) -> str:
    if "unsupported" in r:
        return "unsupported here: " + r["unsupported"]
    bad = problems(v, r)
    if bad:
        return "; ".join(bad)
    return f"ok (spills {r['stack']} B: known)" if r["stack"] or r["local"] else "ok"


def _worker_init():
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default


def compile_all(vs: list[Variant], jobs: int | None = None) -> list[dict]:
    """``compile_variant`` of each, in worker processes. Triton's compiler can abort the process on
    an internal assertion instead of raising; the variants a crash takes down with it are retried
    one per fresh worker, so the crash is pinned to its variant and the rest still report."""
    jobs = jobs or os.cpu_count() or 1
    results: dict[int, dict] = {}
    todo = list(range(len(vs)))
    for width in (jobs, 1):
        crashed = []
        for batch in ([todo] if width > 1 else [[i] for i in todo]):
            with ProcessPoolExecutor(width, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
                futures = {i: pool.submit(compile_variant, vs[i]) for i in batch}
                for i, future in futures.items():
                    try:
                        results[i] = future.result()
                    except BrokenProcessPool:
                        crashed.append(i)
        todo = crashed
    for i in todo:
        results[i] = {"error": "Triton's compiler crashed (the process aborted; run the variant alone to see why)"}
    return [results[i] for i in range(len(vs))]


def report(vs: list[Variant], results: list[dict]) -> str:
    import triton

    from ..._info import __version__

    lines = [f"# Triton AOT compile of fastcl's kernels: fastcl {__version__}, triton {triton.__version__}, "
             f"torch {torch.__version__}",
             "# regenerate: python -m fastcl.backend.triton.aot --out <this file> (checked by "
             "tests/test_triton_aot.py)",
             "# config: S tiles BLOCK_A x BLOCK_B x num_warps x num_stages x BLOCK_D; GEMMs BLOCK_M x BLOCK_K x "
             "num_warps x num_stages x BLOCK_N;",
             "#   topk BLOCK_A x BLOCK_B x num_warps x num_stages x BLOCK_D x K_PAD; maxsim BLOCK_A x BLOCK_T x "
             "BLOCK_D x num_warps",
             "#   -ragged: the variant a last column block whose end is not a multiple of 16 compiles",
             "# regs, stack frame and local memory from cuobjdump -res-usage; smem is what a launch requests",
             f"# shared memory limits (bytes per block): {SHARED_MEMORY_LIMIT}", "",
             f"{'arch':<6}{'kernel':<24}{'dtype':<10}{'config':<24}{'regs':>5}{'stack':>7}{'local':>7}"
             f"{'smem':>8}  status"]
    for v, r in sorted(zip(vs, results), key=lambda p: p[0]):
        numbers = ("-",) * 4 if "error" in r or "unsupported" in r else (r["regs"], r["stack"], r["local"], r["smem"])
        lines.append(f"sm_{v.arch:<3}{v.kernel:<24}{v.dtype:<10}{v.label:<24}{numbers[0]:>5}{numbers[1]:>7}"
                     f"{numbers[2]:>7}{numbers[3]:>8}  {status(v, r)}")
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
