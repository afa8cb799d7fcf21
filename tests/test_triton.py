"""The ``triton`` backend: its three kernels against the ``chunked`` ones (the executable statement of
the algorithm, infinities and NaN included), every loss against ``reference``, repeat runs bitwise equal.

Where the matrix runs (the ``target`` parameter):
- ``interpreter``: CPU tensors under Triton's interpreter. It is process-global, must be on before
  Triton is imported, and slow (each program step costs milliseconds), so the ordinary session
  does not switch it on: that would add triton to every test of test_backends.py, whose gradchecks
  alone would take tens of minutes. ``test_interpreter_session`` reruns this file in a child pytest
  with TRITON_INTERPRET=1 instead; only there do the ``interpreter`` parameters exist.
- ``cuda``: CUDA tensors, ``gpu`` marker, skipped with the reason where there is no GPU or Triton.

Declared reductions against test_backends.py: no gradcheck (a numerical Jacobian needs two forward
runs per input element: minutes under the interpreter; the float64 comparison checks every gradient
against autograd through the reference instead), no transposed-strides case and one tile setting
(both act on the primitives layer, which makes inputs contiguous before any kernel sees them, and
which test_backends.py covers with the other engines).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import fastcl
import sessions
from cases import CASES, EXCLUDING_CASES, Case, run
from fastcl.backend.triton.versions import triton_limits
from sessions import INTERPRETED, skip_unless_triton_runs
from tolerances import assert_close, assert_runs_close, tol

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU here (torch.cuda.is_available() is False)"
    if INTERPRETED:
        return "TRITON_INTERPRET is set: Triton would interpret, not compile, the CUDA kernels"
    return None if "triton" in fastcl.backends("cuda") else f"triton cannot run on CUDA here: {_reasons('cuda')}"


def _reasons(device: str) -> str:
    from fastcl.backend import not_supported_reasons

    return "; ".join(not_supported_reasons("triton", torch.device(device), torch.float32))


_CUDA_SKIP = _cuda_skip_reason()
# The kernels are checked in float64 where the installed Triton has float64 dots (>= 3.5: see
# fastcl/backend/triton/versions.py), else in float32; float64-only tests then skip, naming the limit.
FLOAT64_LIMIT = triton_limits("engine", torch.float64, compiled=False) if HAS_TRITON else None
EXACT = torch.float32 if FLOAT64_LIMIT else torch.float64
TARGETS = ([pytest.param("cpu", id="interpreter")] if INTERPRETED else []) + [
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(_CUDA_SKIP is not None,
                                                                               reason=str(_CUDA_SKIP))])]


def _on(target: str):
    return None if target == "cpu" else (lambda t: t.cuda())


# --- the losses ---------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_float64_matches_reference(case: Case, target):
    skip_unless_triton_runs(torch.float64, target)
    want = run(case, "reference", torch.float64)
    got = run(case, "triton", torch.float64, transform=_on(target))
    assert_runs_close(got, want, tol("float64"), "triton vs reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_low_precision_against_float64(case: Case, target, dtype):
    """As in test_backends.py: outputs in the input dtype, within the dtype's tolerance (in norm)
    of the float64 reference on the same rounded inputs (the interpreter computes exactly; a GPU's
    float32 tiles do not: tolerances.py)."""
    out, grads = run(case, "triton", dtype, transform=_on(target))
    assert out.dtype == dtype
    assert_runs_close((out, grads), run(case, "reference", dtype, in_float64=True),
                      tol("low precision" if target == "cpu" else "low precision triton gpu", dtype), f"triton {dtype}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", EXCLUDING_CASES, ids=lambda c: c.id)
def test_listed_pairs_left_out_match_reference(case: Case, target, dtype):
    """Decoupled positives and GISTEmbed's guide (op lse_exclude): float64 against the reference,
    float32 against the reference on the same rounded inputs in float64."""
    skip_unless_triton_runs(dtype, target)
    got = run(case, "triton", dtype, transform=_on(target))
    if dtype == torch.float64:
        assert_runs_close(got, run(case, "reference", dtype), tol("float64"), "triton vs reference")
    else:
        assert_runs_close(got, run(case, "reference", dtype, in_float64=True),
                          tol("low precision" if target == "cpu" else "low precision triton gpu", dtype),
                          f"triton {dtype}")


REPEATED = [c for c in CASES if "many-tiles" in c.shapes]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", REPEATED, ids=lambda c: c.id)
def test_repeated_runs_are_bitwise_equal(case: Case, target):
    """No atomics and fixed merge orders: on a GPU, where programs race, results still do not move."""
    first_out, first_grads = run(case, "triton", torch.float32, transform=_on(target))
    for _ in range(2):
        out, grads = run(case, "triton", torch.float32, transform=_on(target))
        assert torch.equal(out, first_out)
        for g, f in zip(grads, first_grads):
            assert (g is None and f is None) or torch.equal(g, f)


# --- the kernels against chunked's ----------------------------------------------------------------
# (M, N, D): one element; ragged tails in both directions; D not a multiple of 16 (padded features),
# several feature blocks of the S GEMM and of the gradient GEMMs' columns (D = 300). The interpreter's
# tiles are 256 x 256 (fastcl/backend/triton/plan.py), so tiles and blocks split only in the tests below.
SHAPES = [(1, 1, 1), (70, 130, 5), (130, 67, 300)]


def _problem(m, n, d, dtype, keyed, device, poison=False):
    gen = torch.Generator().manual_seed(m * 7 + n * 3 + d)
    x, y = torch.randn(m, d, generator=gen, dtype=torch.float64), torch.randn(n, d, generator=gen, dtype=torch.float64)
    if poison and m > 9 and n > 7:  # an infinite row, a NaN row, a -inf column, one +inf feature
        x[3], x[5], y[7], x[9, 0] = float("inf"), float("nan"), float("-inf"), float("inf")
    keys = (torch.randint(0, 4, (m,), generator=gen), torch.randint(0, 4, (n,), generator=gen)) if keyed else None
    if keyed:  # 1 x 1: a fully keyed row and column (lse -inf); otherwise also a row without keyed pairs
        keys[0][0] = keys[1][0]
        keys[0][-1] = 99 if m > 1 else keys[0][-1]
    g_row, g_col = torch.rand(m, generator=gen, dtype=torch.float64), torch.rand(n, generator=gen, dtype=torch.float64)
    bias = torch.randn(m, generator=gen, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    feats = [t.to(dtype).to(device) for t in (x, y)]
    vectors = [t.to(acc).to(device) for t in (g_row, g_col, bias)]
    scale = torch.tensor(1.7, dtype=acc, device=device)
    keys = (None, None) if keys is None else tuple(k.to(device) for k in keys)
    return (*feats, scale, *keys, *vectors)


def _kernel_calls(kernels, x, y, scale, row_keys, col_keys, g_row, g_col, bias):
    """Every kernel in every mode; lse_backward takes the shifts of chunked's forward."""
    from fastcl.backend.primitives.shared import _finite_shift

    for rows, cols in [(True, True), (True, False), (False, True)]:
        row_lse, col_lse = kernels.lse_forward(x, y, scale, row_keys, col_keys, rows, cols)
        yield f"lse_forward rows={rows} cols={cols}", (row_lse, col_lse)
        shifts = [_finite_shift(v).to(device=x.device, dtype=scale.dtype)
                  for v in _chunked_stats(x, y, scale, row_keys, col_keys, rows, cols)]
        g = (g_row if rows else g_row[:0], g_col if cols else g_col[:0])
        yield f"lse_backward rows={rows} cols={cols}", kernels.lse_backward(
            x, y, scale, row_keys, col_keys, *shifts, *g, rows, cols)
    for kind in (0, 1):
        yield f"pointwise kind={kind}", kernels.pointwise(x, y, scale, bias, row_keys, col_keys, kind, None, True)
        yield f"pointwise kind={kind} weighted", kernels.pointwise(x, y, scale, None, row_keys, col_keys, kind, g_row,
                                                                   True)
        yield f"pointwise kind={kind} loss only", kernels.pointwise(x, y, scale, bias, row_keys, col_keys, kind, None,
                                                                    False)


