#!/usr/bin/env bash
# One-shot check of fastcl on an NVIDIA GPU (with a CUDA build of torch, and Triton): install fastcl
# with its CUDA kernels when nvcc is there, run the GPU tests, then the GPU benchmark, whose table
# comes last (rows also go to bench/results/<date>-gpu-<gpu>.json). Sized for < 8 minutes on an
# H200; each phase has its own time limit, so a hang in one still leaves the others' results.
#
#   bash bench/gpu_check.sh            # from anywhere; extra arguments go to bench/gpu.py
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
status=()

"$PY" - <<'PY' || { echo "gpu_check: needs a CUDA GPU, a CUDA build of torch and triton" >&2; exit 2; }
import torch, triton
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA GPU"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, {torch.cuda.get_device_name()}")
PY

# 1. install (non-editable, against this torch). The GPU's own architecture, "a" suffix for
#    sm_90 (wgmma); FASTCL_CUDA_ARCHS from the environment wins.
if command -v nvcc >/dev/null 2>&1; then
  arch=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if M == 9 else ''))")
  export FASTCL_CUDA_ARCHS="${FASTCL_CUDA_ARCHS:-$arch}"
  echo "gpu_check: building the CUDA kernels for FASTCL_CUDA_ARCHS=$FASTCL_CUDA_ARCHS"
else
  echo "gpu_check: no nvcc: the cuda backend is left out, triton and chunked still run" >&2
fi
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
if timeout 300 "$PY" -m pip install -q --no-build-isolation --no-deps .; then status+=("install: ok")
else status+=("install: FAILED ($?)"); fi
"$PY" -c "import fastcl, json; print(json.dumps(fastcl.info()['devices'], indent=1))" || true

# 2. the tests that need a GPU (test_cuda.py, test_triton.py's cuda matrix). `import fastcl` finds the
#    installed copy (the source lives in python/, which is not on sys.path). Triton's autotuning is
#    off here: each of the matrix's many kernel specialisations is compiled once, not once per
#    candidate configuration (the benchmark below autotunes).
if FASTCL_TRITON_AUTOTUNE=0 timeout 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider --durations=10 tests
then status+=("pytest -m gpu: ok")
else status+=("pytest -m gpu: FAILED ($?)"); fi

# 3. the benchmark; its table is the last thing printed.
printf 'gpu_check: %s\n' "${status[@]}" >&2
timeout 300 "$PY" bench/gpu.py "$@"
bench=$?
[ $bench -eq 0 ] || echo "gpu_check: bench/gpu.py FAILED ($bench)" >&2
[ $bench -eq 0 ] && [[ "${status[*]}" != *FAILED* ]]
