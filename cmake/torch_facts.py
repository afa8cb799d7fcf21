"""What building fastcl needs to know about the installed torch, found by importing it.

fastcl never calls ``find_package(Torch)``: with a CUDA wheel of torch, its CMake config runs the
CUDA discovery chain (full toolkit, nvrtc, GPU-architecture detection that needs a GPU) even for a
CPU-only extension, and it pins nothing we need. The include and library directories here are the
ones ``torch.utils.cpp_extension.include_paths()`` / ``library_paths()`` give for CPU extensions
(tests/test_build.py checks that), computed without importing cpp_extension, which needs setuptools.

Two users, one set of facts:

- ``CMakeLists.txt`` runs this file as a script; it prints CMake ``set()`` lines.
- scikit-build-core loads it as the dynamic-metadata provider of ``dependencies``
  (``[[tool.dynamic-metadata]]`` in pyproject.toml): the package pins torch to the minor version
  it was compiled against, because libtorch's C++ ABI changes between minor releases and an
  extension built for one minor fails to load (undefined symbols) under another.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

# The oldest torch fastcl declares and CI builds against (.ci/run, tools/check_torch.sh):
# torch.library.custom_op / register_fake / register_autograd, which the engine's operators use,
# appeared in 2.4.
MIN_TORCH = (2, 4)
# libtorch's libraries an extension that registers operators and defines a Python module links.
LIBRARIES = ("c10", "torch", "torch_cpu", "torch_python")
# What the package needs at run time besides the torch it was built against.
OTHER_DEPENDENCIES = ["numpy"]


def _torch():
    try:
        import torch
    except ImportError as err:  # the message CMake and pip show
        raise SystemExit(
            "fastcl builds against the torch installed in this environment, and none is importable "
            f"({err}). Install torch first (the README's quickstart shows how), then build with "
            "`pip install --no-build-isolation .`"
        ) from err
    return torch


def minor_version(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as '2.14.1+cu130' or '2.15.0a0+git1234'."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if not found:
        raise ValueError(f"cannot read a version from torch.__version__ = {version!r}")
    return int(found.group(1)), int(found.group(2))


def cxx_standard(include_dir: Path) -> int:
    """The C++ standard torch's own headers demand (ATen.h refuses anything older with #error):
    17 up to torch 2.13, 20 from 2.14. Read from the guard itself, so no version table to keep."""
    text = (include_dir / "ATen" / "ATen.h").read_text()
    guards = [int(v) for v in re.findall(r"__cplusplus\s*<\s*(\d{6})L", text)]
    return {201703: 17, 202002: 20, 202302: 23}.get(max(guards, default=201703), 17)


def facts() -> dict[str, object]:
    torch = _torch()
    root = Path(torch.__file__).resolve().parent
    include = root / "include"
    version = torch.__version__
    if minor_version(version) < MIN_TORCH:
        raise SystemExit(f"fastcl needs torch >= {'.'.join(map(str, MIN_TORCH))}; this environment has {version}")
    lib = root / "lib"
    libraries = []
    for name in LIBRARIES:
        path = lib / f"lib{name}.so"
        if not path.exists():
            raise SystemExit(f"torch {version} at {root} has no {path.name}: a broken or unusual install")
        libraries.append(path)
    return {
        "version": version.split("+")[0],
        "include_dirs": [include, include / "torch" / "csrc" / "api" / "include"],
        "library_dir": lib,
        "libraries": libraries,
        "cxx_standard": cxx_standard(include),
        "cxx11_abi": int(bool(torch._C._GLIBCXX_USE_CXX11_ABI)),
        "cuda": torch.version.cuda or "",
    }


def cmake_script() -> str:
    def value(v) -> str:
        items = v if isinstance(v, list) else [v]
        return '"' + ";".join(str(i) for i in items) + '"'

    return "".join(f"set(FASTCL_TORCH_{key.upper()} {value(v)})\n" for key, v in facts().items())


def pinned_requirement() -> str:
    """'torch==2.13.*': the minor version this build is compiled against, any patch release and
    any local build label (+cpu, +cu130) of it."""
    major, minor = minor_version(_torch().__version__)
    return f"torch=={major}.{minor}.*"


def dynamic_metadata(settings, project) -> dict[str, list[str]]:
    """scikit-build-core's dynamic-metadata hook (``[[tool.dynamic-metadata]]``, field dependencies)."""
    return {"dependencies": [pinned_requirement(), *OTHER_DEPENDENCIES]}


def dynamic_wheel(settings) -> dict[str, bool]:
    """The pin is the torch of the machine that builds the wheel: an sdist marks it Dynamic."""
    return {"dependencies": True}


if __name__ == "__main__":
    sys.stdout.write(cmake_script())
