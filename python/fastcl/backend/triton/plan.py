"""How the triton engine cuts a problem: feature padding, tile and feature blocks, the blocks of S
that bound its workspace, and the configurations its kernels may run with.

Pure Python (no Triton import), so that the performance model (``fastcl.benchmark.model``) and the
ahead-of-time compile check (``aot.py``) derive their numbers from the parameters the launchers use.
See DESIGN.md beside this file for why the engine is cut this way.

Workspace (``FASTCL_WORKSPACE_MB``, default 256 MiB) bounds what the engine allocates beyond its
O((M + N) * D) inputs and outputs. S is processed in blocks of ``R x C`` pairs (edges multiples
of 128, near-square, the whole matrix when it fits):
- backward (and SigLIP/MW with gradients): one block of the gradient tile G,
  ``R * C * g_bytes <= budget`` (G in bfloat16 for bfloat16 inputs, float32 for float32 and
  float16, float64 for float64), but at least one 128 x 128 block;
- forward: the per-tile log-sum-exp partials of one block, ``(R * ceil(C / BLOCK_B) +
  ceil(R / BLOCK_A) * C) * acc_bytes <= budget``;
- ``lse_prefixes`` (K nested prefixes): K slots of each, ``K * R * C * g_bytes`` plus K slots of
  partials in the backward, K slots of partials in the forward; ``pointwise_prefixes`` (Matryoshka
  SigLIP / MW) likewise, its loss partials beside them.
Peak extra memory of a forward+backward is therefore about
``budget + (M + N) * D_pad * acc_bytes + O(M + N)`` (``D_pad``: D rounded up to 16).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

WORKSPACE_ENV = "FASTCL_WORKSPACE_MB"
DEFAULT_WORKSPACE_MB = 256
QUANTUM = 128  # block edges are multiples of this, so every tile size divides them
FEATURE_QUANTUM = 16  # features are padded to a multiple of this: 16-byte aligned rows, exact K blocks


def workspace_budget() -> int:
    """Bytes from ``FASTCL_WORKSPACE_MB`` (MiB, may be fractional), read at every call."""
    raw = os.environ.get(WORKSPACE_ENV, "").strip()
    if not raw:
        return DEFAULT_WORKSPACE_MB << 20
    try:
        mib = float(raw)
    except ValueError:
        raise ValueError(f"{WORKSPACE_ENV} must be a number of MiB, got {raw!r}") from None
    if not mib > 0 or math.isinf(mib):
        raise ValueError(f"{WORKSPACE_ENV} must be a positive number of MiB, got {raw!r}")
    return int(mib * (1 << 20))


def padded_features(d: int) -> int:
    return -(-d // FEATURE_QUANTUM) * FEATURE_QUANTUM


def _largest_block(d_pad: int, largest: int) -> int:
    """The largest power of two <= ``largest`` (and >= 16) dividing ``d_pad``: no partial feature block."""
    block = largest
    while block > FEATURE_QUANTUM and d_pad % block:
        block //= 2
    return block


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def g_dtype(dtype: torch.dtype) -> torch.dtype:
    """The gradient tile's storage type. G of a mean loss is about 1 / (M N): bfloat16 has float32's
    range, float16 does not (its G stays float32, multiplied as TF32 with the widened features)."""
    return {torch.bfloat16: torch.bfloat16, torch.float64: torch.float64}.get(dtype, torch.float32)


class TileConfig(NamedTuple):
    """An S-tile kernel's launch: BLOCK_A x BLOCK_B pairs per program."""
    block_a: int
    block_b: int
    num_warps: int
    num_stages: int


class GemmConfig(NamedTuple):
    """A gradient GEMM's launch: BLOCK_M output rows x BLOCK_K reduction per step (BLOCK_N is set by D)."""
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int


def _kind(dtype: torch.dtype) -> str:
    return {torch.float64: "float64", torch.float32: "float32"}.get(dtype, "16-bit")


