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


# --- the G GEMM path (csrc/cuda/gemm_path.h), decided by the preprocessor from torch's version ------

CXX = shutil.which(os.environ.get("CXX", "g++"))
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH")


def _gemm_path(include_dirs, *defines) -> dict[str, str]:
    """FASTCL_MM_OUT_DTYPE and FASTCL_CUDA_GEMM as the preprocessor sets them, with torch's version
    read the way ops_cuda.cpp and module.cpp read it."""
    snippet = '#include <torch/version.h>\n#include "gemm_path.h"\n'
    cmd = [CXX, "-E", "-dM", "-x", "c++", *defines, f"-I{KERNELS}", *(f"-I{d}" for d in include_dirs), "-"]
    run = subprocess.run(cmd, input=snippet, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    found = dict(re.findall(r"^#define (FASTCL_MM_OUT_DTYPE|FASTCL_CUDA_GEMM) (.*)$", run.stdout, re.M))
    return {"out_dtype": found["FASTCL_MM_OUT_DTYPE"], "name": found["FASTCL_CUDA_GEMM"].strip('"')}


@needs_cxx
def test_gemm_path_of_the_installed_torch():
    import torch
    from torch.utils.cpp_extension import include_paths

    newer = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8)
    assert _gemm_path(include_paths()) == ({"out_dtype": "1", "name": "out_dtype"} if newer
                                           else {"out_dtype": "0", "name": "widened"})
    # the host execution runs the glue on CPU tensors, where ATen has no mm with out_dtype
    assert _gemm_path(include_paths(), "-DFASTCL_HOST_EXEC") == {"out_dtype": "0", "name": "widened"}


def _torch_headers(root: Path, major: int, minor: int) -> Path:
    """A torch include tree as torch <= 2.9 lays it out: torch/version.h defines the version itself,
    and there is no torch/headeronly/version.h (torch 2.10 moved the definitions there)."""
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "version.h").write_text(
        f"#pragma once\n#define TORCH_VERSION_MAJOR {major}\n#define TORCH_VERSION_MINOR {minor}\n"
        f'#define TORCH_VERSION_PATCH 0\n#define TORCH_VERSION "{major}.{minor}.0"\n')
    return root


@needs_cxx
@pytest.mark.parametrize(("version", "path"), [((2, 4), "widened"), ((2, 7), "widened"), ((2, 8), "out_dtype"),
                                               ((2, 9), "out_dtype"), ((3, 0), "out_dtype")])
def test_gemm_path_without_headeronly_version_header(tmp_path, version, path):
    """torch 2.8 and 2.9 have at::mm(..., out_dtype) but no <torch/headeronly/version.h>: out_dtype all
    the same (reading the version through that header alone widened there)."""
    assert _gemm_path([_torch_headers(tmp_path, *version)])["name"] == path


@needs_cxx
def test_gemm_path_refuses_to_guess_without_the_torch_version():
    run = subprocess.run([CXX, "-E", "-x", "c++", f"-I{KERNELS}", "-"], input='#include "gemm_path.h"\n',
                         capture_output=True, text=True)
    assert run.returncode != 0 and "include <torch/version.h> before gemm_path.h" in run.stderr


def test_the_glue_and_the_build_report_read_one_gemm_path():
    """ops_cuda.cpp and module.cpp take the choice from gemm_path.h, torch's version from <torch/version.h>."""
    for path, header in ((KERNELS / "ops_cuda.cpp", "gemm_path.h"), (ROOT / "csrc" / "module.cpp", "cuda/gemm_path.h")):
        includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)', path.read_text(), re.MULTILINE)
        assert "torch/version.h" in includes and header in includes, path.name
        assert includes.index("torch/version.h") < includes.index(header), path.name
    for glue in ("ops_cuda.cpp", "ops_cuda_prefixes.inc"):  # the second: the prefix ops' glue, which it includes
        assert "TORCH_VERSION_M" not in (KERNELS / glue).read_text(), glue  # no second copy of the rule
    assert '#include "ops_cuda_prefixes.inc"' in (KERNELS / "ops_cuda.cpp").read_text()
