"""The compiled extension, fastcl.info() and the backend dispatch."""
import subprocess
import sys

import pytest
import torch

import fastcl
from fastcl import backend as dispatch


def test_extension_is_built_and_reports_features():
    from fastcl import _C

    info = _C.build_info()
    assert info["version"] == fastcl.__version__
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda_archs"], str)
    assert isinstance(info["openmp"], bool)


def test_info_lists_backends_and_auto_choice():
    info = fastcl.info()
    assert "error" not in info["extension"]
    cpu = info["devices"]["cpu"]
    assert {"reference", "chunked"} <= set(cpu["backends"])
    assert cpu["auto"] in cpu["backends"] and cpu["auto"] != "reference"


def test_command_line_prints_info():
    out = subprocess.run([sys.executable, "-m", "fastcl", "info"], capture_output=True, text=True, check=True)
    assert "auto: " in out.stdout and "torch_version" in out.stdout


def test_backends_always_include_portable_ones():
    assert fastcl.backends()[:2] == ["reference", "chunked"]
    assert fastcl.backends("meta")[:2] == ["reference", "chunked"]


def test_auto_never_picks_reference():
    x = torch.randn(4, 3)
    assert dispatch.resolve("auto", x) == dispatch.auto_choice("cpu")
    assert dispatch.resolve("auto", x) != "reference"


@pytest.mark.parametrize("name", [n for n in dispatch.NAMES if n not in fastcl.backends("cpu")])
def test_unavailable_backend_raises_with_reasons(name):
    x = torch.randn(3, 2)
    with pytest.raises(fastcl.BackendUnavailableError, match=f"backend='{name}'.*Available here"):
        fastcl.clip_loss(x, x, 1.0, backend=name)


def test_unknown_backend_is_a_value_error():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastcl.clip_loss(x, x, 1.0, backend="fast")


def test_ci_runs_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    test_command = next(line for line in readme.splitlines() if line.endswith("python -m pytest -q"))
    assert test_command in (root / ".ci" / "run").read_text()
