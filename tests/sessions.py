"""What several test files run in a fresh Python process: peak-memory probes (glibc keeps freed
heap, so numbers taken inside the test session would carry earlier tests' pages) and the child
pytest that reruns a file's Triton cases under the interpreter."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INTERPRETED = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")

# Appended to a probe's source, which defines ``step()`` (after its own warm-up: lazy initialisation
# is not the work's memory) returning the bytes of what it keeps that should not count (outputs,
# gradients). fastcl.benchmark.harness measures the bench the same way.
_MEASURE = """
from fastcl.benchmark.harness import peak_extra_bytes as _peak_extra_bytes
_kept = []
print(_peak_extra_bytes(lambda: _kept.append(step())) - _kept[0])
"""


def start_probe(source: str, *argv, env: dict | None = None) -> subprocess.Popen:
    """Start measuring ``source``'s ``step()`` in a fresh process (``argv`` in ``sys.argv[1:]``)."""
    code = textwrap.dedent(source) + _MEASURE
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=None if env is None else {**os.environ, **env})


def probe_result(proc: subprocess.Popen) -> int:
    """The peak extra bytes a started probe measured."""
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return int(out.strip())


def peak_extra_bytes(source: str, *argv, env: dict | None = None) -> int:
    return probe_result(start_probe(source, *argv, env=env))


def interpreter_session(test_file: str, *select: str, timeout_s: int = 900) -> None:
    """Rerun ``test_file`` (with pytest's ``select`` options) in a child pytest with
    TRITON_INTERPRET=1, which Triton reads when the kernels are decorated: at import."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *select, test_file]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                         timeout=timeout_s)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and " failed" not in out.stdout


def skip_unless_triton_runs(dtype, target: str = "cpu", kernel: str = "engine") -> None:
    """Skip, naming the declared limit, where the installed Triton cannot run ``kernel`` in ``dtype``
    (fastcl/backend/triton/versions.py: float64 dots need Triton >= 3.5); ``target`` "cpu" is the interpreter."""
    import pytest

    from fastcl.backend.triton.versions import triton_limits

    why = triton_limits(kernel, dtype, compiled=target != "cpu")
    if why:
        pytest.skip(why)