def _chunked_stats(x, y, scale, row_keys, col_keys, rows, cols, exclude=None):
    from fastcl.backend.chunked import lse

    return lse.lse_forward(*(t.cpu().double() for t in (x, y, scale)), _cpu(row_keys), _cpu(col_keys), rows, cols,
                           _cpu(exclude))


def _exclude_list(m, n, width, device):
    """[m, width] listed columns: -1 padding, a repeat, the last column, columns anywhere in [0, n)
    (other tiles and blocks than the row's own), a row with nothing listed."""
    gen = torch.Generator().manual_seed(m * 5 + n)
    listed = torch.randint(-1, n, (m, width), generator=gen)
    listed[:, 1] = listed[:, 0]  # duplicates count once
    listed[1::3, 2:] = -1  # padding
    listed[0] = -1
    listed[-1, -1] = n - 1
    return listed.to(device)


def _excluding_calls(kernels, exclude, x, y, scale, row_keys, col_keys, g_row, g_col, bias):
    """lse_forward_excluding and lse_backward_excluding in every mode, the backward with the shifts
    of chunked's forward."""
    from fastcl.backend.primitives.shared import _finite_shift

    del bias
    for rows, cols in [(True, True), (True, False), (False, True)]:
        got = kernels.lse_forward_excluding(x, y, scale, row_keys, col_keys, exclude, rows, cols)
        yield f"lse_forward_excluding rows={rows} cols={cols}", got
        shifts = [_finite_shift(v).to(device=x.device, dtype=scale.dtype)
                  for v in _chunked_stats(x, y, scale, row_keys, col_keys, rows, cols, exclude)]
        g = (g_row if rows else g_row[:0], g_col if cols else g_col[:0])
        yield f"lse_backward_excluding rows={rows} cols={cols}", kernels.lse_backward_excluding(
            x, y, scale, row_keys, col_keys, exclude, *shifts, *g, rows, cols)


