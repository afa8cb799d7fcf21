"""Learnable temperatures and scales: every loss that takes a ``temperature``, a ``logit_scale`` or
uniformity's ``t`` accepts a Python number, a NumPy scalar, or a one-element floating tensor, and
sends a tensor its gradient on every engine backend, as autograd through ``reference`` does.

The distributed losses are checked in test_distributed.py (the ``*-learned-t`` cases); input errors
(integer tensors, two values, another device, non-finite tensors) in test_errors.py.
"""
from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import fastcl
from cases import leaves
from tolerances import GRADCHECK, assert_close, assert_runs_close, tol

ENGINES = [b for b in fastcl.backends("cpu") if b != "reference"]
SCALE_ARGS = ("temperature", "logit_scale", "t")  # the arguments that set S's multiplier


@dataclass(frozen=True)
class ScaleCase:
    id: str
    loss: str
    arg: str         # which of SCALE_ARGS the loss takes
    value: float     # a valid value of it
    build: Callable  # (rand, randint) -> keyword arguments but the scale

    @property
    def fn(self) -> Callable:
        return getattr(fastcl, self.loss)

    def inputs(self) -> dict:
        gen = torch.Generator().manual_seed(zlib.crc32(self.id.encode()))

        def rand(*shape, grad=True):
            return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)

        def randint(high, *shape):
            return torch.randint(0, high, shape, generator=gen)

        return self.build(rand, randint)


CASES = [
    ScaleCase("infonce", "infonce_loss", "temperature", 0.3, lambda r, ri: dict(query=r(7, 5), key=r(7, 5))),
    ScaleCase("infonce-labels-queue-none", "infonce_loss", "temperature", 0.6, lambda r, ri: dict(
        query=r(4, 5), key=r(9, 5), labels=ri(9, 4), extra_negatives=r(6, 5), reduction="none")),
    ScaleCase("ntxent", "ntxent_loss", "temperature", 0.4, lambda r, ri: dict(views=r(2, 9, 5))),
    ScaleCase("ntxent-V3-none-norm", "ntxent_loss", "temperature", 0.2, lambda r, ri: dict(
        views=r(3, 5, 4), reduction="none", normalize=True)),
    ScaleCase("supcon", "supcon_loss", "temperature", 0.2, lambda r, ri: dict(
        features=r(11, 4), labels=torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 0, 5, 2]))),
    ScaleCase("supcon-views-sum", "supcon_loss", "temperature", 0.7, lambda r, ri: dict(
        features=r(2, 6, 4), labels=ri(3, 6), reduction="sum")),
    ScaleCase("dcl", "dcl_loss", "temperature", 0.25, lambda r, ri: dict(view0=r(8, 5), view1=r(8, 5))),
    ScaleCase("dcl-vmf-none", "dcl_loss", "temperature", 0.5, lambda r, ri: dict(
        view0=r(6, 4), view1=r(6, 4), weighting="vmf", normalize=True, reduction="none")),
    ScaleCase("mv_infonce", "mv_infonce_loss", "temperature", 0.5, lambda r, ri: dict(views=r(3, 6, 4))),
    ScaleCase("mv_dhel-sum", "mv_dhel_loss", "temperature", 0.3, lambda r, ri: dict(
        views=r(3, 6, 4), reduction="sum")),
    ScaleCase("mw", "mw_loss", "temperature", 0.5, lambda r, ri: dict(query=r(7, 4), key=r(7, 4))),
    ScaleCase("mw-labels-none", "mw_loss", "temperature", 0.2, lambda r, ri: dict(
        query=r(5, 4), key=r(8, 4), labels=ri(8, 5), reduction="none")),
    ScaleCase("uniformity", "uniformity_loss", "t", 1.5, lambda r, ri: dict(z=r(9, 4), normalize=True)),
    ScaleCase("uniformity-none", "uniformity_loss", "t", 0.8, lambda r, ri: dict(z=r(7, 3), reduction="none")),
    ScaleCase("maxsim-masks-extra", "maxsim_loss", "temperature", 0.4, lambda r, ri: dict(
        q=r(5, 3, 4), d=r(5, 6, 4), extra_docs=r(2, 6, 4), q_mask=torch.arange(15).view(5, 3) % 4 != 3,
        d_mask=torch.arange(30).view(5, 6) % 5 != 4, normalize_scores=True)),
    ScaleCase("clip", "clip_loss", "logit_scale", 3.0, lambda r, ri: dict(x=r(7, 5), y=r(7, 5))),
    ScaleCase("siglip", "siglip_loss", "logit_scale", 2.0, lambda r, ri: dict(x=r(6, 4), y=r(6, 4), logit_bias=-1.0)),
    ScaleCase("cwcl", "cwcl_loss", "logit_scale", 2.5, lambda r, ri: dict(
        x=r(6, 4), y=r(6, 4), weight_features=r(6, 3, grad=False))),
]


