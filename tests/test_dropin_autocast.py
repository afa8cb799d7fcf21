"""The ``fastcl.nn`` drop-ins under ``torch.autocast``: the loss has the dtype its peer's loss has there.

Each peer is restated from its source, as written (the ops autocast sees matter, so the formulas
use the same ops: ``@``/``einsum``, ``F.cross_entropy``, ``F.logsigmoid(...).sum()``, ...):
- open_clip ``ClipLoss``: ``logit_scale * x @ y.T`` both ways, ``F.cross_entropy`` each, averaged
  (``src/open_clip/loss.py``, ``get_logits`` and ``forward``);
- open_clip ``SigLipLoss._loss``: ``-F.logsigmoid(labels * (s x @ y.T + b)).sum() / M``;
- lightly ``NTXentLoss`` (``lightly/loss/ntx_ent_loss.py``): normalise, ``einsum`` logits,
  ``nn.CrossEntropyLoss``; with a memory bank ``[<out0_i, out1_i> | out0_i @ bank.T] / t``;
- lightly ``DCLLoss``/``DCLWLoss`` (``lightly/loss/dcl_loss.py`` as of lightly PR #1827, one
  ``logsumexp`` over both views' negatives): normalise, ``einsum``, ``logsumexp``, ``mean``; DCLW's
  weights ``2 - B softmax(<out0_i, out1_i> / sigma)``.

Only CPU autocast runs here (the CUDA op lists differ: see ``fastcl.nn``'s docstring); the values
are checked against the same formulas in float64 on the same (rounded) inputs, and fastcl's
float32 results to float32 accuracy (a rounded bfloat16 value cast up would miss by up to 0.4%).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastcl import nn as fnn
from tolerances import assert_close, tol

D = 6
AUTOCAST = torch.bfloat16


def open_clip_clip(x, y, logit_scale):
    labels = torch.arange(x.shape[0])
    logits_per_image = logit_scale * x @ y.T
    logits_per_text = logit_scale * y @ x.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def open_clip_siglip(x, y, logit_scale, logit_bias):
    labels = 2 * torch.eye(x.shape[0], dtype=x.dtype) - torch.ones(x.shape[0], x.shape[0], dtype=x.dtype)
    logits = logit_scale * x @ y.T + logit_bias
    return -F.logsigmoid(labels * logits).sum() / x.shape[0]


def _unit(out0, out1, normalized):
    return (out0, out1) if normalized else (F.normalize(out0, dim=1), F.normalize(out1, dim=1))


def lightly_ntxent(out0, out1, temperature=0.5, *, normalized=False):
    out0, out1 = _unit(out0, out1, normalized)
    b, diag = out0.shape[0], torch.eye(out0.shape[0], dtype=torch.bool)
    l00 = torch.einsum("nc,mc->nm", out0, out0) / temperature
    l01 = torch.einsum("nc,mc->nm", out0, out1) / temperature
    l10 = torch.einsum("nc,mc->nm", out1, out0) / temperature
    l11 = torch.einsum("nc,mc->nm", out1, out1) / temperature
    logits = torch.cat([torch.cat([l01, l00[~diag].view(b, -1)], 1), torch.cat([l10, l11[~diag].view(b, -1)], 1)])
    return torch.nn.CrossEntropyLoss()(logits, torch.arange(b).repeat(2))


def lightly_ntxent_bank(out0, out1, bank, temperature=0.5, *, normalized=False):
    out0, out1 = _unit(out0, out1, normalized)
    pos = torch.einsum("nc,nc->n", out0, out1).unsqueeze(-1)
    neg = torch.einsum("nc,kc->nk", out0, bank)
    logits = torch.cat([pos, neg], 1) / temperature
    return torch.nn.CrossEntropyLoss()(logits, torch.zeros(out0.shape[0], dtype=torch.long))


def lightly_dcl(out0, out1, temperature=0.1, sigma=None, *, normalized=False):
    out0, out1 = _unit(out0, out1, normalized)

    def one_way(a, b):
        n, diag = a.shape[0], torch.eye(a.shape[0], dtype=torch.bool)
        s00 = torch.einsum("nc,mc->nm", a, a) / temperature
        s01 = torch.einsum("nc,mc->nm", a, b) / temperature
        positive = -s01[diag]
        if sigma is not None:
            weights = 2 - n * F.softmax(torch.einsum("nm,nm->n", a.detach(), b.detach()) / sigma, dim=0)
            positive = positive * weights
        all_negatives = torch.cat([s00[~diag].view(n, -1), s01[~diag].view(n, -1)], 1)
        return (positive + torch.logsumexp(all_negatives, 1)).mean()

    return 0.5 * (one_way(out0, out1) + one_way(out1, out0))


def _inputs(dtype, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = (F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1).to(dtype) for _ in range(2))
    return x, y


CASES = {  # name: (fastcl module factory, peer formula, extra args)
    "ClipLoss": (lambda: fnn.ClipLoss(), open_clip_clip, (torch.tensor(10.0),)),
    "SigLipLoss": (lambda: fnn.SigLipLoss(), open_clip_siglip, (torch.tensor(10.0), torch.tensor(-3.0))),
    "NTXentLoss": (lambda: fnn.NTXentLoss(), lightly_ntxent, ()),
    "DCLLoss": (lambda: fnn.DCLLoss(), lightly_dcl, ()),
    "DCLWLoss": (lambda: fnn.DCLWLoss(sigma=0.5), lambda a, b, **kw: lightly_dcl(a, b, sigma=0.5, **kw), ()),
}


def _run(name, make, peer, extra, dtype):
    x, y = _inputs(dtype)
    ours_in = [t.clone().requires_grad_() for t in (x, y)]
    with torch.autocast("cpu", dtype=AUTOCAST):
        ours = make()(*ours_in, *extra)
        theirs = peer(x, y, *extra)
    if name in ("ClipLoss", "SigLipLoss"):  # open_clip: the features as given
        exact = peer(x.double(), y.double(), *(e.double() for e in extra))
    else:
        exact = peer(_as_rounded(x), _as_rounded(y), normalized=True)
    return ours, theirs, exact, ours_in


def _as_rounded(features):
    """The unit rows as lightly's losses and fastcl's ``normalize=True`` use them: rounded to the
    features' dtype (fastcl normalises in float32 first, lightly in that dtype: an ulp apart)."""
    return F.normalize(features.double(), dim=1).to(features.dtype).double()