def _check_excluding_kernels(shape, keyed, dtype, target, width=5):
    from fastcl.backend import engine

    m, n, d = shape
    problem = _problem(m, n, d, dtype, keyed, target)
    exclude = _exclude_list(m, n, width, target)
    wide = [t.cpu().double() for t in problem[:3]] + [_cpu(k) for k in problem[3:5]] + \
        [t.cpu().double() for t in problem[5:]]
    within = tol("triton kernels" if target == "cpu" else "triton kernels gpu", dtype)
    if dtype == torch.float32:
        within = within * max(1.0, (d / 16) ** 0.5)
    got = _excluding_calls(engine("triton").kernels, exclude, *problem)
    want = _excluding_calls(engine("chunked").kernels, exclude.cpu(), *wide)
    for (what, a), (_, b) in zip(got, want):
        for i, (u, v) in enumerate(zip(a, b)):
            assert_close(u, v, within, f"{what}, output {i}", equal_nan=True)


def _cpu(t):
    return None if t is None else t.cpu()


def _reference_calls(x, y, scale, row_keys, col_keys, g_row, g_col, bias):
    """The same calls on chunked's kernels, in float64 on the CPU."""
    from fastcl.backend import engine

    wide = [t.cpu().double() for t in (x, y, scale, g_row, g_col, bias)]
    x, y, scale, g_row, g_col, bias = wide
    return _kernel_calls(engine("chunked").kernels, x, y, scale, _cpu(row_keys), _cpu(col_keys), g_row, g_col, bias)