# Every configuration below compiles for sm_80 and sm_90 within each architecture's shared memory
# and, under the newest Triton of the supported range, without register spills; the first of each
# list, what a launch takes with FASTCL_TRITON_AUTOTUNE=0, without spills for sm_90 under every
# supported Triton (tests/test_triton_aot.py; bench/results/*-triton-aot-*.txt). S-tile kernels by
# family ("lse": the forward and the gradient tile; "pointwise": SigLIP / MW, whose loss and
# sigmoid tiles need more registers), then by input dtype; GEMMs by input dtype (float16 multiplies
# a float32 G with widened features).
TILE_CONFIGS = {
    # 16-bit: 128 x 64 with 4 warps first: 144 (forward) and 205 (gradient) registers x 128 threads
    # leave room for 3 and 2 CTAs per SM on sm_90 (Triton 3.9), so one tile's exp2 epilogue overlaps
    # another's wgmma; 128 x 128 with 8 warps took 170 and 227 x 256: one CTA per SM, the epilogue
    # exposed (benchmark/compiled.py: 0.49 and 0.73 of peak against tensor-bound).
    "lse": {"16-bit": [TileConfig(128, 64, 4, 3), TileConfig(128, 128, 8, 3)],
            "float32": [TileConfig(64, 64, 4, 3), TileConfig(128, 64, 8, 3)],
            "float64": [TileConfig(64, 64, 4, 2)]},
    # lse_prefixes' forward and gradient tiles (prefixes.py): the prefix dot products P stay live
    # through each segment's statistics, inside a run-time loop over the K prefixes. 128 x 64 tiles
    # took 236-255 registers x 256 threads for the 16-bit gradient (Triton 3.9, sm_90) and spilled in
    # the ragged variant; 64 x 64 with 8 warps takes 161 (209 ragged). float32 (3xTF32) at 64 x 64
    # spilled on sm_80 (32 x 64 with 4 warps on sm_90), float64's forward at 32 x 64 too; float32's
    # forward at 32 x 64 x 8 warps with 3 stages spilled 8-16 B at a 16-feature block (D <= 16), with
    # 2 stages it takes 140-180 registers at 16 and 32 features, sm_80 and sm_90.
    "prefixes": {"16-bit": [TileConfig(64, 64, 8, 3)],
                 "float32": [TileConfig(32, 64, 8, 2)],
                 "float64": [TileConfig(32, 32, 4, 2)]},
    # pointwise_prefixes' tile (prefixes.py): P, the SigLIP / MW loss and sigmoid tiles and the keys'
    # masks in the same K loop.
    "prefix_pointwise": {"16-bit": [TileConfig(64, 64, 8, 3)],
                         "float32": [TileConfig(32, 64, 8, 3)],
                         "float64": [TileConfig(32, 32, 8, 2)]},
    "pointwise": {"16-bit": [TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3)],
                  "float32": [TileConfig(64, 64, 4, 3), TileConfig(128, 64, 8, 3)],
                  "float64": [TileConfig(32, 64, 4, 2)]},
}
GEMM_CONFIGS = {
    torch.bfloat16: [GemmConfig(128, 32, 8, 3), GemmConfig(64, 64, 4, 3)],
    torch.float16: [GemmConfig(128, 32, 8, 3), GemmConfig(64, 64, 4, 3)],  # 64x64 spills under Triton 3.4
    torch.float32: [GemmConfig(128, 32, 8, 3), GemmConfig(64, 16, 4, 3)],
    torch.float64: [GemmConfig(64, 16, 4, 2)],
}
FAMILIES = tuple(TILE_CONFIGS)
# Feature block of the S tiles' reduction and the GEMMs' output columns, largest first.
FEATURE_BLOCK = {"16-bit": 64, "float32": 32, "float64": 16}
GEMM_BLOCK_N = {"16-bit": 128, "float32": 64, "float64": 32}
# The interpreter runs every program in Python (each nested @triton.jit call costs milliseconds of
# patching): one configuration, large tiles, few programs.
INTERPRETER_TILE = TileConfig(256, 256, 1, 1)
INTERPRETER_GEMM = GemmConfig(256, 128, 1, 1)
INTERPRETER_BLOCK = 128


def tile_configs(dtype: torch.dtype, interpret: bool, family: str = "lse") -> list[TileConfig]:
    return [INTERPRETER_TILE] if interpret else TILE_CONFIGS[family][_kind(dtype)]


def gemm_configs(dtype: torch.dtype, interpret: bool) -> list[GemmConfig]:
    return [INTERPRETER_GEMM] if interpret else GEMM_CONFIGS[dtype]


def feature_block(d_pad: int, dtype: torch.dtype, interpret: bool) -> int:
    """BLOCK_D: the reduction step of an S tile."""
    return _largest_block(d_pad, INTERPRETER_BLOCK if interpret else FEATURE_BLOCK[_kind(dtype)])


def gemm_block_n(d_pad: int, dtype: torch.dtype, interpret: bool) -> int:
    """BLOCK_N: the feature columns of one gradient-GEMM program."""
    return _largest_block(d_pad, INTERPRETER_BLOCK if interpret else GEMM_BLOCK_N[_kind(dtype)])


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tile_smem(cfg: TileConfig, block_d: int, dtype: torch.dtype) -> int:
    """Shared memory of an S-tile kernel's operand pipeline (what pruning compares with the device)."""
    return cfg.num_stages * (cfg.block_a + cfg.block_b) * block_d * _element_bytes(dtype)


def gemm_smem(cfg: GemmConfig, block_n: int, dtype: torch.dtype) -> int:
    return cfg.num_stages * (cfg.block_m * _element_bytes(g_dtype(dtype)) + block_n * _element_bytes(dtype)) \
        * cfg.block_k


