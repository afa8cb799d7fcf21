"""The ``triton`` backend's op ``pointwise_prefixes`` (Matryoshka SigLIP / MW from one pass over the
features, ``fastcl/backend/triton/prefixes.py``): its kernel against ``chunked``'s (the executable
description) in float64 at 1e-12, loss sums and every gradient output, for both kinds, with and
without keys, row bias, per-prefix factors, per-row prefix weights and gradients; segment
boundaries inside and on feature blocks, past-d_K features, across tiles and workspace blocks;
``siglip_loss(matryoshka_dims=...)`` through it against the reference's loop over K losses, with the
loop itself made to fail.

The interpreter's tiles are 256 x 256 and its feature blocks up to 128 (``plan.py``). As in
test_triton_prefixes.py, the cases run in a child pytest with TRITON_INTERPRET=1
(``test_interpreter_session``).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import fastcl
import sessions
from sessions import INTERPRETED, skip_unless_triton_runs
from tolerances import assert_close, tol

HAS_TRITON = importlib.util.find_spec("triton") is not None
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child session")

# (M, N, D, dims): one element; boundaries that cut 16-feature blocks and one on a block edge, d_K < D;
# K = 4 of width 1 each at prime M, N; boundaries on multiples of 16 inside one 128-feature block; K = 1.
SHAPES = [(1, 1, 1, (1,)), (37, 29, 45, (3, 16, 17, 40)), (19, 31, 7, (1, 2, 3, 4)),
          (30, 20, 128, (16, 64, 112)), (9, 11, 23, (23,)), (13, 2, 33, (5, 32))]

# (kind, keys, bias, factors, weights, grads): SigLIP and MW, each flag on and off somewhere
FLAGS = [(0, True, True, True, True, True), (0, False, False, False, False, True), (1, True, True, False, True, True),
         (0, True, True, True, False, False), (1, True, False, True, False, False),
         (0, False, True, True, True, True)]


def _problem(m, n, d, dims, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed + m * 7 + n * 3 + d)
    k = len(dims)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    u = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # keys in a small range: several positives per row, some rows without one
    return {"x": r(m, d).to(dtype), "y": r(n, d).to(dtype), "scale": torch.tensor(1.3, dtype=acc),
            "bias": r(m).to(acc), "factors": ((u(k, m) + 0.5).to(acc), (u(k, n) + 0.5).to(acc)),
            "keys": (torch.randint(0, 5, (m,), generator=gen), torch.randint(0, 5, (n,), generator=gen)),
            "weights": (u(k, m) + 0.25).to(acc)}


def _call(kernels, p, dims, flags, wide=False):
    kind, keys, bias, factors, weights, grads = flags
    cast = (lambda t: t.double()) if wide else (lambda t: t)
    opt = lambda on, t: cast(t) if on else None
    return kernels.pointwise_prefixes(
        cast(p["x"]), cast(p["y"]), cast(p["scale"]), opt(bias, p["bias"]), dims,
        *(opt(factors, f) for f in p["factors"]), *(p["keys"] if keys else (None, None)), kind,
        opt(weights, p["weights"]), grads)


def _check_kernels(m, n, d, dims, flags=FLAGS, dtype=torch.float64):
    from fastcl.backend import engine

    p = _problem(m, n, d, dims, dtype)
    within = tol("triton kernels", dtype)
    for f in flags:
        got = _call(engine("triton").kernels, p, list(dims), f)
        want = _call(engine("chunked").kernels, p, list(dims), f, wide=True)
        assert len(got) == len(want) == 6
        for i, (u, v) in enumerate(zip(got, want, strict=True)):
            assert u.shape == v.shape, (f, i, u.shape, v.shape)
            assert_close(u.double(), v, within, f"flags {f}, output {i} at {m}x{n}x{d} dims {dims}")
        if f[-1]:  # a loss and gradients that are not all zero: the comparison has teeth
            assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0 and got[4].abs().sum() > 0


@interpreter_only
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])) + f"-K{len(s[3])}")
def test_kernel_matches_chunked(shape):
    skip_unless_triton_runs(torch.float64)
    _check_kernels(*shape)


@interpreter_only
def test_kernel_matches_chunked_in_float32():
    _check_kernels(37, 29, 45, (3, 16, 17, 40), FLAGS[:3], torch.float32)


@interpreter_only
def test_past_d_k_the_gradients_are_zero():
    """Features past d_K reach no prefix: their gradient columns are exactly 0; below, not."""
    from fastcl.backend import engine

    skip_unless_triton_runs(torch.float64)
    p = _problem(21, 17, 50, (7, 30), torch.float64)
    _, gy, gx, *_ = _call(engine("triton").kernels, p, [7, 30], FLAGS[0])
    assert (gy[:, 30:] == 0).all() and (gx[:, 30:] == 0).all()
    assert (gy[:, :30] != 0).all() and (gx[:, :30] != 0).all()


@interpreter_only
@pytest.mark.parametrize("budget", ["256", "0.001"], ids=["tiles", "blocks"])
def test_kernel_matches_chunked_across_tiles_and_blocks(budget, monkeypatch):
    """520 x 300: 3 x 2 tiles of one block, or, with a budget below one block, 3 x 2 blocks of
    256 x 256 pairs: the loss sums and the D * T sums merge across tiles and blocks, the segments'
    GEMMs accumulate across blocks, each block's suffix sums are its own."""
    skip_unless_triton_runs(torch.float64)
    monkeypatch.setenv("FASTCL_WORKSPACE_MB", budget)
    _check_kernels(520, 300, 20, (3, 11, 20), FLAGS[:1] + FLAGS[2:4])


