"""ruff (configured in pyproject.toml) is clean on everything we ship or run."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    paths = [p for p in ("python", "tests", "bench", "examples", "cmake") if (ROOT / p).exists()]
    out = subprocess.run(["ruff", "check", *paths], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_package_is_typed():
    assert (ROOT / "python" / "fastcl" / "py.typed").exists()
