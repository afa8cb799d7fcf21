"""The ``triton`` backend's op ``lse_prefixes`` (Matryoshka CLIP / InfoNCE from one pass over the
features, ``fastcl/backend/triton/prefixes.py``): its kernels against ``chunked``'s (the executable
description) in float64 at 1e-12, with segment boundaries inside and on feature blocks, past-d_K
features, one or two directions, with and without the per-prefix factors, across tiles and across
workspace blocks; the losses through it against the reference's loop over K losses, with the loop
itself made to fail.

The interpreter's tiles are 256 x 256 and its feature blocks up to 128 (``plan.py``): the shapes
below cut S into several tiles (520 rows) or several workspace blocks (a budget below one block)
and put boundaries on both sides of feature blocks of 16 and 128. As in test_triton.py, the cases
run in a child pytest with TRITON_INTERPRET=1 (``test_interpreter_session``).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

import fastcl
import sessions
from sessions import INTERPRETED, skip_unless_triton_runs
from tolerances import assert_close, tol

HAS_TRITON = importlib.util.find_spec("triton") is not None
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child session")

# (M, N, D, dims): one element; boundaries that cut 16-feature blocks and one on a block edge, d_K < D
# (features past d_K: zero gradient); K = 5 of width 1 each; one 128-feature block holding every
# boundary; K = 1 (the plain loss at d_1).
SHAPES = [(1, 1, 1, (1,)), (37, 29, 45, (3, 16, 17, 40)), (20, 33, 7, (1, 2, 3, 4, 5)),
          (30, 20, 128, (5, 64, 100, 128)), (9, 11, 23, (23,))]


def _problem(m, n, d, dims, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed + m * 7 + n * 3 + d)
    k = len(dims)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    u = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return {"x": r(m, d).to(dtype), "y": r(n, d).to(dtype), "scale": torch.tensor(1.3, dtype=acc),
            "factors": ((u(k, m) + 0.5).to(acc), (u(k, n) + 0.5).to(acc)),
            "g": (u(k, m).to(acc), u(k, n).to(acc))}


def _calls(kernels, p, dims, wide=False):
    """Forward and backward of ``kernels`` in every direction, with and without factors; the backward
    takes the shifts of chunked's forward (what the autograd saves)."""
    from fastcl.backend import engine
    from fastcl.backend.primitives.shared import _finite_shift

    cast = (lambda t: t.double()) if wide else (lambda t: t)
    x, y, scale = cast(p["x"]), cast(p["y"]), cast(p["scale"])
    k, m, n = len(dims), x.shape[0], y.shape[0]
    for factors in (tuple(map(cast, p["factors"])), (None, None)):
        for rows, cols in [(True, True), (True, False), (False, True)]:
            what = f"rows={rows} cols={cols} factors={factors[0] is not None}"
            yield f"forward {what}", kernels.lse_forward_prefixes(x, y, scale, dims, *factors, rows, cols)
            want = engine("chunked").kernels.lse_forward_prefixes(
                x.double(), y.double(), scale.double(), dims, *(None if f is None else f.double() for f in factors),
                rows, cols)
            shifts = [_finite_shift(v).to(scale.dtype) if v.numel() else v.new_zeros(k, size).to(scale.dtype)
                      for v, size in zip(want, (m, n))]
            g_row, g_col = (cast(g) for g in p["g"])
            yield f"backward {what}", kernels.lse_backward_prefixes(
                x, y, scale, dims, *factors, *shifts, g_row if rows else g_row[:, :0], g_col if cols else g_col[:, :0],
                rows, cols)


def _check_kernels(m, n, d, dims, dtype=torch.float64):
    from fastcl.backend import engine

    p = _problem(m, n, d, dims, dtype)
    within = tol("triton kernels", dtype)
    got = _calls(engine("triton").kernels, p, list(dims))
    want = _calls(engine("chunked").kernels, p, list(dims), wide=True)
    for (what, a), (_, b) in zip(got, want, strict=True):
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert_close(u.double(), v, within, f"{what}, output {i} at {m}x{n}x{d} dims {dims}")


