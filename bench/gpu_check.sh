#!/usr/bin/env bash
# fastcl on a bare NVIDIA GPU machine, in one call of at most 8 minutes, evidence first. Every phase
# has its own time limit and writes its results as soon as it ends, so a phase that hangs, or a run
# stopped halfway, still leaves what the phases before it found:
#   env     environment facts (torch, CUDA, Triton, GPU, driver, nvcc, git sha) -> info.json
#   build   in the background from here on: the CUDA extension for this GPU's architecture
#           (pip install --no-build-isolation --no-deps --target <temp dir> .; FASTCL_CUDA_ARCHS
#           from the GPU, CMAKE_BUILD_PARALLEL_LEVEL=nproc; a fresh build folder) -> build.log.
#           Into a folder of its own, which nothing imports until the build has ended, so the tests
#           running meanwhile from python/ cannot see a half-written package.
#   triton  the Triton GPU tests (pytest -m gpu tests/test_triton.py) from the source tree, while
#           the build runs (the triton backend needs no build) -> junit-triton.xml
#   info    fastcl.info() of the installed copy (which backends it can run, the CUDA archs it
#           carries) -> info.json again
#   smoke   CLIP, SigLIP and NT-Xent, float32 and bfloat16, against reference, on triton and on
#           cuda (the backends' loss tests, 12 ids) -> junit-smoke.xml
#   bench   CLIP and SigLIP at N=32768, D=1024, bf16: the GEMM floor, triton, cuda and naive PyTorch,
#           each with its peak memory and the performance model's time and workspace beside it
#           (bench/gpu.py) -> bench.json, rewritten after every row
#   matrix  the rest of the GPU test matrix: pytest -m gpu over the other files carrying the marker,
#           but the cross_backend tests (cuda against triton; each is checked against reference)
#           -> junit-gpu.xml
# then a summary (each phase's status and time, each junit file's counts and first failures, the
# bench table) printed last, so that it is in the last 12,000 characters of the output. The Python
# side of each phase (facts, collection, compiles, estimates, the summary) is bench/gpu_check.py.
#
#   bash bench/gpu_check.sh [--sha SHA] [bench/gpu.py arguments]
#   bash bench/gpu_check.sh --dry-run      # no GPU needed (CI): see below
#
# Output: everything printed also goes to $OUT/gpu_check.log when OUT is set, else to
# bench/out/gpu_check-<date>/ (gitignored); at most 8 files. Results name their commit: --sha, or
# GIT_SHA (the GPU machine's copy of the tree may have no .git), else `git rev-parse HEAD` (+dirty);
# exported as FASTCL_GIT_SHA, which info.json and the bench rows record (an installed copy has no
# checkout to ask).
# Python: $PYTHON, else /opt/torch/.venv/bin/python3 (the GPU image's), else the first python on
# PATH that imports torch.
#
# --dry-run (CI, no GPU): env as above; collect: the three test phases' ids collect with the
# optional test dependencies hidden (a bare GPU image lacks them), the smoke ids all exist;
# compile: every Triton variant the GPU tests and the bench launch (aot.launch_variants of their
# feature widths, sm_90) compiles under the installed Triton, in a process pool; estimate: each
# phase's time on 16 cores (cold Triton compiles, one after another as a test session meets them;
# the C launcher per kernel signature that some Tritons compile with gcc at first launch, 3.6 does,
# 3.9 does not; the extension's build; the bench from the performance model), printed beside its
# limit -> plan.json; fails when one does not fit.
#
# Knobs: <PHASE>_S (limits, below); GPU_CHECK_HANG=<phase> replaces that phase with a sleep
# that ignores SIGINT, outside `timeout` (the tests use it to stop a run halfway);
# GPU_CHECK_ARCH=90a pretends a GPU of that architecture, to rehearse the whole run's flow on a
# machine without one (the GPU tests skip).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# Phase limits, seconds. The build runs beside the triton phase: the run's wall time is at most
# ENV_S + max(BUILD_S, TRITON_S) + INFO_S + SMOKE_S + BENCH_S + MATRIX_S <= TOTAL_S.
ENV_S=${ENV_S:-15}
BUILD_S=${BUILD_S:-200}
TRITON_S=${TRITON_S:-225}
INFO_S=${INFO_S:-10}
SMOKE_S=${SMOKE_S:-50}
BENCH_S=${BENCH_S:-55}
MATRIX_S=${MATRIX_S:-125}
TOTAL_S=480
# --dry-run's own phases (on a CI machine, not the GPU machine's budget).
DRY_S=${DRY_S:-900}

