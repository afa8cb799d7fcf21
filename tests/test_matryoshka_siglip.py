"""Matryoshka SigLIP in one pass over the features (op ``pointwise_prefixes``): on every backend that
declares the op, equal in float64 to the reference's loop of K SigLIP losses (the loop raises here),
loss and every gradient, for K = 1..5, dims that are not tile multiples, odd shapes, tiles that cut
S and the segments at odd places, a zero prefix, with and without normalisation and weights; the
op itself (MW's kind, keys, per-row output, no gradients) against ``pointwise`` at each prefix."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl.backend import engine, registry

DIMS = [(13,), (1, 13), (2, 5, 11), (3, 4, 7, 11), (1, 2, 3, 5, 8)]


def _backends():
    return [b for b in fastcl.backends("cpu", torch.float64) if registry.provides(b, "pointwise_prefixes")]


def test_the_cpu_engines_declare_the_op():
    assert {"chunked", "cpu"} <= set(_backends())


def _leaves(m, d, seed, learnable=True):
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(m, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    if not learnable:
        return [x, y], 2.3, -1.1
    scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.1, dtype=torch.float64, requires_grad=True)
    return [x, y, scale, bias], scale, bias


@pytest.fixture
def one_pass(request, monkeypatch):
    """The K-loop raises; ``request.param`` "tiny" shrinks the chunked tiles to a few elements."""
    from fastcl.backend.chunked import tiles
    from fastcl.losses import siglip

    if getattr(request, "param", "default") == "tiny":
        monkeypatch.setattr(tiles, "TILE_ELEMENTS", 7)

    def refuse(*args):
        raise AssertionError("the K-loop ran where one pass was declared")

    monkeypatch.setattr(siglip, "over_prefixes", refuse)


def _loop(x, y, scale, bias, matryoshka_dims, matryoshka_weights=None, **kw):
    """The reference's K SigLIP losses at the prefixes, weighted and summed, written out."""
    weights = matryoshka_weights or [1.0] * len(matryoshka_dims)
    return sum(w * fastcl.siglip_loss(x[:, :d], y[:, :d], scale, bias, backend="reference", **kw)
               for d, w in zip(matryoshka_dims, weights))


def _check(got, want, leaves, upstream=None):
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    out = upstream if upstream is not None else (torch.ones_like(got) if got.dim() else None)
    for a, b in zip(torch.autograd.grad(got, leaves, out), torch.autograd.grad(want, leaves, out)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("one_pass", ["default", "tiny"], indirect=True)
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"K{len(d)}")
@pytest.mark.parametrize("kw", [
    {"normalize": True, "weights": True},
    {"normalize": False, "reduction": "sum"},
    {"normalize": True, "reduction": "none", "weights": True},
    {"normalize": False, "reduction": "none"},
], ids=["norm-w-mean", "sum", "norm-w-none", "none"])
def test_one_pass_equals_the_reference_loop(backend, one_pass, dims, kw):
    kw = dict(kw)
    weights = tuple(0.5 + 0.75 * k for k in range(len(dims))) if kw.pop("weights", False) else None
    leaves, scale, bias = _leaves(11, 13, len(dims))
    x, y = leaves[:2]
    prefixes = {"matryoshka_dims": dims, "matryoshka_weights": weights, **kw}
    want = _loop(x, y, scale, bias, **prefixes)
    got = fastcl.siglip_loss(x, y, scale, bias, backend=backend, **prefixes)
    upstream = torch.linspace(-1.0, 2.0, 11, dtype=torch.float64) if got.dim() else None
    _check(got, want, leaves, upstream)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("one_pass", ["default", "tiny"], indirect=True)
@pytest.mark.parametrize("m, d, dims", [(1, 1, (1,)), (1, 5, (2, 5)), (2, 7, (3, 7)), (5, 3, (1, 2, 3)),
                                        (37, 29, (1, 2, 3, 5, 8, 13, 29)), (37, 29, (16, 29)), (53, 17, (6, 12))],
                         ids=lambda v: str(v))
