#!/usr/bin/env bash
# One-shot check of fastcl on an NVIDIA GPU (a CUDA build of torch, Triton, pytest), sized for one
# 10-minute call on a bare GPU machine; each phase has its own time limit, so a hang in one still
# leaves the others' results:
#   1. install (non-editable, --no-deps, against this torch; the CUDA kernels when nvcc is there).
#      If the build cannot run here (no scikit-build-core, no compiler), the source tree's python/
#      is imported instead: the triton backend needs no build, the cuda backend then says why not.
#   2. the GPU tests: only the test files that carry the gpu marker (their imports need torch,
#      triton and pytest alone, so optional dependencies of other test files cannot break
#      collection), Triton autotuning off: one compilation per kernel variant, whose number and cold
#      compile time --dry-run checks against this phase's limit.
#   3. the benchmark (bench/gpu.py, rows to bench/results/<date>-gpu-<gpu>.json), each row beside the
#      performance model's prediction for this GPU; its table comes last.
#
#   bash bench/gpu_check.sh [bench/gpu.py arguments]
#   bash bench/gpu_check.sh --dry-run      # no GPU needed (CI): everything above that can be checked
#
# --dry-run: the GPU test files collect with the optional test dependencies hidden; the Triton
# variants the GPU tests compile (counted from the feature widths they use) times the compile time
# of one of them measured here fits the test phase; bench/gpu.py parses its defaults; the model
# predicts the benchmark's default sizes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
INSTALL_S=${INSTALL_S:-180}
TESTS_S=${TESTS_S:-210}
BENCH_S=${BENCH_S:-180}
GPU_TESTS=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
status=()

dry_run() {
  local hide rc=0
  hide=$(mktemp -d)
  # A bare GPU image lacks the optional test dependencies: make them unimportable (and load no
  # pytest plugins from the environment, as a bare pytest would have none).
  cat >"$hide/sitecustomize.py" <<'PY'
import sys


class _Absent:
    names = {"pytorch_metric_learning", "hypothesis", "rich", "matplotlib", "open_clip", "inf_cl"}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by gpu_check.sh --dry-run)", name=name)
        return None


sys.meta_path.insert(0, _Absent())
PY
  echo "gpu_check --dry-run: GPU test files: $GPU_TESTS"
  if PYTHONPATH="$hide${PYTHONPATH:+:$PYTHONPATH}" PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
      "$PY" -m pytest --collect-only -q -m gpu -p no:cacheprovider $GPU_TESTS >"$hide/collect.txt" 2>&1 && grep -q "tests collected\|test collected" "$hide/collect.txt"; then
    echo "gpu_check --dry-run: collection without optional dependencies: $(grep -E 'collected' "$hide/collect.txt")"
  else
    echo "gpu_check --dry-run: collection FAILED:" >&2; tail -20 "$hide/collect.txt" >&2; rc=1
  fi
  TESTS_S=$TESTS_S TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1} "$PY" - <<'PY' || rc=1
import os, sys, time
sys.path.insert(0, "tests")
import torch
from cases import CASES
import test_cuda, test_triton
from fastcl.triton import aot



def width(case):
    first = case.inputs(torch.float64, requires_grad=False)[0][0]
    return (first[0] if isinstance(first, (list, tuple)) else first).shape[-1]


# The feature widths the GPU tests use; every dtype the triton matrix runs.
dims = {width(c) for c in CASES} | {d for *_, d in test_triton.SHAPES + test_cuda.SHAPES}
variants = aot.launch_variants(sorted(dims), arch=90)
start = time.perf_counter()
result = aot.compile_variant(variants[0])
seconds = time.perf_counter() - start
assert "error" not in result, result
estimate = 1.5 * seconds * len(variants)  # 1.5: slack for a slower CPU than this one
budget = 0.75 * float(os.environ["TESTS_S"])  # the rest of the phase runs the tests themselves
print(f"gpu_check --dry-run: the GPU tests compile {len(variants)} Triton variants (feature widths "
      f"{sorted(dims)}); one took {seconds:.1f} s here: about {estimate:.0f} s cold, budget {budget:.0f} s")
sys.exit(0 if estimate <= budget else 1)
PY
  "$PY" bench/gpu.py --help >/dev/null && echo "gpu_check --dry-run: bench/gpu.py parses its arguments" || rc=1
  "$PY" -m fastcl.benchmark.model --loss clip --n 32768 --d 1024 --dtype bfloat16 || rc=1
  "$PY" -m fastcl.benchmark.model --loss siglip --n 32768 --d 1024 --dtype bfloat16 || rc=1
  "$PY" -m fastcl.benchmark.model --loss clip --n 32768 --d 1024 --dtype bfloat16 --backend cuda || rc=1
  rm -rf "$hide"
  [ $rc -eq 0 ] && echo "gpu_check --dry-run: ok" || echo "gpu_check --dry-run: FAILED" >&2
  return $rc
}

if [ "${1:-}" = "--dry-run" ]; then
  dry_run
  exit $?
fi

"$PY" - <<'PY' || { echo "gpu_check: needs a CUDA GPU, a CUDA build of torch, triton and pytest" >&2; exit 2; }
import pytest, torch, triton
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA GPU"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, pytest {pytest.__version__}, "
      f"{torch.cuda.get_device_name()}")
PY

# 1. install. The GPU's own architecture, "a" suffix for sm_90 (wgmma); FASTCL_CUDA_ARCHS from the
#    environment wins.
if command -v nvcc >/dev/null 2>&1; then
  arch=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if M == 9 else ''))")
  export FASTCL_CUDA_ARCHS="${FASTCL_CUDA_ARCHS:-$arch}"
  echo "gpu_check: building the CUDA kernels for FASTCL_CUDA_ARCHS=$FASTCL_CUDA_ARCHS"
else
  echo "gpu_check: no nvcc: the cuda backend is left out, triton and chunked still run" >&2
fi
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
if timeout "$INSTALL_S" "$PY" -m pip install -q --no-build-isolation --no-deps .; then status+=("install: ok")
else
  status+=("install: FAILED ($?): testing the source tree (python/) without fastcl._C")
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import fastcl, json; print(json.dumps(fastcl.info()['devices'], indent=1))" || true

# 2. the GPU tests (test_cuda.py, test_triton.py's cuda matrix). `import fastcl` finds the installed
#    copy (the source lives in python/, which is not on sys.path unless the install failed).
if FASTCL_TRITON_AUTOTUNE=0 timeout "$TESTS_S" "$PY" -m pytest -m gpu -q -p no:cacheprovider --durations=10 $GPU_TESTS
then status+=("pytest -m gpu: ok")
else status+=("pytest -m gpu: FAILED ($?)"); fi

# 3. the benchmark; its table is the last thing printed.
printf 'gpu_check: %s\n' "${status[@]}" >&2
timeout "$BENCH_S" "$PY" bench/gpu.py "$@"
bench=$?
[ $bench -eq 0 ] || echo "gpu_check: bench/gpu.py FAILED ($bench)" >&2
[ $bench -eq 0 ] && [[ "${status[*]}" != *FAILED* ]]
