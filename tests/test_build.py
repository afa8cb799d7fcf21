"""The compiled extension, fastcl.info() and the backend dispatch."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastcl
from fastcl import backend as dispatch

ROOT = Path(__file__).resolve().parent.parent


def test_extension_is_built_and_reports_features():
    from fastcl import _C

    info = _C.build_info()
    assert info["version"] == fastcl.__version__
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda_archs"], str)
    # The CUDA toolkit of the kernels (fastcl doctor compares it with the driver); none without them.
    assert bool(info["cuda_version"]) == bool(info["cuda_archs"])
    # How the CUDA kernels' gradient GEMMs take 16-bit G blocks (csrc/cuda/gemm_path.h): at::mm with
    # out_dtype from torch 2.8 on, widened to float32 before; none without CUDA kernels.
    if not info["cuda_archs"]:
        assert info["cuda_gemm"] == ""
    else:
        newer = tuple(int(v) for v in info["torch_version"].split(".")[:2]) >= (2, 8)
        assert info["cuda_gemm"] == ("out_dtype" if newer else "widened")
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


@pytest.mark.parametrize("name", [n for n in dispatch.names() if n not in fastcl.backends("cpu")])
def test_unavailable_backend_raises_with_reasons(name):
    x = torch.randn(3, 2)
    with pytest.raises(fastcl.BackendUnavailableError, match=f"backend='{name}'.*Available here"):
        fastcl.clip_loss(x, x, 1.0, backend=name)


def test_unknown_backend_is_a_value_error():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastcl.clip_loss(x, x, 1.0, backend="fast")


def test_ci_runs_the_readme_test_command():
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    test_command = next(line for line in readme.splitlines() if line.endswith("python -m pytest -q"))
    assert test_command in (root / ".ci" / "run").read_text()


def _torch_facts():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "cmake" / "torch_facts.py"
    spec = importlib.util.spec_from_file_location("torch_facts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_takes_torch_paths_that_cpp_extension_would():
    from torch.utils import cpp_extension

    facts = _torch_facts().facts()
    ours, theirs = [str(p) for p in facts["include_dirs"]], cpp_extension.include_paths()
    # torch < 2.5 also lists the legacy TH/THC header directories, which fastcl never includes.
    assert theirs[:len(ours)] == ours and all(Path(p).name in ("TH", "THC") for p in theirs[len(ours):])
    assert [str(facts["library_dir"])] == cpp_extension.library_paths()
    assert facts["cxx11_abi"] == int(torch._C._GLIBCXX_USE_CXX11_ABI)


@pytest.mark.parametrize(("guard", "standard"), [("201703L", 17), ("202002L", 20), (None, 17)])
def test_cxx_standard_follows_the_guard_in_torch_headers(tmp_path, guard, standard):
    (tmp_path / "ATen").mkdir()
    check = f"#if !defined(_MSC_VER) && __cplusplus < {guard}\n#error too old\n#endif\n" if guard else ""
    (tmp_path / "ATen" / "ATen.h").write_text("#pragma once\n" + check + "#include <ATen/Context.h>\n")
    assert _torch_facts().cxx_standard(tmp_path) == standard


@pytest.mark.parametrize(("version", "minor"), [("2.13.0+cpu", (2, 13)), ("2.14.1", (2, 14)),
                                                ("2.15.0a0+git1234", (2, 15)), ("3.0.0.dev20270101", (3, 0))])
def test_torch_minor_version_is_read_from_any_version_string(version, minor):
    assert _torch_facts().minor_version(version) == minor


def test_installed_package_pins_the_torch_minor_it_was_built_against():
    import importlib.metadata

    major, minor = torch.__version__.split(".")[:2]
    assert f"torch=={major}.{minor}.*" in importlib.metadata.requires("fastcl")
    assert fastcl.info()["extension"]["torch_version"].split(".")[:2] == [major, minor]


def _torch_cuda_check(tmp_path, torch_cuda: str, nvcc_cuda: str) -> str:
    """What cmake/torch_cuda_check.cmake says at configure time for these versions (its stderr)."""
    script = tmp_path / "check.cmake"
    script.write_text(f'include("{ROOT / "cmake" / "torch_cuda_check.cmake"}")\n'
                      f'fastcl_check_torch_cuda("{torch_cuda}" "{nvcc_cuda}" "/opt/cuda-{nvcc_cuda}/bin/nvcc")\n')
    run = subprocess.run([CMAKE, "-P", str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stderr


CMAKE = shutil.which("cmake")


@pytest.mark.skipif(CMAKE is None, reason="cmake not on PATH")
def test_configure_warns_when_torch_and_nvcc_cuda_majors_differ(tmp_path):
    said = " ".join(_torch_cuda_check(tmp_path, "12.8", "13.0.88").split())  # CMake wraps long lines
    assert "CMake Warning" in said
    assert "torch is built for CUDA 12.8, but the CUDA kernels are compiled by nvcc 13.0.88" in said
    assert "/opt/cuda-13.0.88/bin/nvcc" in said and "nvcc of CUDA 12.x" in said


@pytest.mark.skipif(CMAKE is None, reason="cmake not on PATH")
@pytest.mark.parametrize(("torch_cuda", "nvcc_cuda"), [("", "13.0.88"), ("13.0", "13.2.1"), ("12.4", "12.9.86")])
def test_configure_is_quiet_for_a_cpu_torch_or_the_same_cuda_major(tmp_path, torch_cuda, nvcc_cuda):
    assert _torch_cuda_check(tmp_path, torch_cuda, nvcc_cuda) == ""