def test_odd_shapes_and_many_tiles(backend, one_pass, m, d, dims):
    """37 and 53 rows cut the CPU kernels' grid into 3 x 3 and 4 x 4 tiles of 16 (the last ragged): each
    tile's segments and suffix sums meet every other's rows and columns; a last prefix short of D."""
    leaves, scale, bias = _leaves(m, d, m + d)
    x, y = leaves[:2]
    kw = {"matryoshka_dims": dims, "normalize": True, "matryoshka_weights": [1.0 + k for k in range(len(dims))]}
    _check(fastcl.siglip_loss(x, y, scale, bias, backend=backend, **kw),
           _loop(x, y, scale, bias, **kw), leaves)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_zero_prefix_is_normalised_as_f_normalize_does(backend, reduction, one_pass):
    """Rows whose first d_1 features are 0: F.normalize divides by max(||.||, 1e-12), so that prefix's
    logits are the bias alone and the gradient stays finite; the one pass takes the same clamp."""
    leaves, scale, bias = _leaves(11, 13, 5)
    x, y = leaves[:2]
    with torch.no_grad():
        x[2, :4] = 0
        y[7, :4] = 0
        y[2, :4] = 0  # a positive pair whose first prefix is 0 on both sides
    kw = {"matryoshka_dims": (4, 9, 13), "normalize": True, "reduction": reduction}
    _check(fastcl.siglip_loss(x, y, scale, bias, backend=backend, **kw),
           _loop(x, y, scale, bias, **kw), leaves)


def _by_hand(x, y, scale, bias, dims, weights):
    total = 0
    for d, w in zip(dims, weights):
        xd, yd = F.normalize(x[:, :d], dim=-1), F.normalize(y[:, :d], dim=-1)  # truncate, then normalise
        logits = scale * xd @ yd.T + bias
        labels = 2 * torch.eye(x.shape[0], dtype=x.dtype) - 1
        total = total + w * -F.logsigmoid(labels * logits).sum() / x.shape[0]
    return total


@pytest.mark.parametrize("backend", _backends())
def test_numbers_for_scale_and_bias_and_the_textbook_loss(backend, one_pass):
    """Python numbers for scale and bias (no gradient for them), against SigLIP written out by hand."""
    leaves, _, _ = _leaves(7, 10, 2, learnable=False)
    x, y = leaves
    dims, weights = (3, 6, 10), (2.0, 0.5, 1.0)
    got = fastcl.siglip_loss(x, y, 4.0, -2.5, backend=backend, normalize=True, matryoshka_dims=dims,
                             matryoshka_weights=weights)
    _check(got, _by_hand(x, y, 4.0, -2.5, dims, weights), [x, y])


