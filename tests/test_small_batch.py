"""The small-S path ``"auto"`` takes below ``registry.MATERIALISE_BELOW_PAIRS`` (the ``reference``
backend's math, written with the fewest ops per call): values and every gradient against the cpu
engine and against a hand-written float64 formula, for each option that routes through it; the NaN
check it makes on S instead of the inputs; S scaled on either side of ``D = N``."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl.backend import registry, resolve
from fastcl.losses._common import finish
from fastcl.losses.siglip import siglip_negatives_loss
from tolerances import assert_close, tol

F64 = torch.float64
ENGINE = "cpu" if "cpu" in fastcl.backends("cpu") else "chunked"  # the fused kernels where they are built
# (M, D): D < N (S is scaled) and D > N (x is scaled); primes, so no tile divides them
SHAPES = [(13, 5), (7, 29)]


def feats(*shape, seed, grad=True):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return t.requires_grad_(grad)


def grads(out, leaves):
    return torch.autograd.grad(out.sum(), leaves, allow_unused=True, materialize_grads=True)


def both(fn, leaves):
    """``fn`` on the small-S path ("auto" here) and on an engine: (loss, gradients) each."""
    got = fn("auto")
    want = fn(ENGINE)
    return (got, grads(got, leaves)), (want, grads(want, leaves))


def clip_by_hand(x, y, s, eps=0.0, bidirectional=True, labels=None, reduction="mean"):
    """CLIP as its docstring writes it, on the materialised S, row by row."""
    S = s * x @ y.T
    t = torch.arange(len(x)) if labels is None else labels
    lse = S.logsumexp(1)
    r = lse - (1 - eps) * S[torch.arange(len(x)), t] - eps * S.mean(1)
    if bidirectional:
        c = S.logsumexp(0) - (1 - eps) * S.diagonal() - eps * S.mean(0)
        r = (r + c) / 2
    return {"mean": r.mean(), "sum": r.sum(), "none": r}[reduction]


def siglip_by_hand(x, y, s, b, reduction="mean"):
    S = s * x @ y.T + b
    z = 2 * torch.eye(len(x), dtype=S.dtype) - 1
    per_row = -F.logsigmoid(z * S).sum(1)
    return {"mean": per_row.sum() / len(x), "sum": per_row.sum(), "none": per_row}[reduction]


def test_these_sizes_take_the_small_s_path():
    x = torch.zeros(13, 5, dtype=F64)
    assert resolve("auto", x, op="lse", pairs=13 * 13) == "reference"
    assert resolve("auto", x, op="pointwise", pairs=13 * 13) == "reference"


@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_clip_matches_the_engine_and_the_formula(m, d, reduction, eps, bidirectional):
    """eps = 0 reads the diagonal of each direction's log-softmax, eps > 0 takes torch's cross-entropy."""
    x, y, s = feats(m, d, seed=1), feats(m, d, seed=2), torch.tensor(2.5, dtype=F64, requires_grad=True)
    leaves = [x, y, s]
    got, want = both(lambda b: fastcl.clip_loss(x, y, s, label_smoothing=eps, reduction=reduction,
                                                bidirectional=bidirectional, backend=b), leaves)
    assert_close(got, want, tol("float64"), "auto vs the engine")
    hand = clip_by_hand(x, y, s, eps, bidirectional, reduction=reduction)
    assert_close(got, (hand, grads(hand, leaves)), tol("float64"), "auto vs the formula")


@pytest.mark.parametrize("m,d", SHAPES)
def test_clip_with_labels_one_direction(m, d):
    x, y = feats(m, d, seed=3), feats(m + 4, d, seed=4)
    s = torch.tensor(1.7, dtype=F64, requires_grad=True)
    labels = torch.randint(0, m + 4, (m,), generator=torch.Generator().manual_seed(5))
    leaves = [x, y, s]
    got, want = both(lambda b: fastcl.clip_loss(x, y, s, labels=labels, bidirectional=False, label_smoothing=0.1,
                                                backend=b), leaves)
    assert_close(got, want, tol("float64"), "auto vs the engine")
    hand = clip_by_hand(x, y, s, 0.1, bidirectional=False, labels=labels)
    assert_close(got, (hand, grads(hand, leaves)), tol("float64"), "auto vs the formula")


@pytest.mark.parametrize("m,d", SHAPES)
def test_infonce_learnable_temperature_extra_negatives_and_normalize(m, d):
    q, k, negs = feats(m, d, seed=6), feats(m, d, seed=7), feats(3, d, seed=8)
    log_t = torch.tensor(math.log(0.2), dtype=F64, requires_grad=True)
    leaves = [q, k, negs, log_t]
    got, want = both(lambda b: fastcl.infonce_loss(q, k, log_t.exp(), extra_negatives=negs, normalize=True,
                                                   backend=b), leaves)
    assert_close(got, want, tol("float64"), "auto vs the engine")
    qn, cols = F.normalize(q, dim=1), F.normalize(torch.cat([k, negs]), dim=1)
    S = qn @ cols.T / log_t.exp()
    hand = (S.logsumexp(1) - S.diagonal()).mean()
    assert_close(got, (hand, grads(hand, leaves)), tol("float64"), "auto vs the formula")


@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_siglip_matches_the_engine_and_the_formula(m, d, reduction):
    x, y = feats(m, d, seed=9), feats(m, d, seed=10)
    s, b = torch.tensor(3.0, dtype=F64, requires_grad=True), torch.tensor(-2.0, dtype=F64, requires_grad=True)
    leaves = [x, y, s, b]
    got, want = both(lambda bk: fastcl.siglip_loss(x, y, s, b, reduction=reduction, backend=bk), leaves)
    assert_close(got, want, tol("float64"), "auto vs the engine")
    hand = siglip_by_hand(x, y, s, b, reduction)
    assert_close(got, (hand, grads(hand, leaves)), tol("float64"), "auto vs the formula")


def test_siglip_negatives_only():
    x, y = feats(5, 11, seed=11), feats(8, 11, seed=12)
    s, b = torch.tensor(2.0, dtype=F64, requires_grad=True), torch.tensor(-1.0, dtype=F64, requires_grad=True)
    leaves = [x, y, s, b]
    got, want = both(lambda bk: siglip_negatives_loss(x, y, s, b, backend=bk), leaves)
    assert_close(got, want, tol("float64"), "auto vs the engine")
    hand = -F.logsigmoid(-(s * x @ y.T + b)).sum() / 5
    assert_close(got, (hand, grads(hand, leaves)), tol("float64"), "auto vs the formula")


@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("where", ["x", "y", "scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_nonfinite_input_gives_nan_on_either_side_of_the_check(m, d, loss, where, value):
    """The check reads S when S is the smaller (D > N / 2 here for (7, 29)), the inputs otherwise."""
    x, y = feats(m, d, seed=13, grad=False).abs(), feats(m, d, seed=14, grad=False).abs()
    s = torch.tensor(2.0, dtype=F64)
    {"x": x, "y": y, "scale": s.view(1)}[where][0] = value
    out = fastcl.clip_loss(x, y, s) if loss == "clip" else fastcl.siglip_loss(x, y, s, -1.0)
    assert torch.isnan(out), out


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("on", ["scores", "inputs"])
def test_one_nonfinite_value_makes_the_loss_nan(on, value):
    """The check itself (the math around it often turns an infinity into NaN on its own, so the losses'
    tests alone would not see it go): one bad value, in the scores or in one of the inputs."""
    x, S = torch.ones(4, 3), torch.ones(2, 2)
    (S if on == "scores" else x)[1, 0] = value
    out = torch.tensor(0.5, requires_grad=True)
    got = finish(out * 1, torch.float32, x, torch.ones(4, 3), torch.tensor(2.0), scores=S if on == "scores" else None)
    assert torch.isnan(got)


def test_the_check_is_exact_for_huge_finite_values():
    """A loss of finite inputs at the edge of the range stays finite: on the CPU a sum that overflows
    (3e38 + 3e38) is told apart from a non-finite value by the ends; elsewhere e - e is added."""
    big = torch.tensor([[3e38, 3e38], [-3e38, 2.0]])
    out = torch.tensor(1.5, requires_grad=True)
    for scores in (None, big):  # the inputs' ends (stacked), or S's (two)
        got = finish(out * 1, torch.float32, big, big, torch.tensor(1.0), scores=scores)
        assert got.item() == 1.5
        got.backward()
        assert out.grad.item() == 1.0
        out.grad = None


def test_above_the_threshold_auto_takes_an_engine(monkeypatch):
    monkeypatch.setattr(registry, "MATERIALISE_BELOW_PAIRS", {"lse": 12 * 12, "pointwise": 12 * 12})
    x = torch.zeros(13, 5)
    assert resolve("auto", x, op="lse", pairs=13 * 13) == ENGINE
    assert resolve("auto", x, op="pointwise", pairs=13 * 13) == ENGINE
