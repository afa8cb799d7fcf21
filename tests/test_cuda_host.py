"""The CUDA kernels executed on the CPU, lane by lane (csrc/cuda/host; csrc/cuda/DESIGN.md, "Executed
on the CPU"): the device code of csrc/cuda compiled unchanged by the host compiler, each CUDA thread a
fiber, __syncthreads and every warp collective a real meeting, mma / ldmatrix / cp.async with the PTX
ISA's semantics, and every shared and global access checked (races per barrier epoch, cp.async
discipline, bounds, uninitialised shared reads).

Built from the source tree this file sits in (tests/cuda_host.py, cached by a hash of the sources):
an edit to a kernel is what the next run executes, with or without reinstalling fastcl.

- every launch path of launch.cu through the CUDA backend's own glue (ops_cuda.cpp on CPU tensors):
  the same checks and tolerances as the GPU tests (tests/cuda_checks.py, test_cuda.py), and every loss
  against ``reference`` through a backend that reaches these kernels;
- every test also asserts that the checkers found nothing;
- the checkers' negative controls: a copy of the tree with one planted bug each, which must be caught;
- a copy with two lanes' mma fragments swapped in the ISA tables must give wrong numbers: the
  execution goes through the layouts.
"""
from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch

import cuda_checks as check
import cuda_host
from cases import CASES, EXCLUDING_CASES, Case, run
from fastcl.backend import registry
from tolerances import assert_close, assert_runs_close, tol

