"""The ``cuda`` backend on a GPU: its kernels against float64 math on the materialised S, and
every loss against ``reference`` (and ``triton`` where it runs), in float32, float16 and bfloat16.

Skipped, with the reason, where there is no GPU or fastcl._C was built without CUDA kernels; the
same checks (tests/cuda_checks.py) run on every machine with the kernels executed on the CPU
(tests/test_cuda_host.py). Each hazard csrc/cuda/DESIGN.md names has a test: G far below float16's
subnormals, +-inf inputs, D not a multiple of 8 and an offset base pointer, and blocks smaller than
S (FASTCL_WORKSPACE_MB).
"""
from __future__ import annotations

import pytest
import torch

import cuda_checks as check
import fastcl
from cases import CASES, EXCLUDING_CASES, Case, run
from tolerances import assert_runs_close, tol

pytestmark = pytest.mark.gpu


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU here (torch.cuda.is_available() is False)"
    from fastcl import _ext

    if _ext._C is None:
        return f"fastcl._C did not load: {_ext.ERROR}"
    if not _ext._C.build_info()["cuda_archs"]:
        return "fastcl._C was built without CUDA kernels (rebuild with FASTCL_CUDA_ARCHS='80;90a')"
    return None


SKIP = _skip_reason()
if SKIP is not None:
    pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason=SKIP)]

