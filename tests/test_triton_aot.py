"""fastcl's Triton kernels compiled ahead of time for sm_80 and sm_90, no GPU needed, under the
installed Triton (tools/check_triton.sh reruns this file under the oldest Triton of the supported
range and the GPU machine's).

Every kernel (engine, top-k, MaxSim), input dtype and configuration a launch can pick (plan.py's
lists after tiles.py's pruning rule; the launch constants of topk.py and maxsim.py) must build or be
declared unsupported for this Triton (``versions.triton_limits``, which the launchers refuse with
the same reason), spill no register unless ``aot.known_spill`` says why, and fit the architecture's
shared memory; the committed report (``python -m fastcl.backend.triton.aot``) must cover exactly those
variants. Compiling them takes about two minutes on two cores.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "bench" / "results" / "2026-12-04-triton-aot-sm80-sm90.txt"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed"),
    pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET is set: Triton interprets instead of compiling"),
]


@pytest.fixture(scope="module")
def compiled():
    from fastcl.backend.triton import aot

    variants = aot.variants((80, 90))
    return variants, aot.compile_all(variants)


def test_every_variant_builds_without_spills_within_shared_memory(compiled):
    from fastcl.backend.triton import aot

    variants, results = compiled
    bad = [f"sm_{v.arch} {v.kernel} {v.dtype} {v.label}: {'; '.join(aot.problems(v, r))}"
           for v, r in zip(variants, results) if aot.problems(v, r)]
    assert not bad, "\n".join(bad)
    # Every kernel family, dtype and architecture is covered.
    assert {(v.arch, v.kernel, v.dtype) for v in variants} == {
        (a, k, d) for a in (80, 90) for k in aot.KERNELS for d in ("float32", "float16", "bfloat16", "float64")
        if k not in aot.MAXSIM or d in ("float32", "float64")}


def test_only_declared_variants_are_unsupported_and_never_the_training_dtypes(compiled):
    """What this Triton cannot build is declared, with the reason the launchers give; every kernel
    builds in the training dtypes (bfloat16, float16, float32) under every Triton of the range."""
    from fastcl.backend.triton import aot

    variants, results = compiled
    for v, r in zip(variants, results):
        assert ("unsupported" in r) == (aot.unsupported(v) is not None), (v, r)
        if "unsupported" in r:
            assert v.dtype == "float64", (v, r)


def test_the_gpu_tests_launch_variants_build_without_spills_in_the_training_dtypes(compiled):
    """What the GPU tests and the benchmark launch on sm_90 with autotuning off, at narrow and wide D:
    no spill in bfloat16, float16 and float32 under every Triton of the range (float64, the
    exactness check, may spill a few bytes under an older one)."""
    from fastcl.backend.triton import aot

    variants, results = compiled
    by_variant = dict(zip(variants, results))
    for v in aot.launch_variants([1, 24, 128, 1024], arch=90):
        r = by_variant.get(v) or aot.compile_variant(v)
        assert "error" not in r, (v, r)
        if "unsupported" in r or v.dtype == "float64":
            continue
        assert r["stack"] == 0 and r["local"] == 0, (v, r)


def test_committed_report_covers_exactly_the_launchable_variants():
    from fastcl.backend.triton import aot

    text = REPORT.read_text()
    rows = aot.table_rows(text)
    want = {(f"sm_{v.arch}", v.kernel, v.dtype, v.label) for v in aot.variants((80, 90))}
    assert set(rows) == want, ("the report is stale: regenerate it with "
                               f"`python -m fastcl.backend.triton.aot --out {REPORT.relative_to(ROOT)}`")
    assert all(" ok" in line or "unsupported here" in line for line in text.splitlines() if line.startswith("sm_"))


def test_launch_variants_are_few():
    """What a run compiles with autotuning off: run-time flags keep it to one variant per kernel,
    dtype and feature block, and one more for a ragged last column block of the kernels that
    specialise its end (gpu_check.sh's compile budget rests on this)."""
    from fastcl.backend.triton import aot

    one_width = aot.launch_variants([1024])
    # 6 S-tile kernels + 4 GEMMs (2 layouts, full width or a window), all but the two forwards ragged; 4 dtypes
    assert len(one_width) == (10 + 8) * 4
    assert {v.kernel for v in one_width if v.ragged} == {"lse_gradient", "pointwise", "prefix_gradient",
                                                          "prefix_pointwise", *aot.GEMMS}
    assert len(aot.launch_variants([128, 256, 512, 1024, 2048, 4096])) == len(one_width)


def test_a_compiler_crash_is_pinned_to_its_variant(monkeypatch):
    """Triton can abort the process on an internal assertion (Triton 3.6 on a float64 MaxSim
    scatter did): the other variants still report, the crashing one says so."""
    from fastcl.backend.triton import aot

    vs = aot.launch_variants([128], arch=90, dtypes=[__import__("torch").float32])[:2]
    crash = vs[0]._replace(kernel="crash")
    monkeypatch.setenv("FASTCL_AOT_TEST_CRASH", "crash")
    results = aot.compile_all([crash, vs[1]], jobs=2)
    assert "crashed" in results[0]["error"], results[0]
    assert "regs" in results[1], results[1]