@pytest.mark.parametrize("backend", _backends())
def test_without_gradients_and_in_float32(backend, one_pass):
    leaves, scale, bias = _leaves(9, 8, 3)
    x, y = leaves[:2]
    kw = {"matryoshka_dims": (3, 8), "normalize": True}
    want = _loop(x, y, scale, bias, **kw)
    with torch.no_grad():
        torch.testing.assert_close(fastcl.siglip_loss(x, y, scale, bias, backend=backend, **kw), want,
                                   rtol=1e-12, atol=1e-12)
    x32, y32 = (t.detach().float().requires_grad_() for t in (x, y))
    got = fastcl.siglip_loss(x32, y32, scale.float(), bias.float(), backend=backend, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    got.backward()
    want.backward()
    torch.testing.assert_close(x32.grad, x.grad.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", _backends())
def test_double_backward_is_refused(backend):
    leaves, scale, bias = _leaves(5, 6, 1)
    x, y = leaves[:2]
    for reduction in ("mean", "none"):
        out = fastcl.siglip_loss(x, y, scale, bias, backend=backend, matryoshka_dims=(2, 6), reduction=reduction)
        with pytest.raises(NotImplementedError, match="first derivatives only"):
            g, = torch.autograd.grad(out.sum(), x, create_graph=True)
            (g ** 2).sum().backward()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("kind", ["siglip", "mw"])
@pytest.mark.parametrize("reduce", [True, False])
def test_the_op_equals_pointwise_at_each_prefix(backend, kind, reduce):
    """``Engine.pointwise_prefixes`` against ``Engine.pointwise`` on each prefix (the factors folded into
    the features), M != N, keys that are not the diagonal, a row bias, no factors and factors."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 10, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randn(5, 10, generator=g, dtype=torch.float64).requires_grad_()
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    row_bias = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_()
    keys = (torch.tensor([0, 1, 2, 0, 4, 9, 1]), torch.tensor([1, 0, 3, 4, 2]))
    dims, weights = (3, 4, 10), (0.5, 2.0, 1.25)
    eng = engine(backend)
    for factored in (False, True):
        a = (torch.rand(3, 7, generator=g, dtype=torch.float64) + 0.5).requires_grad_() if factored else None
        b = (torch.rand(3, 5, generator=g, dtype=torch.float64) + 0.5).requires_grad_() if factored else None
        got = eng.pointwise_prefixes(x, y, scale, row_bias, dims, a, b, keys=keys, kind=kind, weights=weights,
                                     reduce=reduce)
        want = 0
        for q, (d, w) in enumerate(zip(dims, weights)):
            xd, yd = (x[:, :d], y[:, :d]) if a is None else (a[q, :, None] * x[:, :d], b[q, :, None] * y[:, :d])
            want = want + w * engine("chunked").pointwise(xd, yd, scale, row_bias, keys=keys, kind=kind,
                                                          reduce=reduce)
        leaves = [x, y, scale, row_bias] + ([a, b] if factored else [])
        upstream = None if reduce else torch.linspace(0.5, 1.5, 7, dtype=torch.float64)
        _check(got, want, leaves, upstream)


def test_over_a_process_group_or_without_the_op_it_is_the_loop(monkeypatch):
    """A backend that does not declare the op (reference here) runs the K losses."""
    from fastcl.losses import siglip

    calls = []
    loop = siglip.over_prefixes
    monkeypatch.setattr(siglip, "over_prefixes", lambda prefixes, loss: calls.append(prefixes) or loop(prefixes, loss))
    leaves, scale, bias = _leaves(5, 6, 0)
    fastcl.siglip_loss(*leaves[:2], scale, bias, backend="reference", matryoshka_dims=(2, 6))
    assert calls == [[(2, 1.0), (6, 1.0)]]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("reduce", [True, False])
def test_the_custom_op_passes_opcheck(backend, reduce):
    """Schema, fake (meta) implementation and registered autograd agree with the real op."""
    from fastcl.backend.primitives.pointwise_prefixes import _pointwise_prefixes_op
    from fastcl.backend.primitives.shared import POINTWISE_KINDS

    g = torch.Generator().manual_seed(6)
    x, y = (torch.randn(6, 7, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    bias = torch.full((6,), -0.5, dtype=torch.float64, requires_grad=True)
    a, b = ((torch.rand(2, 6, generator=g, dtype=torch.float64) + 0.5).requires_grad_() for _ in range(2))
    ids = torch.arange(6)
    torch.library.opcheck(_pointwise_prefixes_op, (backend, x, y, scale, bias, [3, 7], a, b, ids, ids,
                                                   POINTWISE_KINDS["siglip"], [0.5, 2.0], reduce, True, True, True,
                                                   True, True, True))
    torch.library.opcheck(_pointwise_prefixes_op, (backend, x.detach(), y.detach(), scale.detach(), None, [7], None,
                                                   None, None, None, POINTWISE_KINDS["mw"], [1.0], reduce, False,
                                                   False, False, False, False, False))