def blocks(m: int, n: int, elements: int, quantum: int = QUANTUM) -> tuple[int, int]:
    """(R, C): a block of S with about ``elements`` pairs at most (never below quantum x quantum),
    edges multiples of ``quantum``, square unless a whole side fits: square blocks minimise the
    read-modify-write traffic of the accumulated gradients (M N D (1 / C + 1 / R) elements)."""
    m, n = max(m, 1), max(n, 1)
    elements = max(elements, quantum * quantum)
    if m * n <= elements:
        return m, n
    side = max(quantum, math.isqrt(elements) // quantum * quantum)
    if n <= side:
        return min(m, max(quantum, elements // n // quantum * quantum)), n
    if m <= side:
        return m, min(n, max(quantum, elements // m // quantum * quantum))
    return side, side


def _quantum(dtype: torch.dtype, interpret: bool) -> int:
    """Block edges: multiples of every tile edge, so that only the matrix's own ends cut tiles."""
    return max([QUANTUM] + [max(c.block_a, c.block_b) for f in FAMILIES for c in tile_configs(dtype, interpret, f)])


def smallest_tile_edge(dtype: torch.dtype, interpret: bool, families=("lse", "pointwise")) -> int:
    """The shortest tile edge of the families' configurations: what sizes their per-tile partials."""
    return min(min(c.block_a, c.block_b) for f in families for c in tile_configs(dtype, interpret, f))


def forward_blocks(m: int, n: int, dtype: torch.dtype, interpret: bool, budget: int) -> tuple[int, int]:
    """The forward's block: its row partials ([R, C / BLOCK_B]) and column partials
    ([R / BLOCK_A, C]) in the math dtype fit the budget for every configuration."""
    per_pair = 2 * _element_bytes(acc_dtype(dtype)) / smallest_tile_edge(dtype, interpret)
    return blocks(m, n, int(budget / per_pair), _quantum(dtype, interpret))


def prefix_forward_blocks(m: int, n: int, k: int, dtype: torch.dtype, interpret: bool,
                          budget: int) -> tuple[int, int]:
    """``lse_prefixes``' forward block: K slots of the forward's partials fit the budget."""
    per_pair = 2 * k * _element_bytes(acc_dtype(dtype)) / smallest_tile_edge(dtype, interpret, ("prefixes",))
    return blocks(m, n, int(budget / per_pair), _quantum(dtype, interpret))


def prefix_gradient_blocks(m: int, n: int, k: int, dtype: torch.dtype, interpret: bool,
                           budget: int) -> tuple[int, int]:
    """``lse_prefixes``' backward block: K slots of H (``[K, R, C]`` in ``g_dtype``) and of the
    per-tile row and column sums of G * S (math dtype) fit the budget."""
    per_pair = k * (_element_bytes(g_dtype(dtype)) + 2 * _element_bytes(acc_dtype(dtype))
                    / smallest_tile_edge(dtype, interpret, ("prefixes",)))
    return blocks(m, n, int(budget / per_pair), _quantum(dtype, interpret))


def prefix_pointwise_blocks(m: int, n: int, k: int, dtype: torch.dtype, interpret: bool, budget: int,
                            grads: bool) -> tuple[int, int]:
    """``pointwise_prefixes``' block: K slots of the per-tile loss sums; with gradients also K slots of
    H (``g_dtype``), of the row and column sums of D * T and one of the row sums of D (math dtype)."""
    per_tile = k + (2 * k + 1 if grads else 0)  # partials per pair, over the shortest tile edge
    per_pair = (k * _element_bytes(g_dtype(dtype)) if grads else 0) \
        + per_tile * _element_bytes(acc_dtype(dtype)) / smallest_tile_edge(dtype, interpret, ("prefix_pointwise",))
    return blocks(m, n, int(budget / per_pair), _quantum(dtype, interpret))


def gradient_blocks(m: int, n: int, dtype: torch.dtype, interpret: bool, budget: int) -> tuple[int, int]:
    """The backward's block: one G block of R x C in ``g_dtype`` fits the budget."""
    return blocks(m, n, budget // _element_bytes(g_dtype(dtype)), _quantum(dtype, interpret))


def prefix_features(dims, block_d: int) -> int:
    """Features an ``lse_prefixes`` S tile multiplies over (``prefixes._grow``), segment
    ``[d_{k-1}, d_k)`` by segment: the whole feature blocks inside each segment, and of a block a
    boundary cuts the chunks of FEATURE_QUANTUM features that overlap the segment (the chunk holding a
    boundary that is not a multiple of FEATURE_QUANTUM is multiplied once per side). d_K when every
    boundary is a multiple of FEATURE_QUANTUM (and d_K of BLOCK_D)."""
    q = FEATURE_QUANTUM

    def chunks(d0, lo, hi):
        start, end = max(lo, d0) // q * q, min(hi, d0 + block_d)
        return max(0, -(-(end - start) // q)) * q

    total = 0
    for lo, hi in zip([0, *dims[:-1]], dims):
        first, last = lo // block_d, hi // block_d
        if first * block_d < lo:
            total += chunks(first * block_d, lo, hi)
            first += 1
        total += max(0, last - first) * block_d
        if last * block_d < hi and last >= first:
            total += chunks(last * block_d, lo, hi)
    return total


def ranges(total: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(s + step, total)) for s in range(0, total, step)]
