#!/usr/bin/env bash
# fastcl's Triton kernels under one Triton release, as users get it pinned by their torch CUDA wheel:
#   1. every kernel variant a launch can pick, compiled ahead of time for sm_80 and sm_90: no
#      compile error, no register spill where tests/test_triton_aot.py forbids one;
#   2. the interpreter tests (TRITON_INTERPRET=1: the kernels run as numpy on the CPU, against the
#      reference), which is how the kernels' results are checked without a GPU;
#   3. bench/gpu_check.sh --dry-run: what the GPU machine's check would compile, and whether each of
#      its phases fits its time limit.
#
#   tools/check_triton.sh 3.6.0          # in the checkout's .venv (the README's test command made it)
#
# The CPU torch wheel does not depend on Triton, so no new torch is needed: Triton (and the numpy its
# interpreter needs) go into their own folder, put ahead of the venv's site-packages on PYTHONPATH.
# .ci/run calls this for the oldest Triton of the supported range and the GPU machine's
# (python/fastcl/backend/triton/versions.py); the newest is the venv's own, which the test suite covers.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:?usage: tools/check_triton.sh TRITON_VERSION}"
py="${PYTHON:-.venv/bin/python}"
work="${CHECK_DIR:-$(mktemp -d)}"
[ -n "${CHECK_DIR:-}" ] || trap 'rm -rf "$work"' EXIT
say() { echo "check_triton[$version]: $*"; }
start=$SECONDS

# Triton < 3.7's interpreter converts with int() what numpy >= 2.4 returns as a 1-element array
# ("only 0-dimensional arrays can be converted to Python scalars", interpreter.py).
numpy="numpy>=1.26"
"$py" - "$version" <<'PY' || numpy="numpy>=1.26,<2.4"
import sys
from fastcl.backend.triton.versions import parse
sys.exit(0 if parse(sys.argv[1]) >= (3, 7) else 1)
PY
say "installing triton==$version $numpy into $work/site"
"$py" -m pip install -q --no-deps --target "$work/site" "triton==$version" "$numpy" 2>&1 \
  | grep -v -e "is ignored" -e "Running pip as" >&2 || true
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
"$py" -c "import triton, numpy; print(f'triton {triton.__version__}, numpy {numpy.__version__}')"
"$py" -c "import triton, sys; sys.exit(triton.__version__ != '$version')" || { say "wrong triton imported"; exit 1; }

say "1. ahead-of-time compile of every variant (sm_80, sm_90), and the GPU tests' launch variants"
"$py" -m pytest -q -p no:cacheprovider tests/test_triton_aot.py

say "2. interpreter tests"
TRITON_INTERPRET=1 "$py" -m pytest -q -p no:cacheprovider -m "not gpu" -k "not session" \
  tests/test_triton.py tests/test_triton_engine.py
TRITON_INTERPRET=1 "$py" -m pytest -q -p no:cacheprovider -k "triton and not session" tests/test_topk.py \
  tests/test_maxsim.py

say "3. bench/gpu_check.sh --dry-run"
PYTHON="$py" bash bench/gpu_check.sh --dry-run

say "ok ($((SECONDS - start)) s)"