@interpreter_only
@pytest.mark.parametrize("kw", [
    {"matryoshka_dims": (13,), "normalize": True},
    {"matryoshka_dims": (1, 13), "normalize": False, "reduction": "sum"},
    {"matryoshka_dims": (2, 5, 11), "normalize": True, "reduction": "none", "weights": True},
    {"matryoshka_dims": (3, 4, 7, 11), "normalize": True, "weights": True},
], ids=["K1", "K2-sum", "K3-none-weights", "K4-weights"])
def test_siglip_takes_one_pass_and_equals_the_reference(kw, monkeypatch):
    """siglip_loss with matryoshka_dims on triton runs one pointwise_prefixes pass (the K-loop raises
    here) and equals the reference's K losses, loss and every gradient (scale and bias learnable)."""
    from fastcl.losses import siglip

    skip_unless_triton_runs(torch.float64)
    kw = dict(kw)
    dims = kw["matryoshka_dims"]
    if kw.pop("weights", False):
        kw["matryoshka_weights"] = tuple(0.5 + 0.75 * k for k in range(len(dims)))
    gen = torch.Generator().manual_seed(len(dims))
    x, y = (torch.randn(11, 13, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.1, dtype=torch.float64, requires_grad=True)
    leaves = [x, y, scale, bias]
    weights = kw.get("matryoshka_weights") or (1.0,) * len(dims)
    rest = {key: v for key, v in kw.items() if key not in ("matryoshka_dims", "matryoshka_weights")}
    want = sum(w * fastcl.siglip_loss(x[:, :d], y[:, :d], scale, bias, backend="reference", **rest)
               for d, w in zip(dims, weights))

    def refuse(*args):
        raise AssertionError("the K-loop ran where one pass was declared")

    monkeypatch.setattr(siglip, "over_prefixes", refuse)
    got = fastcl.siglip_loss(x, y, scale, bias, backend="triton", **kw)
    assert_close(got, want, tol("float64"), "siglip loss")
    out = torch.linspace(-1.0, 2.0, 11, dtype=torch.float64) if got.dim() else None
    for i, (a, b) in enumerate(zip(torch.autograd.grad(got, leaves, out), torch.autograd.grad(want, leaves, out))):
        assert_close(a, b, tol("float64"), f"siglip gradient {i}")


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter session itself")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_interpreter_session():
    """This file's cases in a child pytest with TRITON_INTERPRET=1."""
    sessions.interpreter_session(__file__, "-m", "not gpu")


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter session itself")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_matryoshka_siglip_file_on_triton():
    """tests/test_matryoshka_siglip.py's cases on triton (it lists the backends that declare the op and
    run on CPU: triton only under the interpreter): the reference loop at K = 1..5, tiny tiles, a zero
    prefix, no gradients, float32, the op against pointwise at each prefix, opcheck (65 cases, ~15 s)."""
    sessions.interpreter_session(str(Path(__file__).with_name("test_matryoshka_siglip.py")), "-k", "triton")
