"""The CUDA kernels (csrc/cuda/*.cu) compile for sm_80 and sm_90a with no warning at all.

Runs on CPU-only machines: only nvcc is needed (device code is torch-free). Every file is compiled
once for both targets, all files in parallel; host-compiler, nvcc and ptxas warnings (register
spills and local-memory use included) are errors.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "cuda"
SOURCES = sorted(KERNELS.glob("*.cu"))
TARGETS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]
FLAGS = [
    "-std=c++17", "-O3", "-lineinfo",
    "-Werror", "all-warnings",
    "-Xcompiler", "-Wall,-Wextra,-Werror",
    "-Xptxas", "-warn-spills,-warn-lmem-usage,--warning-as-error",
]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(default) if default.exists() else None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (not on PATH, nor $CUDA_HOME/bin, nor "
                                                     "/usr/local/cuda/bin): the CUDA kernels cannot be compiled here")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """nvcc's result per source file, compiled in parallel."""
    out_dir = tmp_path_factory.mktemp("cuda_objects")

    def compile_one(src: Path):
        cmd = [NVCC, *FLAGS, *TARGETS, "-c", str(src), "-o", str(out_dir / (src.stem + ".o"))]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=KERNELS)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip(SOURCES, pool.map(compile_one, SOURCES)))


def test_kernel_sources_exist():
    assert SOURCES, f"no .cu files under {KERNELS}"


@needs_nvcc
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_compiles_for_sm80_and_sm90a_without_warnings(src: Path, compiled):
    result = compiled[src]
    log = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"nvcc failed on {src.name}:\n{log}"
    assert not re.search(r"warning", log, re.IGNORECASE), f"nvcc warned on {src.name}:\n{log}"


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.cu*")) + sorted(KERNELS.glob("*.h")), ids=lambda p: p.name)
def test_device_code_is_torch_free_and_small(path: Path):
    """The CPU torch wheel ships no CUDA torch: device code must build from the CUDA toolkit alone."""
    text = path.read_text()
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)', text, re.MULTILINE)
    assert not [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10")], f"{path.name} includes torch"
    assert len(text.splitlines()) < 500, f"{path.name} has {len(text.splitlines())} lines"


def test_host_glue_needs_no_cuda_build_of_torch():
    """csrc/cuda/ compiles against a CPU torch (the CUDA-enabled wheel is built that way): it may use
    ATen and c10's device-generic headers, never torch's CUDA-only ones (c10/cuda, ATen/cuda)."""
    for path in sorted(p for p in (ROOT / "csrc" / "cuda").rglob("*") if p.is_file()):
        includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)', path.read_text(), re.MULTILINE)
        cuda_only = [i for i in includes if re.match(r"(c10|ATen|torch/csrc)/cuda/", i)]
        assert not cuda_only, f"{path.name} includes {cuda_only}"
