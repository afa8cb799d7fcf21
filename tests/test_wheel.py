"""`python -m build` makes a CPU wheel that installs into a fresh virtual environment, imports
with its compiled kernels, and passes the backend tests there (not the source tree's build)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL_TESTS = ["tests/test_backends.py", "tests/test_determinism.py", "tests/test_build.py"]


def _run(*cmd, cwd=None):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_wheel_installs_into_a_fresh_venv_and_passes_the_backend_tests(tmp_path):
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp_path / "dist", ROOT)
    wheel = next((tmp_path / "dist").glob("fastcl-*.whl"))
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    torch_pin = next(line for line in (ROOT / "requirements" / "dev.txt").read_text().splitlines()
                     if line.startswith("torch=="))
    _run(python, "-m", "pip", "install", "-q", torch_pin, "pytest", "hypothesis", wheel)
    info = _run(python, "-c", "import fastcl, json; print(json.dumps(fastcl.info()))", cwd=tmp_path)
    assert '"auto": "cpu"' in info and str(venv) in _run(python, "-c", "import fastcl; print(fastcl.__file__)",
                                                        cwd=tmp_path)
    _run(python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *WHEEL_TESTS, cwd=ROOT)