@interpreter_only
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])) + f"-K{len(s[3])}")
def test_kernels_match_chunked(shape):
    skip_unless_triton_runs(torch.float64)
    _check_kernels(*shape)


@interpreter_only
def test_kernels_match_chunked_in_float32():
    _check_kernels(37, 29, 45, (3, 16, 17, 40), torch.float32)


@interpreter_only
@pytest.mark.parametrize("budget", ["256", "0.001"], ids=["tiles", "blocks"])
def test_kernels_match_chunked_across_tiles_and_blocks(budget, monkeypatch):
    """520 x 300: 3 x 2 tiles of one block, or, with a budget below one block, 3 x 2 blocks of
    256 x 256 pairs: statistics merge across tiles and blocks, the segments' GEMMs accumulate across
    blocks, each block's suffix sums are its own."""
    skip_unless_triton_runs(torch.float64)
    monkeypatch.setenv("FASTCL_WORKSPACE_MB", budget)
    _check_kernels(520, 300, 20, (3, 11, 20))


def _losses(name, x, y, scale, backend, **kw):
    if name == "infonce_loss":
        return fastcl.infonce_loss(x, y, 1 / scale, backend=backend, **kw)
    return fastcl.clip_loss(x, y, scale, backend=backend, **kw)


@interpreter_only
@pytest.mark.parametrize("name", ["clip_loss", "infonce_loss"])
@pytest.mark.parametrize("kw", [
    {"matryoshka_dims": (13,), "normalize": True},
    {"matryoshka_dims": (1, 13), "normalize": False, "label_smoothing": 0.3},
    {"matryoshka_dims": (2, 5, 13), "normalize": True, "bidirectional": False},
    {"matryoshka_dims": (3, 4, 7, 11), "matryoshka_weights": (0.5, 1.0, 2.0, 0.25), "normalize": True},
    {"matryoshka_dims": (1, 2, 3, 5, 8), "normalize": True, "bidirectional": False, "labels": True,
     "extra_negatives": True, "reduction": "none"},
], ids=["K1", "K2-smooth", "K3-rows", "K4-weights", "K5-labels-negs-none"])
def test_losses_take_one_pass_and_equal_the_reference(name, kw, monkeypatch):
    """clip_loss / infonce_loss with matryoshka_dims on triton run one lse_prefixes pass (the K-loop
    raises here) and equal the reference's K losses, loss and every gradient."""
    from fastcl.losses import clip as clip_module

    skip_unless_triton_runs(torch.float64)
    gen = torch.Generator().manual_seed(len(kw["matryoshka_dims"]))
    x, y = (torch.randn(11, 13, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    kw = dict(kw)
    if kw.pop("labels", False):
        kw["labels"] = torch.randint(0, 11, (11,), generator=gen)
    if kw.get("extra_negatives"):
        kw["extra_negatives"] = torch.randn(5, 13, generator=gen, dtype=torch.float64).requires_grad_()
    if name == "infonce_loss":  # rows only, no label smoothing: CLIP's other arguments
        kw = {key: v for key, v in kw.items() if key not in ("bidirectional", "label_smoothing")}
    leaves = [x, y, scale] + ([kw["extra_negatives"]] if "extra_negatives" in kw else [])
    want = _losses(name, x, y, scale, "reference", **kw)

    def refuse(*args):
        raise AssertionError("the K-loop ran where one pass was declared")

    monkeypatch.setattr(clip_module, "over_prefixes", refuse)
    got = _losses(name, x, y, scale, "triton", **kw)
    assert_close(got, want, tol("float64"), f"{name} loss")
    out = torch.ones_like(got) if got.dim() else None
    for i, (a, b) in enumerate(zip(torch.autograd.grad(got, leaves, out), torch.autograd.grad(want, leaves, out))):
        assert_close(a, b, tol("float64"), f"{name} gradient {i}")


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter session itself")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_interpreter_session():
    """This file's cases in a child pytest with TRITON_INTERPRET=1."""
    sessions.interpreter_session(__file__, "-m", "not gpu")
