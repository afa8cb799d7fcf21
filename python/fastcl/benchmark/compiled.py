"""The static half of the performance model: what each hot kernel's compiled code allows.

For a kernel of the ``triton`` or ``cuda`` engine, its cubin is built in this process (Triton's
ahead-of-time compiler, ``backend/triton/aot.py``; nvcc on ``csrc/cuda``), disassembled
(``benchmark/sass.py``), and one iteration of its main loop counted: tensor-core instructions and
their flops, shared-memory bytes, issue slots. Against the multiprocessor's documented rates
(``RATES``, each with its source) the slowest resource bounds the loop:

    loop efficiency = tensor time / max(tensor time, shared-memory time, issue time)

per unit of work, whatever the number of resident warps (all three scale with it). Occupancy
(registers, shared memory, threads per CTA -> CTAs per SM, from the cubin and the launch) gives the
wave quantisation of a launch; fewer than two warps per scheduler is reported as a latency risk,
not modelled. The kernel's efficiency against the card's dense tensor peak is then

    (instruction rate / peak) x loop efficiency

where the instruction rate is that of the instruction the loop issues: mma.sync (HMMA) runs at about
2/3 of Hopper's peak, which only wgmma (HGMMA) reaches. ``benchmark/model.py`` divides each kernel's
flops by ``peak x efficiency`` instead of an assumed constant; library GEMMs (cuBLAS through ATen)
keep the measured constant.

What this cannot see: latency (dependent instruction chains, memory latency with few warps), L2
and HBM behaviour inside the loop, bank conflicts (assumed none: the layouts were designed for it),
the work outside the main loop (the model adds the exponentials and HBM traffic separately).
Predictions, not measurements.
"""
from __future__ import annotations

import functools
import math
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Per multiprocessor and clock. Dense tensor peaks follow from the datasheets' TFLOP/s, SM counts and
# boost clocks (A100: 312 TFLOP/s bf16, 108 SMs, 1.41 GHz -> 2048; H100/H200 SXM: 989 TFLOP/s,
# 132 SMs, 1.83 GHz -> 4096, reached by wgmma only).
RATES = {
    80: {
        "tensor16": 2048,  # HMMA.16816 f16/bf16 -> f32 (NVIDIA A100 whitepaper, table 1)
        "tf32": 1024,      # HMMA.1688 tf32 (A100 whitepaper)
        "fp64": 128,       # DMMA (A100 whitepaper: 19.5 TFLOP/s)
        "mma_sync": 1.0,   # share of the 16-bit peak mma.sync reaches: all of it on Ampere
        "shared_bytes": 128,  # 32 banks x 4 bytes (CUDA C++ Programming Guide, "Shared Memory")
        "issue": 4,        # 4 schedulers, one warp instruction each (A100 whitepaper, "SM architecture")
        "registers": 65536, "shared_limit": 167936, "threads": 2048, "ctas": 32,  # Programming Guide, table
    },
    90: {
        "tensor16": 4096,  # HGMMA (wgmma) f16/bf16 (NVIDIA H100 whitepaper, table 2)
        "tf32": 2048,
        "fp64": 256,       # DMMA / FP64 tensor (H100 whitepaper: 67 TFLOP/s)
        # mma.sync on Hopper reaches about 2/3 of the peak (Shah et al., FlashAttention-3, 2024, sec. 1)
        "mma_sync": 2 / 3,
        "shared_bytes": 128,
        "issue": 4,
        "registers": 65536, "shared_limit": 233472, "threads": 2048, "ctas": 32,
    },
}
ARCH_OF_DEVICE = {"a100": 80, "h100": 90, "h200": 90}


@dataclass
class Loop:
    """One kernel's main loop on one architecture; times in clocks of one SM per warp of work."""
    kernel: str
    arch: int
    instructions: int     # per iteration (one warp's)
    tensor: int
    tensor_flops: float
    shared_bytes: float
    outside: int          # instructions outside the main loop (the prologue and epilogue of a tile)
    registers: int
    ctas_per_sm: int
    bound: str            # the main loop's: "tensor", "shared memory" or "issue"
    peak_share: float     # the rate of the loop's tensor instruction / the card's peak for its type
    t_tensor: float
    t_bound: float
    t_outside: float
    source: str           # what was compiled
    hazards: tuple = ()   # what the bound does not model but the code shows (latency exposed, scalar accesses)
    function: str = ""    # the (mangled) name of the kernel analysed in the cubin

    def efficiency(self, iterations: float) -> float:
        """Of the card's dense tensor peak, for tiles of ``iterations`` main-loop steps: the loop at its
        bound, plus the tile's prologue and epilogue at the issue rate where no second CTA on the SM
        can overlap them (one CTA per SM)."""
        if self.t_bound == 0:
            return 0.0
        serial = self.t_outside if self.ctas_per_sm < 2 else 0.0
        return self.peak_share * iterations * self.t_tensor / (iterations * self.t_bound + serial)

    def as_dict(self) -> dict:
        return asdict(self)


