"""fastcl against the implementations SPEC.md names as anchors, in float64, on every CPU backend.

open_clip and lightly are not dependencies: their behaviour is restated below as small, independent
reference functions (one comment each says what it encodes). pytorch-metric-learning is in
requirements/dev.txt, so it is imported and run as is. Each test compares the loss and, where the
anchor defines one, the gradient of every input (and of ``logit_scale``/``logit_bias`` tensors).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses

import fastcl
from fastcl import nn as fnn
from tolerances import assert_close, tol

BACKENDS = fastcl.backends("cpu", torch.float64)
SIZES = [1, 7, 33]
PAIR_SIZES = [2, 7, 33]  # losses that need a negative (DCL, uniformity, pml's NT-Xent)
D = 5


# --- anchor behaviour, restated -------------------------------------------------------------------

def openclip_clip_loss(img, txt, logit_scale):
    """open_clip ``ClipLoss`` (one process): CE of ``s img @ txt.T`` and of its transpose, averaged."""
    logits_per_image = logit_scale * img @ txt.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def openclip_siglip_loss(img, txt, logit_scale, logit_bias):
    """open_clip ``SigLipLoss`` (one process): labels ``2 eye - 1``, ``-sum logsigmoid(labels * logits) / N``."""
    logits = logit_scale * img @ txt.T + logit_bias
    labels = 2 * torch.eye(img.shape[0], dtype=img.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


def lightly_ntxent_loss(out0, out1, temperature):
    """lightly ``NTXentLoss`` (no memory bank): normalise, drop the self-similarities, CE over
    ``[sim to the other view | sim to the own view]`` with the other view's sample as target."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    b = out0.shape[0]
    off = ~torch.eye(b, dtype=torch.bool)
    l00, l01 = out0 @ out0.T / temperature, out0 @ out1.T / temperature
    l10, l11 = out1 @ out0.T / temperature, out1 @ out1.T / temperature
    logits = torch.cat([torch.cat([l01, l00[off].view(b, -1)], 1), torch.cat([l10, l11[off].view(b, -1)], 1)])
    return F.cross_entropy(logits, torch.arange(b).repeat(2))


def lightly_vmf_weights(out0, out1, sigma=0.5):
    """lightly ``negative_mises_fisher_weights``: ``2 - B softmax(<out0_i, out1_i> / sigma)``, detached."""
    similarity = (out0 * out1).sum(1).detach() / sigma
    return 2 - out0.shape[0] * torch.softmax(similarity, dim=0)


