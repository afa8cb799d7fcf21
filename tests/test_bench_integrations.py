"""bench/integrations.py end to end at a tiny size, in this process (its cases run here instead of in
fresh processes): every case measures, the rows land in the JSON, the table shows the issue's ratios."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers")

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # its `import harness`
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    had_harness = "harness" in sys.modules
    spec = importlib.util.spec_from_file_location("bench_integrations", BENCH / "integrations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module.harness, "run_isolated",
                        lambda target, spec, timeout=None: {"status": "ok", **module.case(spec),
                                                            "other_cpu_frac": 0.0})
    yield module
    if not had_harness:
        sys.modules.pop("harness", None)


def test_tiny_run_writes_rows_and_ratios(bench, tmp_path):
    out = tmp_path / "integrations.json"
    bench.main(["--batch", "16", "--mini-batch", "8", "--seq-len", "8", "--repeat", "1", "--colpali-b", "4",
                "--colpali-lq", "4", "--colpali-ld", "16", "--colpali-d", "8", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["study"], r["impl"]) for r in rows] == [*(("st", i) for i in bench.ST_IMPLS),
                                                       *(("colpali", i) for i in bench.COLPALI_IMPLS)]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and r["peak_extra_bytes"] is not None and math.isfinite(r["loss"])
        assert r["sentence_transformers"] and "git_sha" in r and "loadavg" in r
    colpali = {r["impl"]: r["loss"] for r in rows if r["study"] == "colpali"}
    assert colpali["fastcl ColbertLoss"] == pytest.approx(colpali["colpali (torch)"], rel=1e-5)
    table = out.with_suffix(".txt").read_text()
    for text in ("fastcl cached / st plain", "fastcl cached / st cached", "Matryoshka overhead fastcl",
                 "fastcl / colpali: peak memory", *bench.ST_IMPLS, *bench.COLPALI_IMPLS):
        assert text in table
    # in one process the heap is already grown, so peak memory may read 0 here (n/a ratios); times do not
    assert re.search(r"fastcl cached / st plain \d+\.\d\dx .* fastcl cached / st cached \d+\.\d\dx", table)
    assert re.search(r"Matryoshka overhead fastcl [+-]\d+\.\d%.*sentence-transformers [+-]\d+\.\d%", table)


def test_paired_rounds_give_side_by_side_ratios(bench, tmp_path):
    out = tmp_path / "paired.json"
    bench.main(["--studies", "st", "--batch", "16", "--mini-batch", "8", "--seq-len", "8", "--repeat", "1",
                "--paired", "2", "--out", str(out)])
    rows = json.loads(out.read_text())
    (paired,) = [r for r in rows if r["study"] == "st-paired"]
    assert paired["status"] == "ok" and set(paired["times_s"]) == set(bench.ST_IMPLS)
    assert all(len(t) == 2 and min(t) > 0 for t in paired["times_s"].values())
    t = paired["times_s"]
    want = sorted(a / b for a, b in zip(t["fastcl cached"], t["st plain"]))
    assert bench.paired_ratio(t, "fastcl cached", "st plain") == pytest.approx(sum(want) / 2)  # median of two
    table = out.with_suffix(".txt").read_text()
    assert "interleaved (2 rounds" in table and "Matryoshka overhead fastcl" in table
    faster = sum(a < b for a, b in zip(t["fastcl cached"], t["st cached"]))
    assert f"fastcl faster in {faster} of 2 rounds" in table
    assert bench.faster_rounds({"a": [1.0, 3.0, 2.0], "b": [2.0, 2.0, 2.0]}, "a", "b") == "1 of 3 rounds"


def test_only_paired_with_a_subset(bench, tmp_path):
    out = tmp_path / "subset.json"
    bench.main(["--studies", "st", "--batch", "16", "--mini-batch", "8", "--seq-len", "8", "--paired", "2",
                "--only-paired", "--paired-impls", "fastcl cached,fastcl matryoshka", "--out", str(out)])
    (row,) = json.loads(out.read_text())  # no separate cases
    assert row["study"] == "st-paired" and set(row["times_s"]) == {"fastcl cached", "fastcl matryoshka"}
    table = out.with_suffix(".txt").read_text()
    assert "Matryoshka overhead fastcl" in table and "fastcl cached / st plain n/a" in table