TRITON_TESTS="tests/test_triton.py"
GPU_TESTS=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
MATRIX_TESTS=$(for f in $GPU_TESTS; do [[ " $TRITON_TESTS " == *" $f "* ]] || printf '%s ' "$f"; done)
# cuda against triton (174 tests) stays out: both are checked against reference in the phases, and the
# matrix has to fit its limit
MATRIX_MARK="gpu and not cross_backend"
# The smoke set: CLIP, SigLIP and NT-Xent (many tiles: several blocks in both directions), float32
# and bfloat16, against reference, on triton and on cuda.
SMOKE_CASES="clip_loss-290x290-many-tiles siglip_loss-270x270-many-tiles ntxent_loss-V2-B150-many-tiles"
SMOKE_IDS=()
for c in $SMOKE_CASES; do
  for t in float32 bfloat16; do
    SMOKE_IDS+=("tests/test_triton.py::test_low_precision_against_float64[$c-cuda-torch.$t]"
                "tests/test_cuda.py::test_loss_matches_reference[$c-torch.$t]")
  done
done
BENCH_ARGS=(--sizes 32768x1024 --dtype bfloat16 --losses clip,siglip --impls triton,cuda,naive)

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  if [ -x /opt/torch/.venv/bin/python3 ]; then echo /opt/torch/.venv/bin/python3; return; fi
  local c p
  for c in python3 python; do
    p=$(command -v "$c") && "$p" -c "import torch" 2>/dev/null && { echo "$p"; return; }
  done
  command -v python3 || command -v python
}

SUMMARY=()
CHILD=""
BUILD_PID=""
CURRENT=""
TEE=""
TMPD=""
# stop_group PID SIGNAL: a phase's `timeout` leads a process group of its own (it calls setpgid), so
# the signal goes to the group: also to a command that `timeout` has not yet reached (a signal that
# lands before `timeout` has installed its handlers is lost: a background command of a
# non-interactive shell starts with SIGINT ignored) and to one that ignores it. SIGKILL after 10 s;
# until everything that holds the log's pipe is gone, the final `wait` for tee cannot return.
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $s != Z* ]]; }
stop_group() {
  local pid=$1 sig=$2 i
  kill "-$sig" -- "-$pid" "$pid" 2>/dev/null
  for ((i = 0; i < 100; i++)); do
    alive "$pid" || kill -0 -- "-$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL -- "-$pid" "$pid" 2>/dev/null
}
finish() {
  local rc=$1
  [ -n "$CHILD" ] && stop_group "$CHILD" INT
  [ -n "$BUILD_PID" ] && stop_group "$BUILD_PID" TERM
  [ -n "$TMPD" ] && rm -rf "$TMPD"
  exec >&- 2>&-
  [ -n "$TEE" ] && wait "$TEE" 2>/dev/null
  exit "$rc"
}
stopped() {
  SUMMARY+=("$(printf '%-8s %s' "$CURRENT" "STOPPED by a signal")")
  printf 'gpu_check: %s\n' "${SUMMARY[@]}"
  finish 143
}

# phase NAME LIMIT_S COMMAND...: the command under its own limit (SIGINT first, so that pytest still
# writes its junit XML and summary; SIGKILL 10 s later), in the background so that a signal to this
# script is handled at once. Status 0 ok, 124 timed out, other failed.
phase() {
  local name=$1 limit=$2 start=$SECONDS rc what
  shift 2
  CURRENT=$name
  echo "=== gpu_check $name: start (limit ${limit} s) at $(date -u +%H:%M:%S)"
  if [ "${GPU_CHECK_HANG:-}" = "$name" ]; then
    # a phase deaf to SIGINT and never ending, as `timeout` is for its first instants (a stop
    # that arrives then is lost): a stop must still end the run
    bash -c 'trap "" INT; exec sleep 3600' &
  else
    timeout -k 10 -s INT "$limit" "$@" &
  fi
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=""
  case $rc in
    0) what=ok ;;
    124 | 137) what="TIMED OUT"; rc=124 ;;
    *) what="FAILED (exit $rc)" ;;
  esac
  SUMMARY+=("$(printf '%-8s %-24s %4d s of %4d s' "$name" "$what" "$((SECONDS - start))" "$limit")")
  echo "=== gpu_check $name: $what after $((SECONDS - start)) s"
  return $rc
}