if cuda_host.compiler() is None:
    pytest.skip(f"no C++ compiler ({cuda_host.CXX}) on PATH: the host execution cannot be built",
                allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 128 x 128 tiles: one whole tile, a column and a row past it, primes; many row tiles and splits
SHAPES = [(1, 1, 1), (3, 70, 5), (128, 128, 64), (65, 129, 8), (130, 67, 129), (257, 131, 40), (40, 1500, 48),
          (700, 90, 300), (0, 5, 8), (5, 0, 8), (4, 6, 0)]  # and empty sides: nothing launched, or no feature stage
BACKEND = "cuda-host"
_OPS_MODULE = "fastcl_cuda_host_ops"


@pytest.fixture(scope="module")
def host():
    """The tree's build; CPU tensors allocated while it runs are known to its bounds checker; a
    backend named ``cuda-host`` reaches its operators (the ``cuda`` backend's declaration, on CPU)."""
    ops = cuda_host.load()
    module = types.ModuleType(_OPS_MODULE)
    for name in ("lse_forward", "lse_backward", "lse_forward_excluding", "lse_backward_excluding", "pointwise",
                 "lse_forward_prefixes", "lse_backward_prefixes", "pointwise_prefixes"):
        setattr(module, name, getattr(ops, name))
    sys.modules[_OPS_MODULE] = module
    cuda = registry.spec("cuda")
    registry.register(registry.BackendSpec(
        name=BACKEND, label="CUDA (host execution)", devices=("cpu",), dtypes=cuda.dtypes,
        native_dtypes=cuda.native_dtypes, ops={op: registry.Op(_OPS_MODULE) for op in cuda.ops},
        summary="the cuda backend's kernels executed on the CPU (tests only)"))
    ops.track_allocations(True)
    try:
        yield check.Device(ops, lambda t: t, BACKEND)
    finally:
        ops.track_allocations(False)
        registry.unregister(BACKEND)
        del sys.modules[_OPS_MODULE]


@pytest.fixture(autouse=True)
def nothing_reported(host):
    """Every test: the checkers found nothing (a report also fails the launch, with its text)."""
    host.ops.reset_reports()
    yield
    assert host.ops.reports() == "", host.ops.reports()


# --- the operators, as on a GPU (tests/cuda_checks.py) -------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lse_forward(host, shape, keyed, dtype):
    check.lse_forward(host, shape, keyed, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sides", ["rows", "cols", "both"])
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lse_backward(host, shape, keyed, sides, dtype):
    check.lse_backward(host, shape, keyed, sides, dtype)


# Op lse_exclude: SHAPES' tile edges, and a forward whose CTAs visit two B tiles each (34 tiles of a
# few rows: at most 32 splits, plan.h split_b), where each tile's marks replace the last one's.
EXCLUDE_SHAPES = [(1, 1, 1), (3, 70, 5), (65, 129, 8), (130, 67, 129), (257, 131, 40), (5, 4225, 8), (0, 5, 8),
                  (5, 0, 8), (4, 6, 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sides", ["rows", "cols", "both"])
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
@pytest.mark.parametrize("shape", EXCLUDE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lse_excluding(host, shape, keyed, sides, dtype):
    check.lse_excluding(host, shape, keyed, sides, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_excluding_nothing_is_the_plain_op(host, dtype):
    check.excluding_nothing_is_the_plain_op(host, (65, 129, 24), dtype)


def test_excluding_in_blocks(host, monkeypatch):
    check.excluding_in_blocks(host, monkeypatch)


def test_bad_exclude_lists_are_refused(host):
    check.bad_exclude_lists_are_refused(host)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "g_row"])
@pytest.mark.parametrize("kind", [0, 1], ids=["siglip", "mw"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pointwise(host, shape, kind, weighted, dtype):
    check.pointwise(host, shape, kind, weighted, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 13], ids=["d64", "d13"])
def test_unaligned_inputs(host, dtype, d):
    check.unaligned_inputs(host, dtype, d)


def test_float16_gradient_far_below_subnormals(host):
    check.float16_gradient_far_below_subnormals(host, 256, d=64)


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_float32_inputs_follow_float32_math(host, value):
    check.infinite_float32_inputs_follow_float32_math(host, value)


def test_blocks_smaller_than_s(host, monkeypatch):
    check.blocks_smaller_than_s(host, monkeypatch)


def test_fully_keyed_lines_and_nan(host):
    check.fully_keyed_lines_and_nan(host)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_inputs(host, dtype):
    check.non_finite_inputs(host, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_finite_logits(host, dtype):
    check.huge_finite_logits(host, dtype)


@pytest.mark.parametrize("shape", [(40, 1500, 48), (700, 90, 300)], ids=["split-columns", "many-row-tiles"])
def test_bitwise_deterministic(host, shape):
    check.bitwise_deterministic(host, shape)


# Op lse_prefixes: prefixes whose segments are not whole 16-byte chunks (the host lays a copy out on
# them) or are (the caller's rows as they are: d 64 at 16, 32, 64), K = 1..5, tile edges, a feature
# stage cut by a boundary, prefixes short of D (gy past d_K stays 0), and empty sides.
PREFIX_SHAPES = [((1, 1, 1), (1,)), ((3, 17, 40), (8, 24, 40)), ((5, 64, 100), (7, 33, 64)),
                 ((65, 129, 64), (16, 32, 64)), ((130, 67, 40), (13, 40)), ((257, 131, 40), (3, 5, 16, 17, 40)),
                 ((0, 5, 8), (8,)), ((5, 0, 8), (4, 8))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sides", ["rows", "cols", "both"])
@pytest.mark.parametrize("factors", [False, True], ids=["plain", "factors"])
@pytest.mark.parametrize("shape_dims", PREFIX_SHAPES, ids=lambda s: "x".join(map(str, s[0])) + "-" +
                         "_".join(map(str, s[1])))
def test_lse_prefixes(host, shape_dims, factors, sides, dtype):
    check.lse_prefixes(host, shape_dims[0], shape_dims[1], factors, sides, dtype)


def test_lse_prefixes_in_blocks_and_splits(host, monkeypatch):
    """A tiny FASTCL_WORKSPACE_MB: 128 x 128 blocks (the budget divided by K), each block's prefix
    partials folded into the running state; then one block whose 12 column tiles are split over CTAs."""
    monkeypatch.setenv("FASTCL_WORKSPACE_MB", "0.02")
    check.lse_prefixes(host, (300, 270, 40), (9, 24, 40), True, "both", torch.bfloat16)
    monkeypatch.delenv("FASTCL_WORKSPACE_MB")
    check.lse_prefixes(host, (40, 1500, 48), (8, 48), False, "both", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_lse_prefixes_beyond_one_launch(host, dtype):
    """K = 18 > kMaxPrefixes (16): two launches per block, the second from feature 0 (its first segment
    [0, d_17)), their gradients added into the same features; segments of 3 and 4 features."""
    check.lse_prefixes(host, (70, 90, 72), tuple(range(3, 48, 3)) + (68, 72), True, "both", dtype)


def test_lse_prefixes_float16_gradient_far_below_subnormals(host):
    """Upstream gradients 1e-9: G^q ~ 1e-11, far below float16's subnormals; the power-of-two scale,
    which covers every suffix sum of the K slots, keeps it."""
    check.lse_prefixes(host, (65, 70, 24), (8, 16, 24), True, "both", torch.float16, g_size=1e-9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lse_prefixes_bitwise_deterministic(host, dtype):
    first = check.lse_prefixes(host, (130, 200, 40), (13, 40), True, "both", dtype)
    again = check.lse_prefixes(host, (130, 200, 40), (13, 40), True, "both", dtype)
    for a, b in zip([*first[0], *first[1]], [*again[0], *again[1]]):
        assert torch.equal(a, b)


def test_lse_prefixes_one_prefix_is_the_plain_lse(host):
    """K = 1 at d_1 = D, no factors: the plain op's statistics (to rounding: another kernel)."""
    x, y, _ = check.inputs(65, 129, 40, torch.float16, False)
    plain = host.ops.lse_forward(x, y, torch.tensor(1.1), None, None, True, True)
    got = host.ops.lse_forward_prefixes(x, y, torch.tensor(1.1), [40], None, None, True, True)
    for a, b in zip(got, plain):
        assert_close(a[0], b, tol("cuda statistics", torch.float16), "K = 1")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefixes_from_an_offset_base_pointer(host, dtype):
    """x at buf[1:] (not 16-byte aligned) with every d_k whole chunks: the plain aligned copy serves
    (no segment layout), and both prefix ops give what the aligned x gives."""
    x, y, _ = check.inputs(70, 90, 64, dtype, False)
    buf = torch.empty(70 * 64 + 1, dtype=dtype)
    xs = buf[1:].view(70, 64).copy_(x)
    assert xs.data_ptr() % 16 != 0
    rs, cs = check.prefix_factors(2, 70, 90)
    args = (torch.tensor(1.1), [32, 64], rs, cs)
    for a, b in zip(host.ops.lse_forward_prefixes(xs, y, *args, True, True),
                    host.ops.lse_forward_prefixes(x, y, *args, True, True)):
        assert torch.equal(a, b)
    bias = torch.randn(70)
    for a, b in zip(host.ops.pointwise_prefixes(xs, y, torch.tensor(1.1), bias, [32, 64], rs, cs, None, None, 0, None,
                                                True),
                    host.ops.pointwise_prefixes(x, y, torch.tensor(1.1), bias, [32, 64], rs, cs, None, None, 0, None,
                                                True)):
        assert torch.equal(a, b)


def test_lse_prefixes_refuses_bad_arguments(host):
    x, y, _ = check.inputs(6, 5, 8, torch.float32, False)
    args = (x, y, torch.tensor(1.0))
    for dims, factors, message in (([], (None, None), "at least one prefix"), ([4, 4], (None, None), "increase"),
                                   ([9], (None, None), "increase strictly"),
                                   ([4, 8], (torch.ones(2, 6), None), "both row_scale and col_scale"),
                                   ([4, 8], (torch.ones(1, 6), torch.ones(1, 5)), r"row_scale must be a \[2, 6\]")):
        with pytest.raises(RuntimeError, match=message):
            host.ops.lse_forward_prefixes(*args, dims, *factors, True, True)


# Op pointwise_prefixes (Matryoshka SigLIP / MW): the same prefixes, with and without keys, factors
# and per-prefix row weights; each case also asks for the loss alone.
POINTWISE_PREFIX_OPTIONS = [(0, True, True, True), (0, False, False, False), (1, True, True, False),
                            (1, False, False, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", POINTWISE_PREFIX_OPTIONS,
                         ids=lambda o: f"{'siglip' if o[0] == 0 else 'mw'}-{'w' if o[1] else 'unweighted'}-"
                                       f"{'keyed' if o[2] else 'unkeyed'}-{'factors' if o[3] else 'plain'}")
@pytest.mark.parametrize("shape_dims", PREFIX_SHAPES, ids=lambda s: "x".join(map(str, s[0])) + "-" +
                         "_".join(map(str, s[1])))
def test_pointwise_prefixes(host, shape_dims, options, dtype):
    kind, weighted, keyed, factors = options
    check.pointwise_prefixes(host, shape_dims[0], shape_dims[1], factors, kind, weighted, keyed, dtype)


def test_pointwise_prefixes_in_blocks_and_beyond_one_launch(host, monkeypatch):
    """Several blocks (a tiny budget) and K = 17 (two launches per block): the loss's and G's row sums
    of the second group added to the first's."""
    monkeypatch.setenv("FASTCL_WORKSPACE_MB", "0.02")
    check.pointwise_prefixes(host, (300, 270, 40), (9, 24, 40), True, 0, True, True, torch.bfloat16)
    check.pointwise_prefixes(host, (70, 90, 72), tuple(range(3, 48, 3)) + (68, 72), True, 1, True, True,
                             torch.float16)


def test_pointwise_prefixes_float16_gradient_far_below_subnormals(host):
    """Row weights 1e-9: G^q far below float16's subnormals, kept by the power-of-two scale."""
    check.pointwise_prefixes(host, (65, 70, 24), (8, 16, 24), True, 0, True, True, torch.float16, g_size=1e-9)


# --- every loss through the kernels ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_loss_matches_reference(host, case: Case, dtype):
    got = run(case, BACKEND, dtype)
    want = run(case, "reference", dtype, in_float64=True)
    assert_runs_close(got, want, tol("low precision", dtype), f"cuda (host execution) {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", EXCLUDING_CASES, ids=lambda c: c.id)
def test_excluding_loss_matches_reference(host, case: Case, dtype):
    """Decoupled positives and GISTEmbed's guide (op lse_exclude) through the kernels."""
    got = run(case, BACKEND, dtype)
    want = run(case, "reference", dtype, in_float64=True)
    assert_runs_close(got, want, tol("low precision", dtype), f"cuda (host execution) {dtype}")


# --- what ran ----------------------------------------------------------------------------------------

# Every kernel of csrc/cuda: the tile kernels per input type (and gradient kind), and launch.cu's own.
VARIANTS = sorted([f"lse_forward_kernel<T> [with T = {t}]" for t in ("float", "__half", "__nv_bfloat16")]
                  + [f"pair_grad_kernel<T, kKind> [with T = {t}; GradKind kKind = fastcl::cuda::GradKind::{k}]"
                     for t in ("float", "__half", "__nv_bfloat16") for k in ("kLse", "kSigLip", "kMW")]
                  + [f"lse_prefixes_forward_kernel<T> [with T = {t}]" for t in ("float", "__half", "__nv_bfloat16")]
                  + [f"prefix_grad_kernel<T, kKind> [with T = {t}; GradKind kKind = fastcl::cuda::GradKind::{k}]"
                     for t in ("float", "__half", "__nv_bfloat16") for k in ("kLse", "kSigLip", "kMW")]
                  + ["fold_lse_kernel", "finish_lse_kernel", "grad_scale_kernel"])


def test_every_kernel_variant_runs(host):
    """One small call per input type reaches all 27 kernel variants (the report names each)."""
    for dtype in DTYPES:
        check.lse_prefixes(host, (3, 70, 16), (8, 16), True, "both", dtype)
        for kind in (0, 1):
            check.pointwise_prefixes(host, (3, 70, 16), (8, 16), True, kind, True, True, dtype)
        check.lse_backward(host, (3, 70, 16), True, "both", dtype)
        for kind in (0, 1):
            check.pointwise(host, (3, 70, 16), kind, True, dtype)
        check.lse_forward(host, (3, 70, 16), True, dtype)
    assert sorted(host.ops.variants().splitlines()) == VARIANTS


# --- the checkers catch what they are for: one planted bug per copy of the tree --------------------------

@contextlib.contextmanager
def planted(host, mutations):
    """A build of a copy of the tree with ``mutations``, tracking the allocations made inside."""
    ops = cuda_host.load(mutations=mutations)
    host.ops.track_allocations(False)
    ops.track_allocations(True)
    ops.reset_reports()
    try:
        yield check.Device(ops, lambda t: t, BACKEND)
    finally:
        ops.track_allocations(False)
        host.ops.track_allocations(True)


def _lse(dev, shape, dtype):
    x, y, _ = check.inputs(*shape, dtype, False)
    return dev.ops.lse_forward(x, y, torch.tensor(1.3), None, None, True, True)


def _caught(dev, kind, shape=(65, 70, 136), dtype=torch.float16):
    """A 16-bit forward over 5 feature stages (every pipeline stage in use, a partial last one)."""
    with pytest.raises(RuntimeError, match=f"checkers reported:\n{kind}: "):
        _lse(dev, shape, dtype)
    assert dev.ops.report_count(kind) > 0, dev.ops.reports()
    return dev.ops.reports()


def test_missing_syncthreads_is_a_race(host):
    """The barrier before refilling a stage removed: a warp's cp.async overwrites a stage that other
    warps still read (and reads a stage before the others' copies have landed)."""
    edit = {"tile.cuh": [("    __syncthreads();               // ... for every thread, and every warp is done",
                          "    // (planted) no barrier: ... for every thread, and every warp is done")]}
    with planted(host, edit) as dev:
        text = _caught(dev, "race")
    assert "barrier epoch" in text


def test_early_wait_group_reads_a_copy_in_flight(host):
    """wait_group one group too few: stage kt is read while its cp.async has not landed."""
    edit = {"tile.cuh": [("cp_async_wait<kStages - 2>();", "cp_async_wait<kStages - 1>();")]}
    with planted(host, edit) as dev:
        text = _caught(dev, "cp.async")
    assert "in flight" in text


def test_global_overrun_is_caught(host):
    """The tile load's row bound off by one: the row past A's end is read (from the red zone)."""
    edit = {"mma.cuh": [("const bool ok = row0 + row < rows;", "const bool ok = row0 + row <= rows;")]}
    with planted(host, edit) as dev:
        text = _caught(dev, "global bounds")
    assert "past its end" in text


def test_shared_overrun_is_caught(host):
    """B's stages placed one stage too far: the last one lies past the launch's dynamic shared memory."""
    edit = {"tile.cuh": [("T* b_stages = smem + kStages * kStage;", "T* b_stages = smem + (kStages + 1) * kStage;")]}
    with planted(host, edit) as dev:
        text = _caught(dev, "shared bounds")
    assert "past the launch's" in text


def test_listed_bits_rewritten_under_a_reader_is_a_race(host):
    """The barrier before a tile's listed pairs are marked removed: with two B tiles per CTA, a row's
    owner marks the second tile's pairs while other warps still read the first's (rows only: the
    column statistics' own barriers would order them)."""
    edit = {"lse_forward.cuh": [("      __syncthreads();  // every warp is done with the previous tile's bits",
                                 "      // (planted) no barrier: every warp is done with the previous tile's bits")]}
    with planted(host, edit) as dev:  # inputs made inside: the copy's allocations are the ones it knows
        x, y, _ = check.inputs(5, 4225, 8, torch.float16, False)
        listed = check.listed_columns(5, 4225, 4)
        with pytest.raises(RuntimeError, match="checkers reported:\nrace: "):
            dev.ops.lse_forward_excluding(x, y, torch.tensor(1.0), None, None, listed, True, False)
        assert "barrier epoch" in dev.ops.reports()


def test_prefix_column_factors_rewritten_under_a_reader_is_a_race(host):
    """Op lse_prefixes: the barrier before a tile's column factors are written removed; with two B
    tiles per CTA (34 tiles, at most 32 splits) a thread writes the second tile's factors while other
    warps still read the first's in the row pass."""
    barrier = "__syncthreads();  // every warp is done with the previous tile's column factors"
    edit = {"prefixes.cuh": [(barrier, "// (planted) no barrier")]}
    with planted(host, edit) as dev:
        x, y, _ = check.inputs(5, 4225, 8, torch.float16, False)
        rs, cs = check.prefix_factors(2, 5, 4225)
        with pytest.raises(RuntimeError, match="checkers reported:\nrace: "):
            dev.ops.lse_forward_prefixes(x, y, torch.tensor(1.0), [4, 8], rs, cs, True, False)
        assert "barrier epoch" in dev.ops.reports()


def test_prefix_segment_early_wait_group_reads_a_copy_in_flight(host):
    """The segment-ranged main loop (tile.cuh sgemm_tile_add) waits one group too few: a stage is read
    while its cp.async has not landed."""
    edit = {"tile.cuh": [("cp_async_wait<kInFlight>();", "cp_async_wait<kInFlight + 1>();")]}
    with planted(host, edit) as dev:
        x, y, _ = check.inputs(65, 70, 136, torch.float16, False)
        with pytest.raises(RuntimeError, match="checkers reported:\ncp.async: "):
            dev.ops.lse_forward_prefixes(x, y, torch.tensor(1.3), [40, 136], None, None, True, True)
        assert "in flight" in dev.ops.reports()


def test_pointwise_prefixes_in_four_row_parts(host):
    """sm_90a's split of the 16-bit pointwise epilogue (four row parts, prefix_grad.cuh kPointwiseParts16;
    this build, like sm_80, takes two): a copy of the tree with four gives the same numbers."""
    edit = {"prefix_grad.cuh": [("constexpr int kPointwiseParts16 = 2;", "constexpr int kPointwiseParts16 = 4;")]}
    with planted(host, edit) as dev:
        for dtype in (torch.float16, torch.bfloat16):
            check.pointwise_prefixes(dev, (130, 67, 40), (13, 40), True, 0, True, True, dtype)
            check.pointwise_prefixes(dev, (65, 129, 64), (16, 32, 64), False, 1, False, True, dtype)
        assert dev.ops.reports() == ""


def test_prefix_suffix_sums_left_out_give_wrong_gradients(host):
    """The kernel's suffix sums of the K H slots skipped: segment q's GEMMs then see H^q alone, and
    the gradients must come out wrong (the checks see the math, not only the checkers)."""
    edit = {"prefix_grad.cuh": [("if (g_blocks != nullptr && prefixes > 1) {", "if (false) {")]}
    with planted(host, edit) as dev, pytest.raises(AssertionError, match="H\\^q @ y by segment"):
        check.lse_prefixes(dev, (65, 70, 24), (8, 16, 24), True, "both", torch.float16)


def test_uninitialised_shared_read_is_caught(host):
    """Warp 0's column sums never stored: the column reduction reads shared bytes nobody wrote."""
    edit = {"lse_forward.cuh": [("if (g == 0) red_sum[warp_m][col] = sum;",
                                 "if (g == 0 && warp_m > 0) red_sum[warp_m][col] = sum;")]}
    with planted(host, edit) as dev:
        text = _caught(dev, "uninitialised")
    assert "never written" in text


def test_launch_over_48_kib_without_opting_in_fails(host):
    """The tiles take more than the 48 KiB of dynamic shared memory a launch gets by default: without
    cudaFuncSetAttribute first, the launch fails (as on a GPU), and the op says so."""
    edit = {"lse_forward.cuh": [("const cudaError_t err = allow_tile_smem<T>(lse_forward_kernel<T>);",
                                 "const cudaError_t err = cudaSuccess;  // (planted) no opt-in")]}
    with planted(host, edit) as dev:
        with pytest.raises(RuntimeError, match="invalid argument"):
            _lse(dev, (65, 70, 136), torch.float16)


def test_swapped_fragment_lanes_give_wrong_numbers(host):
    """Lanes 5 and 6 exchange their A fragments in the m16n8k16 table (host/ptx.cpp): the float16
    forward must come out wrong, with nothing for the checkers to see. The tables are really used."""
    edit = {"host/ptx.cpp": [("Coord a_16bit(int lane, int i) {\n",
                              "Coord a_16bit(int lane, int i) {\n  lane = lane == 5 ? 6 : lane == 6 ? 5 : lane;\n")]}
    shape = (65, 70, 136)
    x, y, _ = check.inputs(*shape, torch.float16, False)
    s = 1.3 * x.double() @ y.double().T
    with planted(host, edit) as dev:
        row, col = _lse(dev, shape, torch.float16)
        assert dev.ops.reports() == ""
    with pytest.raises(AssertionError):
        assert_close(row, s.logsumexp(1), tol("cuda statistics", torch.float16), "row lse")
    row, _ = _lse(host, shape, torch.float16)  # the tree's own tables: right
    assert_close(row, s.logsumexp(1), tol("cuda statistics", torch.float16), "row lse")
