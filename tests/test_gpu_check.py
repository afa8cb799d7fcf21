"""bench/gpu_check.sh, the one call a bare GPU machine gets: its dry run (what CI can check of it
without a GPU), what it leaves in $OUT when it finishes and when it is stopped halfway, its phase
limits against the call's 8 minutes, and the bench's rows written as they finish."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sessions import INTERPRETED

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
HAS_TRITON = importlib.util.find_spec("triton") is not None
MAX_FILES = 8  # what comes back from $OUT on the GPU machine
WALL_S = 480


def _files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file()]


def _limits() -> dict[str, int]:
    text = SCRIPT.read_text()
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"^([A-Z]+)_S=\$\{\1_S:-(\d+)\}$", text, re.M)}
    limits["TOTAL"] = int(re.search(r"^TOTAL_S=(\d+)$", text, re.M).group(1))
    return limits


def _session_pids(sid: int) -> list[int]:
    """Processes of a session (the script and everything it started, whatever their process group:
    `timeout` puts each phase in a group of its own)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def _kill_session(sid: int) -> None:
    for pid in _session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(path: Path, marker: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and marker in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{marker!r} not in {path} after {timeout} s:\n"
                         + (path.read_text()[-3000:] if path.exists() else "(no file)"))


def test_phase_limits_fit_one_call():
    """The run's wall time is bounded by its limits (the build runs beside the triton phase), and
    those stay within 8 minutes: a 10-minute call, with a machine start, leaves room for a rerun."""
    lim = _limits()
    assert set(lim) >= {"ENV", "BUILD", "TRITON", "INFO", "SMOKE", "BENCH", "MATRIX"}, lim
    wall = lim["ENV"] + max(lim["BUILD"], lim["TRITON"]) + sum(lim[k] for k in ("INFO", "SMOKE", "BENCH", "MATRIX"))
    assert lim["TOTAL"] == WALL_S and wall <= WALL_S, (wall, lim)


def test_limits_over_the_call_are_refused(tmp_path):
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OUT": str(tmp_path), "MATRIX_S": "400"})
    assert out.returncode == 2 and "over the 480 s" in out.stderr, out.stdout + out.stderr


@pytest.mark.skipif(INTERPRETED, reason="the dry run compiles: not under the interpreter")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_dry_run_estimates_every_phase_and_leaves_its_files(tmp_path):
    """The dry run compiles every variant the GPU tests and the bench launch, estimates each phase
    beside its limit, and leaves its log and JSON in $OUT. On a bare GPU image the GPU test files
    must collect without the optional test dependencies."""
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--sha", "0123abc"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OUT": str(tmp_path)})
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "gpu_check --dry-run: ok" in out.stdout
    files = _files(tmp_path)
    assert {p.name for p in files} == {"gpu_check.log", "info.json", "plan.json"}, files
    assert len(files) <= MAX_FILES
    log = (tmp_path / "gpu_check.log").read_text()
    assert "gpu_check --dry-run: ok" in log and log.strip().endswith(out.stdout.strip().splitlines()[-1])
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["git_sha"] == "0123abc" and json.loads((tmp_path / "info.json").read_text())["git_sha"] == "0123abc"
    assert plan["compile"]["failed"] == 0 and plan["compile"]["variants"] > 0
    assert 1024 in plan["compile"]["dims"], "the bench's width is compiled too"
    assert plan["tests"]["smoke"] == 12 and plan["tests"]["triton"] > 0 and plan["tests"]["matrix"] > 0
    phases = plan["estimate"]["phases"]
    assert set(phases) == {"env", "build", "triton", "info", "smoke", "bench", "matrix"}
    for name, p in phases.items():
        assert 0 < p["estimate_s"] <= p["limit_s"], (name, p)
        assert re.search(rf"^  {name}\s+\d+ s of\s+{p['limit_s']} s  ok", log, re.M), name


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_run_stopped_after_its_first_phase_keeps_that_phase(tmp_path, how):
    """A run stopped halfway (here: its second phase hangs, and the run is stopped once the first has
    ended) leaves the first phase's results in $OUT: its log lines and info.json. SIGTERM lets the
    script print its phases' summary; SIGKILL (everything at once) leaves what was written."""
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_HANG": "collect"}
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        log = tmp_path / "gpu_check.log"
        _wait_for(log, "=== gpu_check collect: start", 90)
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 143
            _wait_for(log, "STOPPED by a signal", 10)
        else:
            _kill_session(proc.pid)
            proc.wait(timeout=30)
    finally:
        _kill_session(proc.pid)
    text = log.read_text()
    assert "=== gpu_check env: ok" in text and "GPU: " in text, text
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["python"] and "triton" in info
    assert not (tmp_path / "plan.json").exists()
    assert len(_files(tmp_path)) <= MAX_FILES