def run(case: ScaleCase, backend: str, scale):
    """Loss and the gradients of every leaf (features, and the scale if it is a tensor)."""
    kwargs = {**case.inputs(), case.arg: scale}
    grad_leaves = leaves((), kwargs)
    out = case.fn(**kwargs, backend=backend)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    return out.detach(), [g.detach() for g in torch.autograd.grad((out * weights).sum(), grad_leaves)]


def learnable(value: float, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, requires_grad=True)


def test_every_loss_with_a_scale_is_covered():
    takes_scale = {name for name in fastcl.__all__ if name.endswith("_loss")
                   and set(inspect.signature(getattr(fastcl, name)).parameters) & set(SCALE_ARGS)}
    assert takes_scale == {c.loss for c in CASES}


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_tensor_scale_gradient_matches_reference(case, backend):
    """A 0-d float64 tensor that requires grad: the loss and every gradient, the scale's included,
    equal autograd through the materialised S."""
    want = run(case, "reference", learnable(case.value))
    got = run(case, backend, learnable(case.value))
    assert want[1][-1].abs() > 0  # the scale is the last leaf, and its gradient is informative
    assert_runs_close(got, want, tol("float64"), f"{backend} vs reference, tensor {case.arg}")


@pytest.mark.parametrize("backend", ["reference", *ENGINES])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_tensor_scale_gives_the_numbers_loss(case, backend):
    """A tensor is the same math as the number it holds (also as a one-element [1] tensor)."""
    want, _ = run(case, backend, case.value)
    for scale in (learnable(case.value), torch.tensor([case.value], dtype=torch.float64)):
        got, _ = run(case, backend, scale)
        assert_close(got, want, tol("regrouped"), f"{backend}: {scale!r} vs {case.value}")


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_scale_gradient_is_the_numerical_derivative(case, backend):
    kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in case.inputs().items()}

    def loss(scale):
        out = case.fn(**kwargs, **{case.arg: scale}, backend=backend)
        return (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)).sum()

    assert torch.autograd.gradcheck(loss, (learnable(case.value),), **GRADCHECK)


