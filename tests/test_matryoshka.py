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