def _check_kernels(shape, keyed, dtype, target, poison=False):
    from fastcl.backend import engine

    problem = _problem(*shape, dtype, keyed, target, poison)
    within = tol("triton kernels" if target == "cpu" else "triton kernels gpu", dtype)
    if dtype == torch.float32:  # float32 round-off of a length-D dot grows like sqrt(D)
        within = within * max(1.0, (shape[2] / 16) ** 0.5)
    for (what, got), (_, want) in zip(_kernel_calls(engine("triton").kernels, *problem), _reference_calls(*problem)):
        for i, (a, b) in enumerate(zip(got, want)):
            # infinities and NaN in the same places, finite values within the tolerance in norm
            assert_close(a, b, within, f"{what}, output {i}", equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_chunked(shape, target, keyed, dtype):
    skip_unless_triton_runs(dtype, target)
    if shape[2] > 100 and target == "cpu" and (dtype != EXACT or not keyed):
        pytest.skip(f"the interpreter checks the wide-D chunking once, keyed in {EXACT}: each call takes seconds there")
    _check_kernels(shape, keyed, dtype, target)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", [(37, 70, 5), (70, 37, 20)], ids=lambda s: "x".join(map(str, s)))
def test_excluding_kernels_match_chunked(shape, target, keyed, dtype):
    """Op lse_exclude: each row's listed columns (-1 padding, repeats, columns past the tile's) left
    out of the statistics and the gradients, as chunked's kernels leave them out."""
    skip_unless_triton_runs(dtype, target)
    _check_excluding_kernels(shape, keyed, dtype, target)


@pytest.mark.parametrize("target", TARGETS)
def test_excluding_kernels_with_an_empty_list_are_the_plain_ones(target):
    """No columns, or only padding: bitwise the plain kernels (one compiled kernel serves both)."""
    from fastcl.backend import engine
    from fastcl.backend.primitives.shared import _finite_shift

    x, y, scale, row_keys, col_keys, g_row, g_col, _ = _problem(37, 70, 5, EXACT, True, target)
    kernels = engine("triton").kernels
    empty = torch.empty(37, 0, dtype=torch.int64, device=x.device)
    padding = torch.full((37, 3), -1, dtype=torch.int64, device=x.device)
    plain = kernels.lse_forward(x, y, scale, row_keys, col_keys, True, True)
    for listed in (empty, padding):
        got = kernels.lse_forward_excluding(x, y, scale, row_keys, col_keys, listed, True, True)
        assert all(torch.equal(a, b) for a, b in zip(got, plain))
        shifts = [_finite_shift(v) for v in plain]
        want = kernels.lse_backward(x, y, scale, row_keys, col_keys, *shifts, g_row, g_col, True, True)
        got = kernels.lse_backward_excluding(x, y, scale, row_keys, col_keys, listed, *shifts, g_row, g_col, True,
                                             True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("target", TARGETS)
def test_excluding_kernels_match_chunked_across_workspace_blocks(target, monkeypatch):
    """Listed columns in other blocks than the row's own (3 x 2 blocks, as below)."""
    monkeypatch.setenv("FASTCL_WORKSPACE_MB", "0.001")
    _check_excluding_kernels((520, 300, 20), True, EXACT, target, width=7)


@pytest.mark.parametrize("target", TARGETS)
def test_kernels_match_chunked_across_workspace_blocks(target, monkeypatch):
    """A workspace budget far below one block: S is cut into the smallest blocks (256 x 256 under
    the interpreter, 128 x 128 on a GPU), 3 x 2 of them here, so every statistic merges across
    blocks and every gradient accumulates across them."""
    monkeypatch.setenv("FASTCL_WORKSPACE_MB", "0.001")
    _check_kernels((520, 300, 20), True, EXACT, target)


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
@pytest.mark.parametrize("target", TARGETS)
def test_kernels_propagate_infinities_and_nan_like_chunked(target, keyed):
    """An infinite maximum shifts by 0 (all -inf lines give -inf, +inf gives +inf), NaN propagates:
    the same values in the same places as csrc/cpu/tile_math.h and chunked."""
    _check_kernels((70, 130, 5), keyed, EXACT, target, poison=True)


@pytest.mark.parametrize("target", TARGETS)
def test_kernels_are_bitwise_deterministic(target):
    from fastcl.backend import engine

    problem = _problem(130, 150, 40, torch.float32, True, target)
    kernels = engine("triton").kernels
    first = list(_kernel_calls(kernels, *problem))
    for (what, a), (_, b) in zip(first, _kernel_calls(kernels, *problem)):
        assert all(torch.equal(u, v) for u, v in zip(a, b)), what


def test_workspace_budget_is_validated(monkeypatch):
    from fastcl.backend.triton import plan

    monkeypatch.delenv("FASTCL_WORKSPACE_MB", raising=False)
    assert plan.workspace_budget() == plan.DEFAULT_WORKSPACE_MB << 20
    monkeypatch.setenv("FASTCL_WORKSPACE_MB", "0.5")
    assert plan.workspace_budget() == 1 << 19
    for bad in ("0", "-3", "lots", "inf"):
        monkeypatch.setenv("FASTCL_WORKSPACE_MB", bad)
        with pytest.raises(ValueError, match="FASTCL_WORKSPACE_MB"):
            plan.workspace_budget()


# --- wiring ---------------------------------------------------------------------------------------

def test_import_fastcl_does_not_import_triton():
    code = ("import sys, fastcl; fastcl.backends('cpu'); fastcl.info(); "
            "assert 'triton' not in sys.modules, 'fastcl imported triton'")
    for interpret in ("0", "1"):
        env = {**os.environ, "TRITON_INTERPRET": interpret}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]


def test_dispatch_declares_the_interpreter():
    if INTERPRETED:
        assert ("triton" in fastcl.backends("cpu")) == HAS_TRITON
    else:
        assert "triton" not in fastcl.backends("cpu")
        assert "TRITON_INTERPRET=1" in _reasons("cpu")
    assert fastcl.info()["devices"]["cpu"]["auto"] == "cpu"  # never triton on CPU, even interpreted


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter session itself")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_interpreter_session():
    """This file's ``interpreter`` matrix, in a child pytest with TRITON_INTERPRET=1 (about a minute)."""
    sessions.interpreter_session(__file__, "-m", "not gpu")