failed() { [[ "${SUMMARY[*]}" == *FAILED* || "${SUMMARY[*]}" == *"TIMED OUT"* ]]; }

dry_run() {
  export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}  # Triton 3.9 warns when it is unset
  export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
  local start=$SECONDS env_s
  phase env "$DRY_S" "${H[@]}" facts "$DIR/info.json" "$TMPD/facts.sh"
  env_s=$((SECONDS - start))
  phase collect "$DRY_S" "${H[@]}" collect "$DIR/plan.json" \
    --triton $TRITON_TESTS --matrix $MATRIX_TESTS --matrix-mark "$MATRIX_MARK" --smoke "${SMOKE_IDS[@]}"
  phase compile "$DRY_S" "${H[@]}" compile "$DIR/plan.json" --smoke-cases $SMOKE_CASES \
    --bench "${BENCH_ARGS[@]}"
  phase estimate "$DRY_S" "${H[@]}" estimate "$DIR/plan.json" \
    --env-s "$env_s" --limits $LIMITS --total "$TOTAL_S" --bench "${BENCH_ARGS[@]}"
  echo
  echo "=== gpu_check --dry-run summary (git $FASTCL_GIT_SHA; files in $DIR)"
  printf 'gpu_check: %s\n' "${SUMMARY[@]}"
  if failed; then echo "gpu_check --dry-run: FAILED"; finish 1; fi
  echo "gpu_check --dry-run: ok"
  finish 0
}

gpu_run() {
  # 0. environment facts; the GPU's architecture for the build ("a" for sm_90: wgmma).
  phase env "$ENV_S" env PYTHONPATH="$ROOT/python" "${H[@]}" facts "$DIR/info.json" "$TMPD/facts.sh"
  local ARCH=""
  # shellcheck disable=SC1091
  [ -f "$TMPD/facts.sh" ] && . "$TMPD/facts.sh"
  ARCH=${GPU_CHECK_ARCH:-$ARCH}
  if [ -z "$ARCH" ]; then
    echo "gpu_check: no CUDA GPU visible to torch: nothing to check here (--dry-run checks without one)"
    printf 'gpu_check: %s\n' "${SUMMARY[@]}"
    finish 2
  fi

  # 1. the build, in the background, into a folder of its own.
  if ! command -v nvcc >/dev/null 2>&1 && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
  fi
  command -v nvcc >/dev/null 2>&1 || echo "gpu_check: no nvcc: the extension builds without the cuda backend"
  export FASTCL_CUDA_ARCHS=${FASTCL_CUDA_ARCHS:-$ARCH}
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  local site=$TMPD/site build_start=$SECONDS build_rc took what
  local build_cmd=("$PY" -m pip install -v --no-build-isolation --no-deps --no-index --target "$site"
                   --config-settings=build-dir="$TMPD/build" .)
  [ "${GPU_CHECK_HANG:-}" = build ] && build_cmd=(sleep 3600)
  echo "=== gpu_check build: start in the background (limit ${BUILD_S} s), FASTCL_CUDA_ARCHS=$FASTCL_CUDA_ARCHS" \
    "CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL -> $DIR/build.log"
  timeout -k 10 "$BUILD_S" "${build_cmd[@]}" >"$DIR/build.log" 2>&1 &
  BUILD_PID=$!

  # 2. the Triton GPU tests, from the source tree, meanwhile.
  PYTHONPATH="$ROOT/python" phase triton "$TRITON_S" "${PYTEST[@]}" -m gpu --junitxml="$DIR/junit-triton.xml" \
    $TRITON_TESTS

  CURRENT=build
  wait "$BUILD_PID"
  build_rc=$?
  BUILD_PID=""
  took=$((SECONDS - build_start))
  if [ -f "$TMPD/build/.ninja_log" ]; then  # what the next estimate of the build can start from
    { echo "slowest build steps (s):"; awk 'NR > 1 {printf "%6.1f %s\n", ($2 - $1) / 1000, $4}' \
        "$TMPD/build/.ninja_log" | sort -rn | head -8; } >>"$DIR/build.log"
  fi
  case $build_rc in
    0) what=ok ;;
    124 | 137) what="TIMED OUT" ;;
    *) what="FAILED (exit $build_rc)" ;;
  esac
  SUMMARY+=("$(printf '%-8s %-24s %4d s of %4d s' build "$what" "$took" "$BUILD_S")")
  echo "=== gpu_check build: $what after $took s"
  if [ "$build_rc" -eq 0 ]; then
    export PYTHONPATH="$site"
  else
    echo "gpu_check: the build's last lines (all of them in build.log):"
    tail -15 "$DIR/build.log"
    echo "gpu_check: testing the source tree (python/) without fastcl._C: the cuda tests skip, saying why"
    export PYTHONPATH="$ROOT/python"
  fi

  # 3. what the installed copy can run; the smoke set. 4. the bench. 5. the rest of the GPU matrix.
  phase info "$INFO_S" "${H[@]}" facts "$DIR/info.json" "$TMPD/facts.sh"
  phase smoke "$SMOKE_S" "${PYTEST[@]}" --junitxml="$DIR/junit-smoke.xml" "${SMOKE_IDS[@]}"
  phase bench "$BENCH_S" "$PY" bench/gpu.py "${BENCH_ARGS[@]}" --out "$DIR/bench.json"
  if [ -n "$MATRIX_TESTS" ]; then
    phase matrix "$MATRIX_S" "${PYTEST[@]}" -m "$MATRIX_MARK" --junitxml="$DIR/junit-gpu.xml" $MATRIX_TESTS
  fi

  CURRENT=summary
  echo
  "${H[@]}" summary "$DIR" "${SUMMARY[@]}"
  if failed; then finish 1; fi
  finish 0
}