def _tol(dtype):
    return tol("peer") if dtype == torch.float64 else tol("low precision", dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_dropin_has_the_peers_dtype_under_cpu_autocast(name, dtype):
    if dtype == torch.float16 and name not in ("ClipLoss", "SigLipLoss"):
        pytest.skip("lightly's einsum raises on float16 features under bfloat16 CPU autocast: no dtype to match")
    ours, theirs, exact, inputs = _run(name, *CASES[name], dtype)
    assert ours.dtype == theirs.dtype, f"{name}: fastcl {ours.dtype}, peer {theirs.dtype}"
    assert_close(ours.double(), exact, _tol(theirs.dtype), f"{name} vs float64 math")
    low = torch.float64 if dtype == torch.float64 else AUTOCAST
    assert_close(theirs.double(), exact, _tol(low), f"{name}'s peer formula vs float64 math")
    grads = torch.autograd.grad(ours, inputs)
    assert [g.dtype for g in grads] == [dtype, dtype]


def test_ntxent_memory_bank_under_cpu_autocast_is_float32():
    module = fnn.NTXentLoss(memory_bank_size=(4, D))
    x, y = _inputs(torch.bfloat16)
    bank = module.memory_bank.bank.detach().clone()  # what this call reads; fastcl reads it in the features dtype
    with torch.autocast("cpu", dtype=AUTOCAST):
        ours = module(x.clone().requires_grad_(), y)
        theirs = lightly_ntxent_bank(x, y, bank)
    assert ours.dtype == theirs.dtype == torch.float32
    exact = lightly_ntxent_bank(_as_rounded(x), _as_rounded(y), bank.to(x.dtype).double(), normalized=True)
    assert_close(ours.double(), exact, tol("low precision", torch.float32), "NTXentLoss(memory bank) vs float64 math")


def test_output_dict_and_outside_autocast_keep_the_features_dtype():
    x, y = _inputs(torch.bfloat16)
    assert fnn.ClipLoss()(x, y, 10.0).dtype == torch.bfloat16  # no autocast: open_clip's CE keeps bfloat16 too
    assert open_clip_clip(x, y, torch.tensor(10.0)).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=AUTOCAST):
        assert fnn.ClipLoss()(x, y, 10.0, output_dict=True)["contrastive_loss"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
def test_metric_learning_dropin_has_pmls_dtype_under_cpu_autocast(name, dtype):
    """Against pytorch-metric-learning itself (installed): under CPU autocast its loss stays in the
    autocast dtype (matmul, then exp / logsumexp); fastcl's is cast to it once from float32 math: the
    float64 loss rounded once (per-row terms rounded first would miss by more than half an ulp)."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    from fastcl import metric_learning

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, D, generator=gen).to(dtype)
    labels = torch.randint(0, 3, (12,), generator=gen)
    ours_in = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=AUTOCAST):
        ours = getattr(metric_learning, name)(temperature=0.5)(ours_in, labels)
        theirs = getattr(pml, name)(temperature=0.5)(x, labels)
    exact = getattr(pml, name)(temperature=0.5)(x.double(), labels)
    assert ours.dtype == theirs.dtype == AUTOCAST
    half_ulp = torch.finfo(AUTOCAST).eps * 2.0 ** torch.floor(torch.log2(exact.abs())) / 2
    assert abs(ours.double() - exact) <= half_ulp + 1e-6, "not the float64 loss rounded once"
    assert abs(ours.double() - exact) <= abs(theirs.double() - exact) + 1e-6
    assert torch.autograd.grad(ours, ours_in)[0].dtype == dtype
    assert getattr(metric_learning, name)(temperature=0.5)(x, labels).dtype == dtype  # outside autocast