HELPERS = ROOT / "bench" / "gpu_check.py"


def test_summary_names_the_failures_and_ends_with_the_phases(tmp_path):
    """The summary, printed last, carries each junit file's counts and first failures (short), then
    each phase's status: what must fit in the output's last 12,000 characters."""
    suite = ET.Element("testsuite", name="pytest", tests="9", failures="7", errors="0", skipped="1", time="12.5")
    for i in range(8):
        case = ET.SubElement(suite, "testcase", classname="tests.test_triton", name=f"test_x[{i}]")
        if i < 7:
            ET.SubElement(case, "failure", message="AssertionError: " + "long " * 100)
    root = ET.Element("testsuites")  # what pytest --junitxml writes
    root.append(suite)
    ET.ElementTree(root).write(tmp_path / "junit-triton.xml")
    phases = ["env      ok    2 s of 20 s", "triton   FAILED (exit 1)   90 s of 200 s"]
    out = subprocess.run([sys.executable, str(HELPERS), "summary", str(tmp_path), *phases],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "junit-triton.xml: 9 tests, 1 passed, 7 failed, 0 errors, 1 skipped, 12 s" in out.stdout
    assert sum("FAILURE test_triton::test_x[" in line for line in lines) == 5
    assert "2 more in junit-triton.xml" in out.stdout
    assert lines[-2:] == [f"gpu_check: {p}" for p in phases]
    assert max(len(line) for line in lines) < 250


def _gpu_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_rows_are_written_as_they_finish(tmp_path, monkeypatch):
    """bench.json holds every finished row while the next one runs: a bench stopped by its limit
    still brings back what it measured. Rows name the commit given in FASTCL_GIT_SHA."""
    from fastcl.benchmark import harness

    gpu = _gpu_module()
    path = tmp_path / "bench.json"
    seen = []

    def measure(spec, rep_ms):
        seen.append(len(json.loads(path.read_text())) if path.exists() else 0)
        return {"status": "ok", "first_call_s": 0.1, "median_ms": 2.0, "peak_extra_mib": 1.0}

    monkeypatch.setenv("FASTCL_GIT_SHA", "feedbeef+dirty")
    monkeypatch.setattr(gpu, "measure", measure)
    monkeypatch.setattr(gpu, "unavailable", lambda impl, dtype: None)
    cpu_env = harness.environment("cpu")
    monkeypatch.setattr(harness, "environment", lambda device: {**cpu_env, "gpu": "NVIDIA H200"})
    args = gpu.parse_args(["--sizes", "64x32", "--losses", "clip,siglip", "--impls", "triton,naive"])
    rows = gpu.run(args, on_row=lambda rows: harness.write_json(rows, path))
    assert seen == [0, 1, 2, 3, 4]
    assert json.loads(path.read_text()) == rows and len(rows) == 5
    assert {r["git_sha"] for r in rows} == {"feedbeef"} and all(r["git_dirty"] for r in rows)
    triton = next(r for r in rows if r["impl"] == "triton" and r["loss"] == "clip")
    assert triton["model_ms"] > 0 and triton["model_ws_mib"] > 0


def test_bench_estimate_needs_no_gpu(capsys):
    gpu = _gpu_module()
    assert gpu.main(["--sizes", "32768x1024", "--impls", "triton,cuda,naive", "--estimate"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["rows"] == 7 and got["dtype"] == "bfloat16"
    assert {(r["loss"], r["impl"]) for r in got["per_row"]} >= {("gemm", "floor"), ("clip", "naive")}
    assert 0 < got["seconds"] < 120