def lightly_dcl_loss(out0, out1, temperature, weight_fn=None):
    """lightly ``DCLLoss``: normalise; per direction ``-w_i sim_01[i, i] + lse(sim_00, sim_01 off-diagonal)``,
    averaged over samples, then over the two directions."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)

    def one_direction(a, b):
        n = a.shape[0]
        off = ~torch.eye(n, dtype=torch.bool)
        sim_00, sim_01 = a @ a.T / temperature, a @ b.T / temperature
        positive = -sim_01.diagonal()
        if weight_fn is not None:
            positive = positive * weight_fn(a, b)
        negative = torch.cat([sim_00[off].view(n, -1), sim_01[off].view(n, -1)], 1).logsumexp(1)
        return (positive + negative).mean()

    return 0.5 * (one_direction(out0, out1) + one_direction(out1, out0))


# --- helpers --------------------------------------------------------------------------------------

def feats(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(actual, expected):
    assert_close(actual, expected, tol("peer"), "fastcl vs peer")


def compare(ours, anchor, *inputs, grad=True):
    """Run both on fresh leaf copies of ``inputs``; compare the values and, with ``grad``, every gradient."""
    a = [t.detach().clone().requires_grad_(grad) for t in inputs]
    b = [t.detach().clone().requires_grad_(grad) for t in inputs]
    out_a, out_b = ours(*a), anchor(*b)
    close(out_a, out_b)
    if grad:
        close(torch.autograd.grad(out_a, a), torch.autograd.grad(out_b, b))


backends = pytest.mark.parametrize("backend", BACKENDS)


def test_cpu_backends_include_the_portable_ones():
    assert {"reference", "chunked"} <= set(BACKENDS)


# --- open_clip ------------------------------------------------------------------------------------

@backends
@pytest.mark.parametrize("n", SIZES)
def test_clip_loss_matches_open_clip(backend, n):
    scale = torch.tensor(14.3, dtype=torch.float64)
    compare(lambda x, y, s: fastcl.clip_loss(x, y, s, backend=backend), openclip_clip_loss,
            feats(n, D, seed=1), feats(n, D, seed=2), scale)


@backends
@pytest.mark.parametrize("n", SIZES)
def test_clip_loss_float_scale_matches_open_clip(backend, n):
    compare(lambda x, y: fastcl.clip_loss(x, y, 2.5, backend=backend),
            lambda x, y: openclip_clip_loss(x, y, 2.5), feats(n, D, seed=3), feats(n, D, seed=4))


@backends
@pytest.mark.parametrize("n", SIZES)
def test_clip_module_matches_open_clip(backend, n):
    module = fnn.ClipLoss(backend=backend)
    scale = torch.tensor(3.0, dtype=torch.float64)
    compare(lambda x, y, s: module(x, y, s), openclip_clip_loss, feats(n, D, seed=5), feats(n, D, seed=6), scale)
    compare(lambda x, y, s: module(x, y, s, output_dict=True)["contrastive_loss"], openclip_clip_loss,
            feats(n, D, seed=5), feats(n, D, seed=6), scale)


@backends
def test_clip_module_output_dict_has_only_the_contrastive_loss(backend):
    out = fnn.ClipLoss(backend=backend)(feats(7, D), feats(7, D, seed=1), 2.0, output_dict=True)
    assert set(out) == {"contrastive_loss"} and out["contrastive_loss"].dim() == 0


@backends
@pytest.mark.parametrize("n", SIZES)
def test_siglip_loss_matches_open_clip(backend, n):
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    compare(lambda x, y, s, b: fastcl.siglip_loss(x, y, s, b, backend=backend), openclip_siglip_loss,
            feats(n, D, seed=7), feats(n, D, seed=8), scale, bias)
    compare(lambda x, y: fastcl.siglip_loss(x, y, 2.0, -1.5, backend=backend),
            lambda x, y: openclip_siglip_loss(x, y, 2.0, -1.5), feats(n, D, seed=7), feats(n, D, seed=8))


@backends
@pytest.mark.parametrize("n", SIZES)
def test_siglip_module_matches_open_clip(backend, n):
    module = fnn.SigLipLoss(backend=backend)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    compare(lambda x, y, s, b: module(x, y, s, b), openclip_siglip_loss,
            feats(n, D, seed=9), feats(n, D, seed=10), scale, bias)
    compare(lambda x, y, s, b: module(x, y, s, b, output_dict=True)["contrastive_loss"], openclip_siglip_loss,
            feats(n, D, seed=9), feats(n, D, seed=10), scale, bias)


# --- F.cross_entropy: label smoothing, labels, extra negatives -------------------------------------

@backends
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_clip_label_smoothing_matches_cross_entropy(backend, n, eps):
    def anchor(x, y, s):
        logits, labels = s * x @ y.T, torch.arange(n)
        return (F.cross_entropy(logits, labels, label_smoothing=eps)
                + F.cross_entropy(logits.T, labels, label_smoothing=eps)) / 2

    compare(lambda x, y, s: fastcl.clip_loss(x, y, s, label_smoothing=eps, backend=backend), anchor,
            feats(n, D, seed=11), feats(n, D, seed=12), torch.tensor(4.0, dtype=torch.float64))


@backends
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_clip_reductions_match_cross_entropy(backend, reduction):
    def anchor(x, y):
        logits, labels = 3.0 * x @ y.T, torch.arange(7)
        both = (F.cross_entropy(logits, labels, reduction="none", label_smoothing=0.2)
                + F.cross_entropy(logits.T, labels, reduction="none", label_smoothing=0.2)) / 2
        return both if reduction == "none" else both.sum()

    out = fastcl.clip_loss(feats(7, D), feats(7, D, seed=1), 3.0, label_smoothing=0.2, reduction=reduction,
                           backend=backend)
    close(out, anchor(feats(7, D), feats(7, D, seed=1)))


@backends
@pytest.mark.parametrize("m,n", [(1, 7), (7, 33), (33, 7), (7, 1)])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_clip_labels_one_direction_matches_cross_entropy(backend, m, n, eps):
    labels = torch.randint(0, n, (m,), generator=torch.Generator().manual_seed(m * n))
    compare(lambda x, y: fastcl.clip_loss(x, y, 2.0, labels=labels, bidirectional=False, label_smoothing=eps,
                                          backend=backend),
            lambda x, y: F.cross_entropy(2.0 * x @ y.T, labels, label_smoothing=eps),
            feats(m, D, seed=13), feats(n, D, seed=14))


@backends
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 7, 4), (7, 33, 5)])
def test_clip_labels_and_extra_negatives_match_cross_entropy(backend, m, n, k):
    labels = torch.randint(0, n, (m,), generator=torch.Generator().manual_seed(k))

    def anchor(x, y, neg):
        return F.cross_entropy(2.0 * torch.cat([x @ y.T, x @ neg.T], 1), labels, label_smoothing=0.1)

    compare(lambda x, y, neg: fastcl.clip_loss(x, y, 2.0, labels=labels, bidirectional=False,
                                               label_smoothing=0.1, extra_negatives=neg, backend=backend),
            anchor, feats(m, D, seed=15), feats(n, D, seed=16), feats(k, D, seed=17))


@backends
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", [1, 9])
def test_infonce_extra_negatives_match_cross_entropy(backend, n, k):
    t = 0.3

    def anchor(q, key, neg):
        return F.cross_entropy(torch.cat([q @ key.T, q @ neg.T], 1) / t, torch.arange(n))

    compare(lambda q, key, neg: fastcl.infonce_loss(q, key, t, extra_negatives=neg, backend=backend), anchor,
            feats(n, D, seed=18), feats(n, D, seed=19), feats(k, D, seed=20))


@backends
def test_infonce_extra_negatives_without_grad_get_none(backend):
    q, key = feats(7, D).requires_grad_(), feats(7, D, seed=1).requires_grad_()
    neg = feats(4, D, seed=2)
    loss = fastcl.infonce_loss(q, key, 0.2, extra_negatives=neg, backend=backend)
    loss.backward()
    assert neg.grad is None and q.grad is not None and key.grad is not None


# --- lightly --------------------------------------------------------------------------------------

@backends
@pytest.mark.parametrize("n", SIZES)
def test_ntxent_matches_lightly(backend, n):
    t = 0.5
    anchor = lambda a, b: lightly_ntxent_loss(a, b, t)  # noqa: E731
    a, b = feats(n, D, seed=21), feats(n, D, seed=22)
    compare(fnn.NTXentLoss(temperature=t, backend=backend), anchor, a, b)
    compare(lambda a, b: fastcl.ntxent_loss([a, b], t, normalize=True, backend=backend), anchor, a, b)
    compare(lambda a, b: fastcl.ntxent_loss(torch.stack([a, b]), t, normalize=True, backend=backend),
            anchor, a, b)


@backends
def test_ntxent_module_default_temperature_is_lightlys(backend):
    a, b = feats(7, D, seed=23), feats(7, D, seed=24)
    close(fnn.NTXentLoss(backend=backend)(a, b), lightly_ntxent_loss(a, b, 0.5))


@backends
@pytest.mark.parametrize("n", PAIR_SIZES)
def test_dcl_matches_lightly(backend, n):
    t = 0.1
    anchor = lambda a, b: lightly_dcl_loss(a, b, t)  # noqa: E731
    a, b = feats(n, D, seed=25), feats(n, D, seed=26)
    compare(fnn.DCLLoss(temperature=t, backend=backend), anchor, a, b)
    compare(lambda a, b: fastcl.dcl_loss(a, b, t, normalize=True, backend=backend), anchor, a, b)


@backends
@pytest.mark.parametrize("n", PAIR_SIZES)
def test_dcl_custom_weight_fn_matches_lightly(backend, n):
    def weight_fn(u, v):  # depends on the features, so its gradient is part of the comparison
        return 1.5 + u[:, 0] - 0.5 * v[:, 1] ** 2

    a, b = feats(n, D, seed=27), feats(n, D, seed=28)
    compare(fnn.DCLLoss(temperature=0.2, weight_fn=weight_fn, backend=backend),
            lambda a, b: lightly_dcl_loss(a, b, 0.2, weight_fn), a, b)


@backends
@pytest.mark.parametrize("n", PAIR_SIZES)
@pytest.mark.parametrize("sigma", [0.5, 0.2])
def test_dclw_matches_lightly(backend, n, sigma):
    a, b = feats(n, D, seed=29), feats(n, D, seed=30)
    anchor = lightly_dcl_loss(a, b, 0.1, lambda u, v: lightly_vmf_weights(u, v, sigma))
    close(fnn.DCLWLoss(temperature=0.1, sigma=sigma, backend=backend)(a, b), anchor)
    close(fastcl.dcl_loss(a, b, 0.1, weighting="vmf", sigma=sigma, normalize=True, backend=backend), anchor)


@backends
def test_dcl_modules_default_hyperparameters_are_lightlys(backend):
    a, b = feats(7, D, seed=31), feats(7, D, seed=32)
    close(fnn.DCLLoss(backend=backend)(a, b), lightly_dcl_loss(a, b, 0.1))
    close(fnn.DCLWLoss(backend=backend)(a, b), lightly_dcl_loss(a, b, 0.1, lightly_vmf_weights))


# --- pytorch-metric-learning ----------------------------------------------------------------------

@backends
@pytest.mark.parametrize("n", PAIR_SIZES)
def test_ntxent_matches_pml(backend, n):
    t = 0.2
    labels = torch.arange(n).repeat(2)
    compare(lambda a, b: fastcl.ntxent_loss([a, b], t, normalize=True, backend=backend),
            lambda a, b: pml_losses.NTXentLoss(temperature=t)(torch.cat([a, b]), labels),
            feats(n, D, seed=33), feats(n, D, seed=34))


SUPCON_LABELS = {
    "groups": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 1]),
    "singletons": torch.tensor([3, 0, 0, 7, 1, 1, 1, 5, 2, 2, 9]),  # 3, 7, 5, 9 have no positive
    "large": torch.randint(0, 6, (33,), generator=torch.Generator().manual_seed(35)),
}


@backends
@pytest.mark.parametrize("case", list(SUPCON_LABELS))
def test_supcon_matches_pml(backend, case):
    labels, t = SUPCON_LABELS[case], 0.1
    anchor = lambda z: pml_losses.SupConLoss(temperature=t)(z, labels)  # noqa: E731
    z = feats(labels.shape[0], D, seed=36)
    compare(lambda z: fastcl.supcon_loss(z, labels, t, normalize=True, backend=backend), anchor, z)
    compare(lambda z: fnn.SupConLoss(temperature=t, backend=backend)(z, labels), anchor, z)


@backends
def test_supcon_views_match_pml_on_stacked_rows(backend):
    labels, v, t = torch.tensor([0, 1, 0, 2, 3, 1, 4]), 3, 0.3  # every sample has its other views as positives
    compare(lambda z: fastcl.supcon_loss(z, labels, t, normalize=True, backend=backend),
            lambda z: pml_losses.SupConLoss(temperature=t)(z.reshape(v * 7, D), labels.repeat(v)),
            feats(v, 7, D, seed=37))


@backends
def test_supcon_module_default_temperature_is_pmls(backend):
    labels, z = SUPCON_LABELS["singletons"], feats(11, D, seed=38)
    close(fnn.SupConLoss(backend=backend)(z, labels), pml_losses.SupConLoss()(z, labels))


@backends
def test_supcon_rows_without_positive_are_zero_and_left_out(backend):
    labels, z = SUPCON_LABELS["singletons"], feats(11, D, seed=39)
    per_row = fastcl.supcon_loss(z, labels, 0.1, reduction="none", normalize=True, backend=backend)
    alone = torch.tensor([(labels == c).sum() == 1 for c in labels])
    assert torch.all(per_row[alone] == 0) and torch.all(per_row[~alone] != 0)
    close(fastcl.supcon_loss(z, labels, 0.1, normalize=True, backend=backend), per_row[~alone].mean())


# --- Wang & Isola closed forms ----------------------------------------------------------------------

@backends
@pytest.mark.parametrize("n", PAIR_SIZES)
@pytest.mark.parametrize("t", [2.0, 0.7])
@pytest.mark.parametrize("normalize", [False, True])
def test_uniformity_matches_pdist(backend, n, t, normalize):
    def anchor(z):
        z = F.normalize(z, dim=1) if normalize else z
        return torch.pdist(z).pow(2).mul(-t).exp().mean().log()

    compare(lambda z: fastcl.uniformity_loss(z, t, normalize=normalize, backend=backend), anchor,
            feats(n, D, seed=40) / 2)


@backends
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("alpha", [2.0, 1.0, 3.5])
def test_alignment_matches_norm(backend, n, alpha):
    compare(lambda x, y: fastcl.alignment_loss(x, y, alpha, backend=backend),
            lambda x, y: (x - y).norm(dim=1).pow(alpha).mean(), feats(n, D, seed=41), feats(n, D, seed=42))
