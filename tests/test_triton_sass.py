"""What the Triton engine's 16-bit kernels execute, read from their SASS (sm_80 and sm_90, compiled
ahead of time, no GPU needed), as a launch compiles them for blocks whose bounds are multiples of 16
(every block but a ragged last column block, ``aot.Variant.ragged``):

- the gradient GEMMs' main loop moves G and the features with 16-byte copies only: no scalar
  global load staged through registers into scalar shared stores (16 LDG.E.U16 + 16 STS.U16 per
  thread and k-step in bfloat16 when G's row stride was not known to be a multiple of 16), but
  the transposing copies Hopper's TF32 MMA needs (``KNOWN_NARROW``);
- the gradient tiles store G with 16-byte stores (not 64 scalar STG.E.U16 per thread).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fastcl.benchmark import sass

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes"),
                       reason="TRITON_INTERPRET is set: Triton interprets instead of compiling"),
]

ARCHS = (80, 90)
DTYPES = (torch.bfloat16, torch.float16)  # float16 keeps G in float32 (plan.g_dtype)
GEMMS = ("gemm", "gemm_transposed")
TILES = ("lse_gradient", "pointwise")
# Scalar stores a gradient tile makes besides G: pointwise's per-row sums of the loss and of D.
OTHER_STORES = {"lse_gradient": 0, "pointwise": 2}
STAGING = {"LDG", "LDGSTS", "STS"}  # how operands reach shared memory
# Hopper's warpgroup MMA reads TF32 operands (float16 runs: float32 G, widened features) from shared
# memory K-major only (PTX: wgmma's transpose flags exist for 16-bit types alone): the features,
# N-major in memory, are widened in registers and stored transposed element by element, and G.T,
# M-major, is copied transposed element by element. bfloat16 operands may lie either way round.
KNOWN_NARROW = {(90, "float16", "gemm"): {"STS": 16}, (90, "float16", "gemm_transposed"): {"STS": 16, "LDGSTS.E": 16}}


@pytest.fixture(scope="module")
def code():
    """(variant, instructions) of the first configuration of each kernel (what a launch takes with
    autotuning off) at a wide D, per architecture and dtype."""
    from fastcl.backend.triton import aot

    variants = [v for arch in ARCHS for v in aot.launch_variants([1024], arch=arch, dtypes=DTYPES)
                if v.kernel in GEMMS + TILES and not v.ragged]
    return [(v, *sass.disassemble(aot.cubin(v)).values()) for v in variants]


def _name(v) -> str:
    return f"sm_{v.arch} {v.kernel} {v.dtype} {v.label}"


def test_gemm_main_loops_stage_operands_in_16_byte_vectors(code):
    bad = {}
    for v, instrs in code:
        if v.kernel not in GEMMS:
            continue
        loops = sass.summary(instrs)
        assert loops and all(c.tensor for c in loops), _name(v)
        narrow = {op: n for c in loops for op, n in c.memory().items()
                  if op.split(".")[0] in STAGING and sass.access_bytes(op) < 16}
        if narrow != KNOWN_NARROW.get((v.arch, v.dtype, v.kernel), {}):
            bad[_name(v)] = narrow
    assert not bad, "narrow copies per main-loop iteration (per thread):\n" + "\n".join(
        f"  {name}: {counts}" for name, counts in bad.items())


def test_gradient_tiles_store_g_in_16_byte_vectors(code):
    from fastcl.backend.triton import plan

    bad = {}
    for v, instrs in code:
        if v.kernel not in TILES:
            continue
        block_a, block_b, warps = v.config[:3]
        g_bytes = torch.empty((), dtype=plan.g_dtype(getattr(torch, v.dtype))).element_size()
        per_thread = block_a * block_b * g_bytes // (32 * warps)
        stores = {op: n for op, n in sass.count(instrs).memory().items() if op.startswith("STG")}
        wide = sum(16 * n for op, n in stores.items() if sass.access_bytes(op) == 16)
        narrow = sum(n for op, n in stores.items() if sass.access_bytes(op) < 16)
        if wide != per_thread or narrow > OTHER_STORES[v.kernel]:
            bad[_name(v)] = f"{stores} (G: {per_thread} B per thread)"
    assert not bad, "global stores per thread:\n" + "\n".join(f"  {name}: {s}" for name, s in bad.items())
