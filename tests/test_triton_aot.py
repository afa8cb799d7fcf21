"""The Triton kernels compiled ahead of time for sm_80 and sm_90, no GPU needed (issue 10, finding 3:
float32 kernels spilled, float64's forward asked for 196,608 B of shared memory where an A100 allows
166,912, the autotune-off configuration of the gradient kernel spilled).

Every kernel, input dtype and configuration a launch can pick (plan.py's lists after tiles.py's
pruning rule) must build, spill no register and fit the architecture's shared memory; the committed
report (``bench/results/2026-12-01-triton-aot-sm80-sm90.txt``, ``python -m fastcl.triton.aot``)
must cover exactly those variants. Compiling them takes about a minute on two cores.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "bench" / "results" / "2026-12-01-triton-aot-sm80-sm90.txt"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed"),
    pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET is set: Triton interprets instead of compiling"),
]


def test_every_launchable_variant_builds_without_spills_within_shared_memory():
    from fastcl.triton import aot

    variants = aot.variants((80, 90))
    results = aot.compile_all(variants)
    bad = [f"sm_{v.arch} {v.kernel} {v.dtype} {v.label}: {'; '.join(aot.problems(v, r))}"
           for v, r in zip(variants, results) if aot.problems(v, r)]
    assert not bad, "\n".join(bad)
    # Every kernel family, dtype and architecture is covered.
    assert {(v.arch, v.kernel, v.dtype) for v in variants} == {
        (a, k, d) for a in (80, 90) for k in ("lse_forward", "lse_gradient", "pointwise", "gemm", "gemm_transposed")
        for d in ("float32", "float16", "bfloat16", "float64")}


def test_committed_report_covers_exactly_the_launchable_variants():
    from fastcl.triton import aot

    text = REPORT.read_text()
    rows = aot.table_rows(text)
    want = {(f"sm_{v.arch}", v.kernel, v.dtype, v.label) for v in aot.variants((80, 90))}
    assert set(rows) == want, ("the report is stale: regenerate it with "
                               f"`python -m fastcl.triton.aot --out {REPORT.relative_to(ROOT)}`")
    assert all(line.rstrip().endswith(" ok") for line in text.splitlines() if line.startswith("sm_"))


def test_launch_variants_are_few():
    """What a run compiles with autotuning off: run-time flags keep it to one variant per kernel,
    dtype and feature block (gpu_check.sh's compile budget rests on this)."""
    from fastcl.triton import aot

    one_width = aot.launch_variants([1024])
    assert len(one_width) == 5 * 4  # 3 S-tile kernels + 2 GEMM layouts, 4 dtypes
    assert len(aot.launch_variants([128, 256, 512, 1024, 2048, 4096])) == len(one_width)
