#!/usr/bin/env bash
# Install fastcl from this checkout against one torch, as a user would, and run a fast subset of
# the tests on it. .ci/run calls it for the newest torch installable here and the oldest fastcl
# declares (cmake/torch_facts.py: MIN_TORCH), and for a CUDA-enabled build on the pinned CPU torch.
#
#   tools/check_torch.sh 'torch==2.14.1'                             # the CUDA 13 wheel, no toolkit set up
#   tools/check_torch.sh 'torch==2.4.1'
#   FASTCL_CUDA_ARCHS="80;90a" tools/check_torch.sh 'torch==2.13.0'  # kernels built by nvcc, CPU torch
#
# Each run gets a fresh virtual environment and build directory under $CHECK_DIR (default: a new
# temporary directory, removed afterwards): nothing is shared with the checkout's own build.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_spec="${1:?usage: tools/check_torch.sh TORCH_REQUIREMENT}"
archs="${FASTCL_CUDA_ARCHS:-}"
work="${CHECK_DIR:-$(mktemp -d)}"
[ -n "${CHECK_DIR:-}" ] || trap 'rm -rf "$work"' EXIT
label="check_torch[$torch_spec${archs:+, FASTCL_CUDA_ARCHS=$archs}]"
say() { echo "$label: $*"; }
start=$SECONDS

python3 -m venv "$work/venv"
py="$work/venv/bin/python"
say "installing $torch_spec"
"$py" -m pip install -q "$torch_spec" -r requirements/build.txt pytest hypothesis
"$py" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}')"

say "pip install --no-build-isolation .  (nothing else in the environment)"
"$py" -m pip install -q --no-build-isolation --config-settings=build-dir="$work/build" .

# The installed package, not the source tree (python/ is not on sys.path from the repository root).
"$py" - "$archs" <<'PY'
import importlib.metadata, sys

import torch

import fastcl

archs = sys.argv[1].replace(";", ",")
ext = fastcl.info()["extension"]
assert "error" not in ext, ext
assert ext["torch_version"] == torch.__version__.split("+")[0], (ext["torch_version"], torch.__version__)
assert ext["cuda_archs"] == archs, f"built for {ext['cuda_archs']!r}, asked for {archs!r}"
assert bool(ext["cuda_version"]) == bool(archs), ext["cuda_version"]  # the toolkit fastcl doctor checks
major, minor = torch.__version__.split(".")[:2]
pin = f"torch=={major}.{minor}.*"
assert pin in importlib.metadata.requires("fastcl"), importlib.metadata.requires("fastcl")
x, y = torch.randn(37, 16, dtype=torch.float64), torch.randn(37, 16, dtype=torch.float64)
engine = fastcl.info()["devices"]["cpu"]["auto"]  # what "auto" takes above its small-S threshold
got, want = fastcl.clip_loss(x, y, 3.0, backend=engine), fastcl.clip_loss(x, y, 3.0, backend="reference")
torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
print(f"fastcl from {fastcl.__file__}: extension for torch {ext['torch_version']}, CUDA archs "
      f"{ext['cuda_archs'] or 'none'}, requires {pin}; clip_loss on {engine} "
      f"= reference ({got.item():.12f})")
PY

say "tests"
"$py" -m pytest -q -p no:cacheprovider tests/test_build.py tests/test_backends.py tests/test_errors.py tests/test_determinism.py
say "ok in $((SECONDS - start)) s"
