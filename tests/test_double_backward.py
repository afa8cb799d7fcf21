"""Second derivatives: the reference backend has them (plain autograd through S); the fused backends
compute first derivatives only and say so with a NotImplementedError that names the way out,
never PyTorch's internal "no autograd formula" message and never silently zero second derivatives
(what SigLIP/MW's gradients, computed in the forward pass, would give without the check)."""
import pytest
import torch

import fastcl
from tolerances import assert_close, tol

FUSED = [b for b in fastcl.backends("cpu") if b != "reference"]
LOSSES = {
    "clip": lambda x, y, b: fastcl.clip_loss(x, y, 2.0, backend=b),
    "siglip": lambda x, y, b: fastcl.siglip_loss(x, y, 2.0, -1.0, backend=b),
    "siglip-none": lambda x, y, b: fastcl.siglip_loss(x, y, 2.0, -1.0, backend=b, reduction="none").sum(),
    "mw": lambda x, y, b: fastcl.mw_loss(x, y, backend=b),
    "ntxent": lambda x, y, b: fastcl.ntxent_loss([x, y], backend=b),
    "supcon": lambda x, y, b: fastcl.supcon_loss(x, torch.tensor([0, 1, 0, 1, 2]), backend=b),
}


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2)]


def _gradient_penalty(loss, x, y, backend):
    g, = torch.autograd.grad(loss(x, y, backend), x, create_graph=True)
    (g ** 2).sum().backward()
    return x.grad, y.grad


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", LOSSES)
def test_fused_backends_refuse_double_backward_clearly(name, backend):
    x, y = _inputs()
    with pytest.raises(NotImplementedError, match="first derivatives only.*backend='reference'"):
        _gradient_penalty(LOSSES[name], x, y, backend)


@pytest.mark.parametrize("name", LOSSES)
def test_reference_backend_has_second_derivatives(name):
    x, y = _inputs()
    dx, dy = _gradient_penalty(LOSSES[name], x, y, "reference")
    assert dx.abs().sum() > 0
    assert torch.isfinite(dx).all() and (dy is None or torch.isfinite(dy).all())


@pytest.mark.parametrize("backend", FUSED)
def test_first_derivatives_unaffected(backend):
    x, y = _inputs()
    fastcl.siglip_loss(x, y, 2.0, -1.0, backend=backend).backward()
    xr, yr = (t.detach().clone().requires_grad_() for t in (x, y))
    fastcl.siglip_loss(xr, yr, 2.0, -1.0, backend="reference").backward()
    assert_close(x.grad, xr.grad, tol("first derivatives"), f"{backend} vs reference")