GPU = check.Device(torch.ops.fastcl, lambda t: t.cuda(), "cuda")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N, D): tile tails in both directions, D below / above / not a multiple of the 32-feature
# stage and the 128-feature gradient chunk, few row tiles (B split over CTAs) and many.
SHAPES = [(1, 1, 1), (3, 70, 5), (64, 64, 32), (65, 129, 8), (130, 67, 129), (40, 1500, 48), (700, 90, 300),
          (0, 5, 8), (5, 0, 8), (4, 6, 0)]  # and empty sides: nothing launched, or no feature stage


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lse_forward(shape, keyed, dtype):
    check.lse_forward(GPU, shape, keyed, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sides", ["rows", "cols", "both"])
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lse_backward(shape, keyed, sides, dtype):
    check.lse_backward(GPU, shape, keyed, sides, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# every side unkeyed, keys with both sides: the lane-by-lane host tests (test_cuda_host.py) run all six,
# and the GPU matrix has to fit bench/gpu_check.sh's phase limit
@pytest.mark.parametrize("keyed, sides", [(False, "rows"), (False, "cols"), (False, "both"), (True, "both")],
                         ids=["plain-rows", "plain-cols", "plain-both", "keyed-both"])
@pytest.mark.parametrize("shape", [*SHAPES, (5, 4225, 8)], ids=lambda s: "x".join(map(str, s)))
def test_lse_excluding(shape, keyed, sides, dtype):
    check.lse_excluding(GPU, shape, keyed, sides, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_excluding_nothing_is_the_plain_op(dtype):
    check.excluding_nothing_is_the_plain_op(GPU, (65, 129, 24), dtype)


def test_excluding_in_blocks(monkeypatch):
    check.excluding_in_blocks(GPU, monkeypatch)


def test_bad_exclude_lists_are_refused():
    check.bad_exclude_lists_are_refused(GPU)


# Op lse_prefixes: few ids (bench/gpu_check.sh's matrix limit); the host tests run the full matrix of
# sides, factors, K and shapes lane by lane. Segments cut a 16-byte chunk (a laid-out copy) or not
# (d 64 at 16, 32, 64), K = 1, 3, 5, tile tails, prefixes short of D.
PREFIX_CASES = [((3, 17, 40), (8, 24, 40), True, "both"), ((5, 64, 100), (7, 33, 64), False, "rows"),
                ((65, 129, 64), (16, 32, 64), True, "cols"), ((257, 131, 40), (3, 5, 16, 17, 40), True, "both"),
                ((1, 1, 1), (1,), False, "both")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFIX_CASES, ids=lambda c: "x".join(map(str, c[0])) + "-" + c[3])
def test_lse_prefixes(case, dtype):
    shape, dims, factors, sides = case
    check.lse_prefixes(GPU, shape, dims, factors, sides, dtype)


def test_lse_prefixes_in_blocks_beyond_one_launch(monkeypatch):
    """A tiny FASTCL_WORKSPACE_MB (several blocks) and K = 18 (two launches per block), float16 with
    gradients 1e-9 (its power-of-two scale over every suffix sum)."""
    monkeypatch.setenv("FASTCL_WORKSPACE_MB", "0.02")
    check.lse_prefixes(GPU, (300, 270, 72), tuple(range(4, 72, 4)) + (72,), True, "both", torch.float16,
                       g_size=1e-9)


# Op pointwise_prefixes: SigLIP weighted and keyed with factors, MW plain; the host tests run the rest.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [((130, 67, 40), (13, 40), 0), ((257, 131, 40), (3, 5, 16, 17, 40), 1)],
                         ids=["siglip-130x67x40", "mw-257x131x40"])
def test_pointwise_prefixes(case, dtype):
    shape, dims, kind = case
    check.pointwise_prefixes(GPU, shape, dims, kind == 0, kind, kind == 0, True, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "g_row"])
@pytest.mark.parametrize("kind", [0, 1], ids=["siglip", "mw"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pointwise(shape, kind, weighted, dtype):
    check.pointwise(GPU, shape, kind, weighted, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 13], ids=["d64", "d13"])
def test_unaligned_inputs(dtype, d):
    check.unaligned_inputs(GPU, dtype, d)


@pytest.mark.parametrize("n", [4096, 8192])
def test_float16_gradient_far_below_subnormals(n):
    check.float16_gradient_far_below_subnormals(GPU, n)


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_float32_inputs_follow_float32_math(value):
    check.infinite_float32_inputs_follow_float32_math(GPU, value)


def test_blocks_smaller_than_s(monkeypatch):
    check.blocks_smaller_than_s(GPU, monkeypatch)


def test_fully_keyed_lines_and_nan():
    check.fully_keyed_lines_and_nan(GPU)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_inputs(dtype):
    check.non_finite_inputs(GPU, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_finite_logits(dtype):
    check.huge_finite_logits(GPU, dtype)


@pytest.mark.parametrize("shape", [(40, 1500, 48), (700, 90, 300)], ids=["split-columns", "many-row-tiles"])
def test_bitwise_deterministic(shape):
    check.bitwise_deterministic(GPU, shape)


# --- every loss through the engine ------------------------------------------------------------

def _to_cuda(t: torch.Tensor) -> torch.Tensor:
    return t.cuda()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_loss_matches_reference(case: Case, dtype):
    got = run(case, "cuda", dtype, transform=_to_cuda)
    want = run(case, "reference", dtype, in_float64=True)
    assert got[0].is_cuda
    assert_runs_close(got, want, tol("low precision", dtype), f"cuda {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", EXCLUDING_CASES, ids=lambda c: c.id)
def test_excluding_loss_matches_reference(case: Case, dtype):
    """Decoupled positives and GISTEmbed's guide (op lse_exclude) through the kernels."""
    got = run(case, "cuda", dtype, transform=_to_cuda)
    want = run(case, "reference", dtype, in_float64=True)
    assert got[0].is_cuda
    assert_runs_close(got, want, tol("low precision", dtype), f"cuda {dtype}")


@pytest.mark.cross_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_loss_matches_triton(case: Case, dtype):
    if "triton" not in fastcl.backends("cuda"):
        pytest.skip("the triton backend cannot run on CUDA here (fastcl.backends('cuda') lacks it)")
    got = run(case, "cuda", dtype, transform=_to_cuda)
    want = run(case, "triton", dtype, transform=_to_cuda)
    assert got[0].is_cuda
    assert_runs_close(got, want, tol("cuda vs triton", dtype), f"cuda vs triton {dtype}")
