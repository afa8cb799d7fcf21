"""Build and load the host execution of the CUDA kernels (``csrc/cuda/host``; csrc/cuda/DESIGN.md,
"Executed on the CPU") from a source tree: the device code compiled unchanged by the host compiler,
instrumented so that every shared and global access reaches the checkers.

``load()`` builds the tree this file sits in; ``load(mutations=...)`` builds a copy with text
replaced (the planted bugs of tests/test_cuda_host.py). Objects are cached under
``$FASTCL_CUDA_HOST_CACHE`` (default ``~/.cache/fastcl/cuda-host``) by a hash of the flags and of
every file each one includes, so an edit to a kernel is what the next run executes, installed or not.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
CXX = os.environ.get("CXX", "g++")

# The kernels' translation units: compiled with -fsanitize=thread for its instrumentation only (a
# call per load and store; host/sim.cpp implements the hooks; ThreadSanitizer's runtime is not linked).
KERNEL_UNITS = ("lse_forward_f32.cu", "lse_forward_f16.cu", "lse_forward_bf16.cu", "pair_grad_f32.cu",
                "pair_grad_f16.cu", "pair_grad_bf16.cu", "prefixes_f32.cu", "prefixes_f16.cu", "prefixes_bf16.cu",
                "launch.cu")
RUNTIME_UNITS = ("host/sim.cpp", "host/block.cpp", "host/ptx.cpp", "host/fiber.cpp")
TORCH_UNIT = "host/module.cpp"  # ops_cuda.cpp's glue on CPU tensors, and the torch library
NAME_UNIT = "host/name.cpp"  # the library's name, one per build: several builds load side by side

COMMON = ["-std=c++20", "-O2", "-fPIC", "-g0", "-DFASTCL_HOST_EXEC", "-fno-gnu-unique", "-Wall", "-Wextra",
          "-Wno-unused-parameter"]
# -Werror=maybe-uninitialized: a register (local) read before it is written, found by the compiler.
KERNEL_FLAGS = ["-x", "c++", "-fsanitize=thread", "-Werror=uninitialized", "-Werror=maybe-uninitialized"]

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


class BuildError(RuntimeError):
    pass


def compiler() -> str | None:
    """The host C++ compiler, or None (then the host execution cannot run here)."""
    return shutil.which(CXX)


def cache_root() -> Path:
    return Path(os.environ.get("FASTCL_CUDA_HOST_CACHE", Path.home() / ".cache" / "fastcl" / "cuda-host"))


def _includes(tree: Path, unit: str) -> list[Path]:
    """The unit and every file of the tree it includes with quotes, transitively."""
    dirs = [tree / "host" / "include", tree]
    seen: dict[Path, None] = {}
    todo = [tree / unit]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = None
        for name in _INCLUDE.findall(path.read_text()):
            for base in (path.parent, *dirs):
                if (base / name).is_file():
                    todo.append((base / name).resolve())  # (every file of the tree: relative_to holds)
                    break
    # <cuda_runtime.h> and friends come from the shim with angle brackets
    seen.update(dict.fromkeys(sorted((tree / "host" / "include").glob("*.h"))))
    seen[(tree / "host" / "sim.h").resolve()] = None
    return sorted(seen)


def _torch_flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    abi = int(torch.compiled_with_cxx11_abi())
    return [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{sysconfig.get_paths()['include']}",
            *(f"-I{p}" for p in include_paths())]


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:20]


def _compile(cmd: list[str]) -> None:
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise BuildError(f"{' '.join(cmd)}\n{run.stderr[-8000:]}")


def build(tree: Path = SOURCE, jobs: int | None = None) -> tuple[Path, str]:
    """Compile the tree's host execution; returns (the library's path, its torch.ops namespace)."""
    if compiler() is None:
        raise BuildError(f"no C++ compiler ({CXX}) on PATH")
    tree = tree.resolve()
    cache = cache_root()
    (cache / "obj").mkdir(parents=True, exist_ok=True)
    torch_flags = _torch_flags()
    base = [CXX, *COMMON, f"-I{tree / 'host' / 'include'}", f"-I{tree}"]
    units = [(u, KERNEL_FLAGS) for u in KERNEL_UNITS] + [(u, []) for u in RUNTIME_UNITS] + [(TORCH_UNIT, None)]
    todo, objects = [], []
    for unit, flags in units:
        extra = torch_flags if flags is None else flags
        # what the object is made of, wherever the tree lies (a planted copy reuses what it did not change)
        flags = " ".join(base[1:] + extra + [torch.__version__]).replace(str(tree), "<tree>")
        key = _digest([flags.encode(), unit.encode(),
                       *(str(p.relative_to(tree)).encode() + b"\0" + p.read_bytes() for p in _includes(tree, unit))])
        obj = cache / "obj" / f"{Path(unit).stem}-{key}.o"
        objects.append(obj)
        if not obj.exists():
            tmp = obj.with_suffix(f".{os.getpid()}.tmp.o")
            todo.append((unit, [*base, *extra, "-c", str(tree / unit), "-o", str(tmp)], tmp, obj))
    namespace = "fastcl_cuda_host_" + _digest([o.name.encode() for o in objects])[:12]
    name_obj = cache / "obj" / f"name-{namespace}.o"
    objects.append(name_obj)
    if not name_obj.exists():
        tmp = name_obj.with_suffix(f".{os.getpid()}.tmp.o")
        todo.append((NAME_UNIT, [*base, f'-DFASTCL_HOST_LIBRARY="{namespace}"', "-c", str(tree / NAME_UNIT),
                                 "-o", str(tmp)], tmp, name_obj))
    if todo:
        print(f"cuda host execution: compiling {len(todo)} of {len(objects)} units of {tree}", file=sys.stderr)
        # the torch unit is the slow one: start it first
        todo.sort(key=lambda t: t[0] != TORCH_UNIT)
        with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
            list(pool.map(lambda t: _compile(t[1]), todo))
        for _, _, tmp, obj in todo:
            os.replace(tmp, obj)
    library = cache / namespace / "fastcl_cuda_host.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        torch_lib = Path(torch.__file__).parent / "lib"
        tmp = library.with_suffix(f".{os.getpid()}.tmp.so")
        # -Bsymbolic: each build binds to its own runtime, when several are loaded in one process
        _compile([CXX, "-shared", "-Wl,-Bsymbolic", *map(str, objects), f"-L{torch_lib}", "-lc10", "-ltorch_cpu",
                  f"-Wl,-rpath,{torch_lib}", "-o", str(tmp)])
        missing = _undefined_hooks(tmp)
        if missing:
            raise BuildError(f"the instrumentation calls hooks host/sim.cpp does not define: {', '.join(missing)}")
        os.replace(tmp, library)
    return library, namespace


def _undefined_hooks(library: Path) -> list[str]:
    nm = shutil.which("nm")
    if nm is None:
        return []
    out = subprocess.run([nm, "-D", "--undefined-only", str(library)], capture_output=True, text=True).stdout
    return sorted({line.split()[-1] for line in out.splitlines() if "__tsan_" in line})


_LOADED: dict[Path, object] = {}
_TREE_NAMESPACE: dict[str, str] = {}  # the namespace of this tree's own build, once loaded


def load(tree: Path = SOURCE, mutations: dict[str, list[tuple[str, str]]] | None = None):
    """torch.ops.<namespace> of the tree's host execution; ``mutations`` {file: [(old, new), ...]}
    builds a copy of the tree with each ``old`` (which must occur exactly once) replaced."""
    if mutations:
        with tempfile.TemporaryDirectory(prefix="fastcl-cuda-host-") as tmp:
            copy = Path(tmp) / "cuda"
            shutil.copytree(tree, copy)
            for name, edits in mutations.items():
                path = copy / name
                text = path.read_text()
                for old, new in edits:
                    if text.count(old) != 1:
                        raise BuildError(f"the planted change expects {old!r} exactly once in {name}, "
                                         f"found {text.count(old)} (the kernel changed: update the test)")
                    text = text.replace(old, new)
                path.write_text(text)
            library, namespace = build(copy)
    else:
        library, namespace = build(tree)
        if tree == SOURCE:
            _TREE_NAMESPACE["name"] = namespace
    if library not in _LOADED:
        torch.ops.load_library(str(library))
        _LOADED[library] = getattr(torch.ops, namespace)
    return _LOADED[library]


def summary() -> str:
    """One line on what the tree's build executed in this process ("" if it was not loaded)."""
    for library, ops in _LOADED.items():
        if library.parent.name != _TREE_NAMESPACE.get("name"):
            continue
        launches, blocks, threads, meetings, shared, global_ = ops.counters()
        variants = ops.variants().splitlines()
        return (f"cuda host execution: {len(variants)} kernel variants of csrc/cuda ran on the CPU: {launches} "
                f"launches, {blocks} blocks, {threads} threads, {meetings} warp meetings, {shared} shared and "
                f"{global_} global accesses checked")
    return ""
