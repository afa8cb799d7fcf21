"""The release wheel (tools/build_wheel.sh: python -m build, auditwheel repair) is a manylinux wheel
that pins torch's minor version, carries sm_80 and sm_90a cubins when nvcc is here (built against
this CPU torch), installs into a fresh virtual environment, imports with its compiled kernels and
passes the backend tests there (not the source tree's build)."""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WHEEL_TESTS = ["tests/test_backends.py", "tests/test_determinism.py", "tests/test_build.py"]
ARCHS = "80;90a" if shutil.which("nvcc") else ""
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _run(*cmd, cwd=None, env=None):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _install_this_torch(python):
    """The exact torch of this environment (e.g. 2.13.0+cpu) from pip's configured sources, else
    from PyTorch's CPU index, where +cpu builds live."""
    spec = f"torch=={torch.__version__}"
    first = subprocess.run([python, "-m", "pip", "install", "-q", spec], capture_output=True, text=True)
    if first.returncode != 0:
        _run(python, "-m", "pip", "install", "-q", spec, "--extra-index-url", CPU_INDEX)


def test_release_wheel_installs_into_a_fresh_venv_and_passes_the_backend_tests(tmp_path):
    env = {**os.environ, "FASTCL_CUDA_ARCHS": ARCHS}
    wheel = Path(_run("bash", ROOT / "tools" / "build_wheel.sh", tmp_path / "dist", env=env).splitlines()[-1])
    assert re.search(r"-manylinux_2_\d+_x86_64\.whl$", wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    major, minor = torch.__version__.split(".")[:2]
    assert f"Requires-Dist: torch=={major}.{minor}.*" in metadata.splitlines()
    vendored = [n for n in names if re.search(r"lib(torch|c10|gomp|cudart)", n)]
    assert not vendored, f"libraries torch provides were copied into the wheel: {vendored}"

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    _install_this_torch(python)
    _run(python, "-m", "pip", "install", "-q", "pytest", "hypothesis", wheel)
    probe = "import fastcl, json; print(json.dumps([fastcl.__file__, fastcl.info()]))"
    info = _run(python, "-c", probe, cwd=tmp_path)
    assert str(venv) in info and '"auto": "cpu"' in info
    assert f'"cuda_archs": "{ARCHS.replace(";", ",")}"' in info
    _run(python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *WHEEL_TESTS, cwd=ROOT)
