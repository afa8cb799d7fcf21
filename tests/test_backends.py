"""Every loss on every engine backend against ``reference``: values and every gradient.

Backends are generated from what ``fastcl.backends("cpu")`` declares, so a new backend is tested
as soon as it can run here. ``tiles`` shrinks the chunked engine's tiles so that these small shapes
cross tile boundaries with ragged tails in both directions.
"""
from __future__ import annotations

import pytest
import torch

import fastcl
from cases import CASES, Case, leaves, map_tensors, run
from fastcl.backend.chunked import tiles as chunked_tiles
from tolerances import GRADCHECK, assert_runs_close, tol

ENGINES = [b for b in fastcl.backends("cpu") if b != "reference"]


@pytest.fixture(params=["default", "tiny"], ids=["tiles=default", "tiles=tiny"])
def tiles(request, monkeypatch):
    if request.param == "tiny":
        monkeypatch.setattr(chunked_tiles, "MAX_TILE_COLS", 5)
        monkeypatch.setattr(chunked_tiles, "TILE_ELEMENTS", 15)  # 3 x 5 tiles
    return request.param


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_float64_matches_reference(case: Case, backend: str, tiles):
    want = run(case, "reference", torch.float64)
    got = run(case, backend, torch.float64)
    assert_runs_close(got, want, tol("float64"), f"{backend} vs reference")


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """Same values, other strides."""
    if t.is_floating_point() and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_noncontiguous_inputs(case: Case, backend: str):
    want = run(case, "reference", torch.float64)
    got = run(case, backend, torch.float64, transform=_column_major)
    assert_runs_close(got, want, tol("float64"), f"{backend} on transposed strides")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_low_precision_against_float64(case: Case, backend: str, dtype):
    """Outputs and gradients come back in the input dtype, within the "low precision" tolerance (in
    norm) of the float64 reference evaluated on the same rounded inputs."""
    out, grads = run(case, backend, dtype)
    assert out.dtype == dtype
    assert_runs_close((out, grads), run(case, "reference", dtype, in_float64=True), tol("low precision", dtype),
                      f"{backend} {dtype}")


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("case", [c for c in CASES if c.gradcheck], ids=lambda c: c.id)
def test_gradcheck(case: Case, backend: str, monkeypatch):
    monkeypatch.setattr(chunked_tiles, "MAX_TILE_COLS", 7)
    monkeypatch.setattr(chunked_tiles, "TILE_ELEMENTS", 21)  # 3 x 7 tiles
    args, kwargs = case.inputs(torch.float64)
    grad_leaves = leaves(args, kwargs)

    def f(*values):
        swap = dict(zip(map(id, grad_leaves), values))
        a, kw = map_tensors((args, kwargs), lambda t: swap.get(id(t), t))
        return case.fn(*a, backend=backend, **kw)

    assert torch.autograd.gradcheck(f, tuple(grad_leaves), **GRADCHECK)