main() {
  local dry=0 sha=${GIT_SHA:-${FASTCL_GIT_SHA:-}} wall
  while [ $# -gt 0 ]; do
    case $1 in
      --dry-run) dry=1 ;;
      --sha) sha=${2:-}; shift ;;
      --sha=*) sha=${1#--sha=} ;;
      *) BENCH_ARGS+=("$1") ;;
    esac
    shift
  done
  wall=$((ENV_S + (BUILD_S > TRITON_S ? BUILD_S : TRITON_S) + INFO_S + SMOKE_S + BENCH_S + MATRIX_S))
  if [ "$wall" -gt "$TOTAL_S" ]; then
    echo "gpu_check: the phase limits allow ${wall} s, over the ${TOTAL_S} s this check may take" >&2
    exit 2
  fi
  PY=$(pick_python)
  if [ -z "$sha" ] && git rev-parse HEAD >/dev/null 2>&1; then
    sha=$(git rev-parse HEAD)
    [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && sha="$sha+dirty"
  fi
  export FASTCL_GIT_SHA=${sha:-unknown}
  export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
  export FASTCL_TRITON_AUTOTUNE=${FASTCL_TRITON_AUTOTUNE:-0}  # one compile per kernel variant: what the plan counts

  DIR=${OUT:-bench/out/gpu_check-$(date -u +%Y%m%d-%H%M%S)}
  mkdir -p "$DIR" || exit 2
  DIR=$(cd "$DIR" && pwd)
  TMPD=$(mktemp -d)
  trap stopped TERM INT HUP
  exec > >(tee -a "$DIR/gpu_check.log") 2>&1
  TEE=$!
  H=("$PY" "$ROOT/bench/gpu_check.py")
  PYTEST=("$PY" -m pytest -q -p no:cacheprovider --tb=line -rfE --disable-warnings)
  LIMITS="env=$ENV_S build=$BUILD_S triton=$TRITON_S info=$INFO_S smoke=$SMOKE_S bench=$BENCH_S matrix=$MATRIX_S"
  echo "gpu_check: $PY; out $DIR; git $FASTCL_GIT_SHA; limits (s) $LIMITS: at most $wall s of $TOTAL_S"
  if [ $dry -eq 1 ]; then dry_run; else gpu_run; fi
}

main "$@"