def tensor_flops(opcode: str) -> float:
    """Flops of one warp's tensor instruction: HMMA.16816 -> m16 n8 k16; HGMMA.64x128x16 (a
    warpgroup's, a quarter per warp); DMMA.884."""
    parts = opcode.split(".")
    base, shape = parts[0], parts[1] if len(parts) > 1 else ""
    if base == "HGMMA":
        m, n, k = (int(v) for v in shape.split("x"))
        return 2 * m * n * k / 4
    digits = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "8816": (8, 8, 16), "16832": (16, 8, 32)}
    if shape not in digits:
        raise ValueError(f"unknown tensor instruction shape {opcode}")
    m, n, k = digits[shape]
    return 2 * m * n * k


def shared_bytes(ins) -> int:
    """Shared-memory bytes one warp instruction moves (an LDSM .x4 reads 4 8x8 16-bit matrices)."""
    if ins.base == "LDSM":
        count = {"1": 1, "2": 2, "4": 4}.get(ins.opcode.split(".")[-1], 1)
        return 128 * count
    if ins.base in ("LDS", "STS", "LDGSTS"):
        return 32 * ins.bytes
    return 0


def occupancy(arch: int, threads: int, registers: int, smem: int) -> int:
    """CTAs per SM: registers (allocated per warp in 256-register units), shared memory, threads."""
    r = RATES[arch]
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = r["registers"] // (per_warp * warps)
    by_smem = r["shared_limit"] // max(smem, 1) if smem else r["ctas"]
    return max(0, min(by_regs, by_smem, r["threads"] // threads, r["ctas"]))


def analyse(name: str, arch: int, cubin: bytes, threads: int, smem: int, source: str, function: str = "") -> Loop:
    """The bound of the main loop of the cubin's kernel whose (mangled) name matches the regular
    expression ``function`` (``re.search``; "" takes the first kernel, for one-kernel cubins; any other
    pattern must match exactly one, the name is in the Loop's ``function``)."""
    from ..backend.triton.aot import resources
    from . import sass

    functions = sass.disassemble(cubin)
    chosen = [fn for fn in functions if re.search(function, fn)]
    if not chosen or (function and len(chosen) > 1):
        raise ValueError(f"{name}: {len(chosen)} kernels of {source} match {function!r}: {sorted(functions)}")
    fn = chosen[0]
    instrs = functions[fn]
    loops = sass.main_loops(instrs)
    if not loops:
        raise ValueError(f"{name}: no loop in the SASS")
    body = [i for i in max(loops, key=lambda lp: len(lp.body)).body if not i.never]
    rates = RATES[arch]
    tensor = [i for i in body if i.base in sass.TENSOR]
    flops = sum(tensor_flops(i.opcode) for i in tensor)
    smem_bytes = sum(shared_bytes(i) for i in body)
    wgmma = any(i.base == "HGMMA" for i in tensor)
    kind = "fp64" if any(i.base == "DMMA" for i in tensor) else \
        "tf32" if any("TF32" in i.opcode for i in tensor) else "tensor16"
    peak_share = 1.0 if wgmma else rates["mma_sync"]
    times = {"tensor": flops / (rates[kind] * peak_share) if flops else 0.0,
             "shared memory": smem_bytes / rates["shared_bytes"], "issue": len(body) / rates["issue"]}
    bound = max(times, key=times.get)
    outside = sum(1 for i in instrs if not i.never) - len(body)
    used = resources(cubin, fn if function else None)  # a named kernel's own; else the cubin's largest
    regs = used["regs"]
    ctas = occupancy(arch, threads, regs, smem + used["shared"])  # smem: the launch's dynamic shared memory
    return Loop(name, arch, len(body), len(tensor), flops, smem_bytes, outside, regs, ctas, bound, peak_share,
                times["tensor"], times[bound], outside / rates["issue"], source,
                hazards(body, ctas * math.ceil(threads / 32) / 4), fn)


def hazards(body, warps_per_scheduler: float) -> tuple[str, ...]:
    """What in a main loop costs time the throughput bound does not count."""
    out = []
    waits = [i for i in body if i.base == "WARPGROUP" and "DEPBAR" in i.opcode and i.operands.rstrip().endswith("0x0")]
    if waits:
        out.append("waits for its own wgmma every iteration (WARPGROUP.DEPBAR ... 0x0): their latency is exposed")
    scalar = sorted({i.opcode for i in body if i.base in ("LDG", "STG", "STS", "LDS") and i.bytes in (1, 2)})
    if scalar:
        out.append(f"scalar 8/16-bit accesses in the main loop ({', '.join(scalar)})")
    if warps_per_scheduler < 2:
        out.append(f"{warps_per_scheduler:g} warps per scheduler: little to hide latency with")
    return tuple(out)


# --- the kernels of each engine ---------------------------------------------------------------------

def source_tree() -> Path | None:
    """csrc/cuda of the checkout fastcl runs from (the package's own tree when it is not installed),
    else of the current directory (an installed fastcl run from its checkout), else None."""
    for root in (Path(__file__).resolve().parents[3], Path.cwd()):
        if (root / "csrc" / "cuda" / "kernels.h").is_file():
            return root / "csrc" / "cuda"
    return None

_CUDA_FILES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def nvcc() -> str | None:
    return shutil.which("nvcc") or next((str(p) for p in [Path("/usr/local/cuda/bin/nvcc")] if p.exists()), None)


@functools.cache
def cuda_cubin(kernel: str, dtype: torch.dtype, arch: int) -> tuple[bytes, str]:
    """(cubin, what built it) of ``csrc/cuda/<kernel>_<type>.cu`` for sm_80 or sm_90a (``arch`` 90):
    nvcc -cubin of the source tree."""
    compiler, csrc = nvcc(), source_tree()
    if compiler is None or csrc is None:
        raise FileNotFoundError("nvcc and a checkout's csrc/cuda (run from the repository) are needed to read the "
                                "CUDA kernels' code")
    src = csrc / f"{kernel}_{_CUDA_FILES[dtype]}.cu"
    target = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "k.cubin"
        subprocess.run([compiler, "-std=c++17", "-O3", "-cubin", f"-arch={target}", "-o", str(out), str(src)],
                       check=True, capture_output=True, cwd=csrc)
        return out.read_bytes(), f"nvcc {target} {src.name}"


# The CUDA kernels the model reads: name -> (the unit csrc/cuda/<unit>_<type>.cu, the regular expression
# of its __global__ function's mangled name). pair_grad's and prefixes' units hold the three gradient
# kinds (GradKind: kLse 0, kSigLip 1, kMW 2; one main loop, different epilogues)
CUDA_FUNCTIONS = {
    "lse_forward": ("lse_forward", r"lse_forward_kernel"),
    "pair_grad": ("pair_grad", r"pair_grad_kernel.*GradKindE0E"),
    # op lse_prefixes' forward (prefixes.cuh) and its gradient tile (prefix_grad.cuh, kLse); op
    # pointwise_prefixes' one tile kernel (kSigLip)
    "prefix_forward": ("prefixes", r"lse_prefixes_forward_kernel"),
    "prefix_grad": ("prefixes", r"prefix_grad_kernel.*GradKindE0E"),
    "prefix_grad_siglip": ("prefixes", r"prefix_grad_kernel.*GradKindE1E"),
}


@functools.cache
def cuda_loop(kernel: str, dtype: torch.dtype, arch: int, prefixes: int = 1) -> Loop:
    """``kernel`` one of ``CUDA_FUNCTIONS``, launched as its launcher does (threads per CTA and dynamic shared
    memory: the tile stages; prefix_forward's grows by 3 KiB a prefix, ``prefixes`` per launch)."""
    from ..backend.cuda import plan as cp

    unit, function = CUDA_FUNCTIONS[kernel]
    cubin, source = cuda_cubin(unit, dtype, arch)
    smem = cp.prefix_forward_smem_bytes(dtype, prefixes) if kernel == "prefix_forward" else cp.smem_bytes(dtype)
    loop = analyse(f"cuda {kernel} {dtype}", arch, cubin, cp.threads(dtype), smem, source, function=function)
    loop.source = f"{source} {loop.function}"
    return loop


@functools.cache
def triton_loop(kernel: str, dtype: torch.dtype, d: int, arch: int) -> Loop:
    """An engine kernel (``aot.FAMILY``'s S-tile kernels: "lse_forward", "lse_gradient", "pointwise",
    "prefix_forward", "prefix_gradient", "prefix_pointwise"; ``aot.GEMMS``: "gemm", "gemm_transposed",
    "gemm_window", "gemm_window_transposed") as a launch with autotuning off compiles it for the hot path
    (aot.launch_variants; not a ragged twin)."""
    import triton

    from ..backend.triton import aot

    variant = next(v for v in aot.launch_variants([d], arch, (dtype,)) if v.kernel == kernel and not v.ragged)
    compiled = aot._compile(variant)
    return analyse(f"triton {kernel} {dtype}", arch, compiled.asm["cubin"], 32 * compiled.metadata.num_warps,
                   compiled.metadata.shared, f"triton {triton.__version__} sm_{arch} {kernel} {variant.label}")
