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

ENGINES = [b for b in fastcl.backends("cpu") if b != "reference"]

# Relative error (in norm) allowed against the float64 reference, for inputs rounded to the dtype.
# fp32 math with outputs rounded to 8 (bf16) or 11 (fp16) mantissa bits.
LOW_PRECISION_TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 2e-5}


@pytest.fixture(params=["default", "tiny"], ids=["tiles=default", "tiles=tiny"])
def tiles(request, monkeypatch):
    if request.param == "tiny":
        monkeypatch.setattr(chunked_tiles, "MAX_TILE_COLS", 5)
        monkeypatch.setattr(chunked_tiles, "TILE_ELEMENTS", 15)  # 3 x 5 tiles
    return request.param


def assert_matches(got, want, *, rtol, atol, what):
    out, grads = got
    ref_out, ref_grads = want
    _close(out, ref_out, rtol, atol, f"{what}: loss")
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert (g is None) == (r is None), f"{what}: gradient {i} present in only one of them"
        if g is not None:
            _close(g, r, rtol, atol, f"{what}: gradient {i}")


def _close(a, b, rtol, atol, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    a, b = a.double(), b.double()
    err = (a - b).abs()
    bound = atol + rtol * b.abs()
    if not bool((err <= bound).all()):
        worst = int((err - bound).argmax())
        raise AssertionError(f"{what}: max error {err.max().item():.3g} at flat index {worst} "
                             f"(got {a.flatten()[worst].item():.12g}, want {b.flatten()[worst].item():.12g})")


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_float64_matches_reference(case: Case, backend: str, tiles):
    want = run(case, "reference", torch.float64)
    got = run(case, backend, torch.float64)
    assert_matches(got, want, rtol=1e-9, atol=1e-11, what=f"{backend} vs reference")


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
    assert_matches(got, want, rtol=1e-9, atol=1e-11, what=f"{backend} on transposed strides")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_low_precision_against_float64(case: Case, backend: str, dtype):
    """Outputs and gradients come back in the input dtype, within LOW_PRECISION_TOL (in norm) of the
    float64 reference evaluated on the same rounded inputs."""
    out, grads = run(case, backend, dtype)
    ref_out, ref_grads = run(case, "reference", dtype, in_float64=True)
    tol = LOW_PRECISION_TOL[dtype]
    assert out.dtype == dtype
    _close_in_norm(out, ref_out, tol, f"{backend} {dtype}: loss")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert (g is None) == (r is None), f"gradient {i} present in only one of them"
        if g is not None:
            _close_in_norm(g, r, tol, f"{backend} {dtype}: gradient {i}")


def _close_in_norm(a, b, tol, what):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values {a}"
    err = ((a - b).norm() / b.norm().clamp(min=1.0)).item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


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

    assert torch.autograd.gradcheck(f, tuple(grad_leaves), eps=1e-6, atol=1e-6, rtol=1e-5)