@pytest.mark.parametrize("make", [np.float32, np.float64, np.int64], ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_numpy_scalars_are_numbers(case, make):
    value = make(case.value) if make is not np.int64 else make(2)
    want, _ = run(case, "chunked", float(value))
    got, _ = run(case, "chunked", value)
    assert_close(got, want, tol("exact"), f"{make.__name__} vs float")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_tensor_values_are_not_range_checked(case):
    """No device sync to read the value: a negative tensor is taken as it is (still well-defined
    math, just a negative scale) and gives the reference's loss and gradients."""
    negative = -case.value
    assert_runs_close(run(case, "chunked", learnable(negative)), run(case, "reference", learnable(negative)),
                      tol("float64"), f"negative tensor {case.arg}")
    with pytest.raises(ValueError, match=case.arg):
        run(case, "chunked", negative)  # a number still is checked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float32_temperature_with_low_precision_features(dtype):
    """The scale is computed in the math dtype (float32 here); the temperature's gradient comes back
    in its own dtype."""
    views = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_()
    t = learnable(0.5, torch.float32)
    fastcl.ntxent_loss(views, t, backend="chunked").backward()
    ref_views = views.detach().double().requires_grad_()
    ref_t = learnable(0.5)
    fastcl.ntxent_loss(ref_views, ref_t, backend="reference").backward()
    assert t.grad.dtype == torch.float32 and views.grad.dtype == dtype
    assert_close(t.grad.double(), ref_t.grad, tol("temperature gradient"), f"{dtype} features")


# --- modules ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleCase:
    cls: type
    arg: str               # the constructor argument that takes the parameter
    forward: Callable      # (module, a, b) -> loss
    functional: Callable   # (a, b, temperature) -> the same loss through fastcl's functional API


LABELS = torch.tensor([0, 1, 0, 1, 2, 2])
MODULES = [
    ModuleCase(fastcl.nn.NTXentLoss, "temperature", lambda m, a, b: m(a, b),
               lambda a, b, t: fastcl.ntxent_loss([a, b], t, normalize=True)),
    ModuleCase(fastcl.nn.DCLLoss, "temperature", lambda m, a, b: m(a, b),
               lambda a, b, t: fastcl.dcl_loss(a, b, t, normalize=True)),
    ModuleCase(fastcl.nn.DCLWLoss, "temperature", lambda m, a, b: m(a, b),
               lambda a, b, t: fastcl.dcl_loss(a, b, t, weighting="vmf", normalize=True)),
    ModuleCase(fastcl.nn.SupConLoss, "temperature", lambda m, a, b: m(a, LABELS),
               lambda a, b, t: fastcl.supcon_loss(a, LABELS, t, normalize=True)),
    ModuleCase(fastcl.nn.InfoNCELoss, "temperature", lambda m, a, b: m(a, b), fastcl.infonce_loss),
    ModuleCase(fastcl.nn.MWLoss, "temperature", lambda m, a, b: m(a, b), fastcl.mw_loss),
    ModuleCase(fastcl.nn.MVInfoNCELoss, "temperature", lambda m, a, b: m(torch.stack([a, b])),
               lambda a, b, t: fastcl.mv_infonce_loss(torch.stack([a, b]), t)),
    ModuleCase(fastcl.nn.MVDHELLoss, "temperature", lambda m, a, b: m(torch.stack([a, b])),
               lambda a, b, t: fastcl.mv_dhel_loss(torch.stack([a, b]), t)),
    ModuleCase(fastcl.nn.MaxSimLoss, "temperature", lambda m, a, b: m(a[:, None], b[:, None]),
               lambda a, b, t: fastcl.maxsim_loss(a[:, None], b[:, None], t)),
    ModuleCase(fastcl.nn.UniformityLoss, "t", lambda m, a, b: m(a), lambda a, b, t: fastcl.uniformity_loss(a, t)),
]


@pytest.mark.parametrize("case", MODULES, ids=lambda c: c.cls.__name__)
def test_module_learns_a_parameter(case):
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    param = nn.Parameter(torch.tensor(0.4, dtype=torch.float64))
    module = case.cls(**{case.arg: param}, backend="chunked")
    assert any(p is param for p in module.parameters())  # an optimiser over module.parameters() finds it
    case.forward(module, a, b).backward()
    t = learnable(0.4)
    case.functional(a, b, t).backward()
    assert param.grad is not None and param.grad.abs() > 0
    assert_close(param.grad, t.grad, tol("module parameter"), case.cls.__name__)


@pytest.mark.parametrize("case", MODULES, ids=lambda c: c.cls.__name__)
def test_module_given_a_number_registers_no_parameter(case):
    """The README's rule: a number stays a constant, only an ``nn.Parameter`` passed in is registered
    (``list(NTXentLoss(temperature=0.5).parameters()) == []``), and the loss is the functional loss at
    that number."""
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    module = case.cls(**{case.arg: 0.4}, backend="chunked")
    assert list(module.parameters()) == []
    assert_close(case.forward(module, a, b), case.functional(a, b, 0.4), tol("module parameter"),
                 case.cls.__name__)


def test_scale_taking_modules_hold_no_parameter():
    """``ClipLoss`` and ``SigLipLoss`` take ``logit_scale`` (and the bias) in ``forward``, as open_clip's
    do: the parameters live in the model, not in the loss."""
    for module in (fastcl.nn.ClipLoss(), fastcl.nn.SigLipLoss(), fastcl.nn.CWCLLoss()):
        assert list(module.parameters()) == [], type(module).__name__


def test_every_module_with_a_temperature_is_covered():
    modules = [getattr(fastcl.nn, name) for name in fastcl.nn.__all__]
    modules = [m for m in modules if isinstance(m, type) and issubclass(m, nn.Module)]
    takes = {m.__name__ for m in modules if set(inspect.signature(m).parameters) & {"temperature"}}
    functional_wrappers = {"InfoNCELoss", "MaxSimLoss", "MWLoss", "MVInfoNCELoss", "MVDHELLoss", "UniformityLoss"}
    assert takes | functional_wrappers == {c.cls.__name__ for c in MODULES}


def test_clip_module_sends_logit_scale_its_gradient():
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    fastcl.nn.ClipLoss(backend="chunked")(a, b, scale).backward()
    ref = learnable(2.0)
    fastcl.clip_loss(a, b, ref, backend="reference").backward()
    assert_close(scale.grad, ref.grad, tol("module parameter"), "ClipLoss logit_scale")


def test_log_parametrised_temperature_traces_without_graph_breaks():
    """The usual way to keep a learned temperature positive, compiled whole (no device sync), gives
    eager's loss and gradient."""
    views = torch.randn(2, 6, 4)

    def step(log_t):
        loss = fastcl.ntxent_loss(views, log_t.exp(), backend="chunked")
        loss.backward()
        return loss.detach()

    eager_t = nn.Parameter(torch.tensor(-1.0))
    want = step(eager_t)
    compiled_t = nn.Parameter(torch.tensor(-1.0))
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            got = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled_t)
    finally:
        torch._dynamo.reset()
    assert_close(got, want, tol("torch default", torch.float32), "compiled loss")
    assert_close(compiled_t.grad, eager_t.grad, tol("torch default", torch.float32), "compiled gradient")
