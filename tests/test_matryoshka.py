"""Matryoshka (``matryoshka_dims=``, ``matryoshka_weights=`` on ``clip_loss``, ``infonce_loss`` and
``siglip_loss``): the weighted sum of the losses at each prefix, written out here with the prefixes
cut and normalised by hand, loss and every gradient, on every CPU backend; the errors. Every backend
against the reference in every dtype and with tiny tiles: ``tests/cases.py``'s Matryoshka cases;
over a process group: ``tests/distributed_cases.py``'s."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl.backend import registry

DIMS = [(13,), (1, 13), (2, 5, 13), (3, 4, 7, 11), (1, 2, 3, 5, 8)]


def _leaves(seed):
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(11, 13, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.1, dtype=torch.float64, requires_grad=True)
    return x, y, scale, bias


def _by_hand(name, x, y, scale, bias, dims, weights):
    total = 0
    for d, w in zip(dims, weights):
        xd, yd = F.normalize(x[:, :d], dim=-1), F.normalize(y[:, :d], dim=-1)  # truncate, then normalise
        if name == "siglip_loss":
            term = fastcl.siglip_loss(xd, yd, scale, bias, backend="reference")
        elif name == "infonce_loss":
            term = fastcl.infonce_loss(xd, yd, 1 / scale, backend="reference")
        else:
            term = fastcl.clip_loss(xd, yd, scale, backend="reference")
        total = total + w * term
    return total


@pytest.mark.parametrize("backend", fastcl.backends("cpu", torch.float64))
@pytest.mark.parametrize("name", ["clip_loss", "infonce_loss", "siglip_loss"])
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"K{len(d)}")
def test_the_sum_over_prefixes_loss_and_gradients(backend, name, dims):
    weights = [0.5 + k for k in range(len(dims))]
    x, y, scale, bias = _leaves(len(dims))
    kw = {"matryoshka_dims": dims, "matryoshka_weights": weights, "normalize": True, "backend": backend}
    if name == "siglip_loss":
        got = fastcl.siglip_loss(x, y, scale, bias, **kw)
    elif name == "infonce_loss":
        got = fastcl.infonce_loss(x, y, 1 / scale, **kw)
    else:
        got = fastcl.clip_loss(x, y, scale, **kw)
    leaves = [x, y, scale] + ([bias] if name == "siglip_loss" else [])
    want = _by_hand(name, x, y, scale, bias, dims, weights)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dims, weights, error, match", [
    ((3, 3), None, ValueError, "increase strictly"),
    ((5, 2), None, ValueError, "increase strictly"),
    ((0, 4), None, ValueError, r"within \[1, 13\]"),
    ((4, 14), None, ValueError, r"within \[1, 13\]"),
    ((), None, TypeError, "non-empty sequence"),
    (8, None, TypeError, "non-empty sequence"),
    ((2.5, 4), None, TypeError, "hold ints"),
    ((2, 4), (1.0,), ValueError, "must be 2 numbers"),
    ((2, 4), (1.0, float("nan")), ValueError, "finite numbers"),
    (None, (1.0,), ValueError, "needs matryoshka_dims"),
])
def test_bad_dims_and_weights_name_the_argument(dims, weights, error, match):
    x, y, _, _ = _leaves(0)
    with pytest.raises(error, match=match):
        fastcl.clip_loss(x, y, 2.0, matryoshka_dims=dims, matryoshka_weights=weights)


def test_features_of_different_widths_are_refused_before_cutting():
    x, y, _, _ = _leaves(0)
    with pytest.raises(ValueError):
        fastcl.clip_loss(x, y[:, :9], 2.0, matryoshka_dims=(4, 8))


def _prefix_backends():
    return [b for b in fastcl.backends("cpu", torch.float64) if registry.provides(b, "lse_prefixes")]


@pytest.mark.parametrize("backend", _prefix_backends())
@pytest.mark.parametrize("tiles", ["default", "tiny"])
@pytest.mark.parametrize("kw", [
    {"normalize": True},
    {"normalize": False, "label_smoothing": 0.3},
    {"normalize": True, "label_smoothing": 0.2, "bidirectional": False},
    {"normalize": True, "bidirectional": False, "labels": True, "extra_negatives": True, "reduction": "none"},
], ids=["norm", "smooth", "rows-smooth", "labels-negs-none"])
def test_one_pass_over_the_features_equals_the_loop(backend, tiles, kw, monkeypatch):
    """Backends that declare ``lse_prefixes`` take every prefix from one pass (the K-loop raises
    here): equal to the reference's K losses, loss and gradients, with tiles that cut S and the
    segments at odd places."""
    from fastcl.backend.chunked import tiles as chunked_tiles
    from fastcl.losses import clip as clip_module

    if tiles == "tiny":
        monkeypatch.setattr(chunked_tiles, "TILE_ELEMENTS", 15)
    x, y, scale, _ = _leaves(3)
    g = torch.Generator().manual_seed(7)
    kw = dict(kw)
    if kw.pop("labels", False):
        kw["labels"] = torch.randint(0, 11, (11,), generator=g)
    if kw.get("extra_negatives"):
        kw["extra_negatives"] = torch.randn(5, 13, generator=g, dtype=torch.float64).requires_grad_()
    leaves = [x, y, scale] + ([kw["extra_negatives"]] if "extra_negatives" in kw else [])
    prefixes = {"matryoshka_dims": (1, 4, 9, 13), "matryoshka_weights": (0.5, 1.0, 2.0, 0.25)}
    want = fastcl.clip_loss(x, y, scale, backend="reference", **prefixes, **kw)

    def refuse(*args):
        raise AssertionError("the K-loop ran where one pass was declared")

    monkeypatch.setattr(clip_module, "over_prefixes", refuse)
    got = fastcl.clip_loss(x, y, scale, backend=backend, **prefixes, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    out = torch.ones_like(got) if got.dim() else None
    for a, b in zip(torch.autograd.grad(got, leaves, out), torch.autograd.grad(want, leaves, out)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", _prefix_backends())
@pytest.mark.parametrize("dims", [(1, 2, 3, 5, 8, 13, 29), (16, 29), (29,)], ids=lambda d: f"K{len(d)}")
def test_one_pass_across_many_tiles(backend, dims):
    """37 x 53 cuts the CPU kernels' grid into 3 x 4 tiles (edges of 16 rows and columns, the last
    ones ragged): each tile's segments and suffix sums meet every other's statistics."""
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(37, 29, generator=g, dtype=torch.float64), torch.randn(53, 29, generator=g, dtype=torch.float64)
    x.requires_grad_()
    y.requires_grad_()
    scale = torch.tensor(3.1, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 53, (37,), generator=g)
    kw = {"matryoshka_dims": dims, "normalize": True, "labels": labels, "bidirectional": False,
          "label_smoothing": 0.1}
    got = fastcl.clip_loss(x, y, scale, backend=backend, **kw)
    want = fastcl.clip_loss(x, y, scale, backend="reference", **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, [x, y, scale]), torch.autograd.grad(want, [x, y, scale])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    square = fastcl.clip_loss(x, y[:37], scale, backend=backend, matryoshka_dims=dims, normalize=True)
    torch.testing.assert_close(square, fastcl.clip_loss(x, y[:37], scale, backend="reference", matryoshka_dims=dims,
                                                        normalize=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", _prefix_backends())
def test_a_zero_prefix_is_normalised_as_f_normalize_does(backend):
    """A row whose first d_1 features are 0: F.normalize divides by max(||.||, 1e-12), so that prefix's
    features stay 0 and its gradient is finite; the one pass takes the same clamp."""
    x, y, scale, _ = _leaves(5)
    with torch.no_grad():
        x[2, :4] = 0
        y[7, :4] = 0
    kw = {"matryoshka_dims": (4, 13), "normalize": True}
    got = fastcl.clip_loss(x, y, scale, backend=backend, **kw)
    want = fastcl.clip_loss(x, y, scale, backend="reference", **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, [x, y, scale]), torch.autograd.grad(want, [x, y, scale])):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
