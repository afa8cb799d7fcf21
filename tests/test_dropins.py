"""The drop-in modules against their peers' behaviour, in float64, on every CPU backend: lightly's
memory bank and constructor checks, pytorch-metric-learning's reference embeddings, wrappers,
reducers and zero loss, open_clip's optional bias and per-block loss.

lightly and open_clip are not dependencies: what they do is restated below (one docstring each says
what it encodes). pytorch-metric-learning is, so it runs as is. ``tools/peer_tests.py`` runs the
peers' own test files against these modules.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

import fastcl
from fastcl import metric_learning as ml
from fastcl import nn as fnn
from fastcl.losses.clip import queue_infonce_loss
from fastcl.losses.pairs import positive_pairs
from tolerances import assert_close, tol

BACKENDS = fastcl.backends("cpu", torch.float64)
backends = pytest.mark.parametrize("backend", BACKENDS)
D = 5


def feats(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(actual, expected):
    assert_close(actual, expected, tol("peer"), "fastcl vs peer")


def compare(ours, anchor, *inputs):
    """Both on fresh leaf copies of ``inputs``: the values and every input's gradient."""
    a = [t.detach().clone().requires_grad_() for t in inputs]
    b = [t.detach().clone().requires_grad_() for t in inputs]
    out_a, out_b = ours(*a), anchor(*b)
    close(out_a, out_b)
    grads_a = torch.autograd.grad(out_a, a, allow_unused=True, materialize_grads=True)
    close(grads_a, torch.autograd.grad(out_b, b, allow_unused=True, materialize_grads=True))


# --- lightly, restated --------------------------------------------------------------------------

class LightlyQueueNTXent:
    """lightly ``NTXentLoss(memory_bank_size=...)`` with its ``MemoryBankModule``: normalise both
    views; logits ``[<out0_i, out1_i> | out0_i @ bank.T] / t``, CE to column 0, against the bank as
    it was before the call; then, if ``out0`` requires grad, ``out1`` (normalised, detached) is
    written at the pointer: a batch reaching the end fills it and the pointer returns to 0."""

    def __init__(self, bank: torch.Tensor, temperature: float):
        self.bank, self.ptr, self.t = bank.clone(), 0, temperature

    def __call__(self, out0, out1):
        out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        bank = self.bank.clone()
        if out0.requires_grad:
            k, n = bank.shape[0], out1.shape[0]
            if self.ptr + n >= k:
                self.bank[self.ptr:] = out1[:k - self.ptr].detach()
                self.ptr = 0
            else:
                self.bank[self.ptr:self.ptr + n] = out1.detach()
                self.ptr += n
        logits = torch.cat([(out0 * out1).sum(1, keepdim=True), out0 @ bank.T], 1) / self.t
        return F.cross_entropy(logits, torch.zeros(out0.shape[0], dtype=torch.long))


def lightly_ntxent(out0, out1, temperature):
    """lightly ``NTXentLoss`` without a bank: CE over ``[sim to the other view | own view off-diagonal]``."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    b, off = out0.shape[0], ~torch.eye(out0.shape[0], dtype=torch.bool)
    rows = [torch.cat([u @ v.T, (u @ u.T)[off].view(b, -1)], 1) / temperature for u, v in ((out0, out1), (out1, out0))]
    return F.cross_entropy(torch.cat(rows), torch.arange(b).repeat(2))


def fresh_bank(module: fnn.NTXentLoss) -> torch.Tensor:
    return module.memory_bank.bank.detach().clone()


# Batches that fill a 7-row bank, wrap it mid-batch, and skip an update (out0 without grad).
QUEUE_STEPS = [(3, True), (5, True), (1, False), (8, True), (2, True), (6, True)]


@backends
@pytest.mark.parametrize("size", [(7, D), (2, D), (16, D)], ids=str)
def test_memory_bank_matches_lightly_over_steps(backend, size):
    module = fnn.NTXentLoss(0.3, memory_bank_size=size, backend=backend).double()
    anchor = LightlyQueueNTXent(fresh_bank(module), 0.3)
    for step, (n, grad) in enumerate(QUEUE_STEPS):
        out0, out1 = feats(n, D, seed=2 * step), feats(n, D, seed=2 * step + 1)
        a0, b0 = out0.clone().requires_grad_(grad), out0.clone().requires_grad_(grad)
        a1, b1 = out1.clone().requires_grad_(), out1.clone().requires_grad_()
        ours, theirs = module(a0, a1), anchor(b0, b1)
        close(ours, theirs)
        wrt_a, wrt_b = ([a0, a1], [b0, b1]) if grad else ([a1], [b1])
        close(torch.autograd.grad(ours, wrt_a), torch.autograd.grad(theirs, wrt_b))
        close(module.memory_bank.bank, anchor.bank)
        assert int(module.memory_bank.bank_ptr) == anchor.ptr


@pytest.mark.parametrize("size", [6, (6,), [6]], ids=str)
def test_memory_bank_without_a_feature_dimension_raises_as_lightly_1_6(size):
    # lightly 1.6 (PR #2021): "Memory bank size 'size=10' does not specify the feature dimension. Set it
    # with 'size=(10, dim)', or pass 'size=0' to disable the memory bank." (lightly 1.5 warned and
    # learned D from the first batch; a one-element sequence lightly 1.6 takes, then fails on.)
    with pytest.raises(ValueError, match=r"does not specify the feature dimension\. Set it with 'size=\(6, dim\)'"):
        fnn.NTXentLoss(memory_bank_size=size)
    with pytest.raises(ValueError, match="does not specify the feature dimension"):
        fnn.MemoryBank(6)


@pytest.mark.parametrize("size", [(5, D), [5, D], 0, (0,), (0, D)], ids=str)
def test_memory_bank_sizes_that_lightly_takes_do_not_warn(size):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = fnn.NTXentLoss(memory_bank_size=size, backend="chunked")
    sizes = (size,) if isinstance(size, int) else tuple(size)
    assert module.memory_bank.bank.shape == sizes  # (K, D) is allocated at once
    assert module.memory_bank.state_dict() == {}  # non-persistent buffers, as lightly's


def test_memory_bank_zero_is_simclr():
    a, b = feats(6, D), feats(6, D, seed=1)
    for size in (0, (0, D)):
        close(fnn.NTXentLoss(0.5, memory_bank_size=size, backend="chunked")(a, b), lightly_ntxent(a, b, 0.5))


def test_memory_bank_follows_the_module_and_reads_in_the_features_dtype():
    module = fnn.NTXentLoss(memory_bank_size=(4, D), backend="chunked")
    loss = module(feats(3, D).float().requires_grad_(), feats(3, D, seed=1).float())
    assert loss.dtype == torch.float32 and module.memory_bank.bank.dtype == torch.float32
    module.double()
    assert module.memory_bank.bank.dtype == torch.float64
    assert module(feats(3, D).requires_grad_(), feats(3, D, seed=1)).dtype == torch.float64
    assert fnn.NTXentLoss(memory_bank_size=(4, D))(feats(2, D).requires_grad_(), feats(2, D)).dtype == torch.float64


def test_memory_bank_rejects_bad_sizes_and_width():
    for size in (-1, (4, -2), (), (4, D, 2)):
        with pytest.raises(ValueError, match="memory_bank_size"):
            fnn.NTXentLoss(memory_bank_size=size)
    for size in (2.5, (True, D), "4"):
        with pytest.raises(TypeError, match="memory_bank_size"):
            fnn.NTXentLoss(memory_bank_size=size)
    module = fnn.NTXentLoss(memory_bank_size=(4, D + 1))
    with pytest.raises(ValueError, match="memory bank holds rows of width 6"):
        module(feats(3, D).requires_grad_(), feats(3, D, seed=1))
    assert int(module.memory_bank.bank_ptr) == 0


@backends
def test_queue_infonce_matches_cross_entropy(backend):
    t = 0.4

    def anchor(q, k, queue):
        return F.cross_entropy(torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / t,
                               torch.zeros(q.shape[0], dtype=torch.long))

    compare(lambda q, k, queue: queue_infonce_loss(q, k, queue, t, backend=backend), anchor,
            feats(6, D), feats(6, D, seed=1), feats(9, D, seed=2))


@backends
def test_ntxent_two_views_of_one_sample_is_exactly_zero(backend):
    """lightly's test demands 0 to 1e-12: each row's only other column is its positive."""
    for seed in range(5):
        a, b = feats(1, 2, seed=seed).float(), feats(1, 2, seed=seed + 9).float()
        assert fnn.NTXentLoss(0.1, backend=backend)(a, b).item() == 0.0


@backends
def test_lightly_negative_temperature(backend):
    a, b = feats(5, D), feats(5, D, seed=1)
    close(fnn.NTXentLoss(-1.0, backend=backend)(a, b), lightly_ntxent(a, b, -1.0))
    close(fnn.DCLLoss(-0.5, backend=backend)(a, b), fastcl.dcl_loss(a, b, torch.tensor(-0.5, dtype=torch.float64),
                                                                    normalize=True, backend=backend))
    with pytest.raises(ValueError, match="1e-8"):
        fnn.NTXentLoss(1e-9)


@pytest.mark.parametrize("cls", [fnn.NTXentLoss, fnn.DCLLoss, fnn.DCLWLoss])
def test_gather_distributed_needs_torch_distributed(monkeypatch, cls):
    calls = []

    def unavailable():
        calls.append(1)
        return False

    cls(gather_distributed=False)
    monkeypatch.setattr(torch.distributed, "is_available", unavailable)
    with pytest.raises(ValueError, match="torch.distributed is not available"):
        cls(gather_distributed=True)
    assert len(calls) == 1  # lightly's tests count the calls


def test_negative_mises_fisher_weights_match_lightly():
    a, b = F.normalize(feats(6, D), dim=1), F.normalize(feats(6, D, seed=1), dim=1)
    for sigma in (1e-7, 0.5, 1e4):
        expected = 2 - 6 * torch.softmax((a * b).sum(1) / sigma, dim=0)
        close(fnn.negative_mises_fisher_weights(a, b, sigma), expected)
    close(fnn.DCLLoss(weight_fn=fnn.negative_mises_fisher_weights, backend="chunked")(a, b),
          fnn.DCLWLoss(backend="chunked")(a, b))


# --- open_clip, restated ------------------------------------------------------------------------

def openclip_siglip_block(img, txt, scale, bias, negative_only):
    """open_clip ``SigLipLoss._loss``: labels ``2 eye - 1`` (or all -1), ``-sum logsigmoid / B``."""
    logits = scale * img @ txt.T + (0 if bias is None else bias)
    labels = -torch.ones_like(logits)
    if not negative_only:
        labels = labels + 2 * torch.eye(img.shape[0], dtype=img.dtype)
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


@backends
@pytest.mark.parametrize("n_txt", [7, 3, 11])
def test_siglip_negative_only_block_matches_open_clip(backend, n_txt):
    module = fnn.SigLipLoss(backend=backend)
    compare(lambda i, t, s, b: module._loss(i, t, s, b, negative_only=True),
            lambda i, t, s, b: openclip_siglip_block(i, t, s, b, True),
            feats(7, D), feats(n_txt, D, seed=1), torch.tensor(3.0, dtype=torch.float64),
            torch.tensor(-2.0, dtype=torch.float64))


@backends
def test_siglip_without_bias_matches_open_clip(backend):
    module = fnn.SigLipLoss(chunk_size=4, backend=backend)
    compare(lambda i, t, s: module(i, t, s, None), lambda i, t, s: openclip_siglip_block(i, t, s, None, False),
            feats(6, D), feats(6, D, seed=1), torch.tensor(2.0, dtype=torch.float64))
    compare(lambda i, t, s: module._loss(i, t, s), lambda i, t, s: openclip_siglip_block(i, t, s, None, False),
            feats(6, D), feats(6, D, seed=1), torch.tensor(2.0, dtype=torch.float64))


def test_siglip_constructor_follows_open_clip():
    assert fnn.SigLipLoss(False, 0, 1, None, 8).chunk_size == 8  # open_clip's positional order
    for bad, error in (({"dist_impl": "ring"}, ValueError), ({"chunk_size": -1}, ValueError),
                       ({"chunk_size": 1.5}, TypeError)):
        with pytest.raises(error, match="SigLipLoss"):
            fnn.SigLipLoss(**bad)
    with pytest.raises(fastcl.nn.UnsupportedFeatureError, match="horovod"):
        fnn.SigLipLoss(use_horovod=True)


@backends
def test_clip_logit_bias_changes_nothing(backend):
    def openclip(img, txt, scale, bias):
        logits = scale * img @ txt.T + bias
        labels = torch.arange(img.shape[0])
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    module = fnn.ClipLoss(backend=backend)
    compare(lambda i, t, s, b: module(i, t, s, b) + 0 * b, openclip, feats(6, D), feats(6, D, seed=1),
            torch.tensor(2.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64))


# --- pytorch-metric-learning, run as is ---------------------------------------------------------

PML = {"SupConLoss": (ml.SupConLoss, pml_losses.SupConLoss), "NTXentLoss": (ml.NTXentLoss, pml_losses.NTXentLoss)}
losses = pytest.mark.parametrize("loss", list(PML))
LABELS = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 4, 5, 5])
REF_LABELS = torch.tensor([0, 1, 1, 2, 7, 7, 3, 0, 5])


def pair(loss, backend, **options):
    ours, theirs = PML[loss]
    return ours(0.2, backend=backend, **options), theirs(0.2, **options)


@backends
@losses
def test_pml_batch_and_reference_embeddings(backend, loss):
    ours, theirs = pair(loss, backend)
    compare(lambda x: ours(x, LABELS), lambda x: theirs(x, LABELS), feats(12, D))
    compare(lambda x, r: ours(x, LABELS, ref_emb=r, ref_labels=REF_LABELS),
            lambda x, r: theirs(x, LABELS, ref_emb=r, ref_labels=REF_LABELS), feats(12, D, seed=1), feats(9, D, seed=2))
    # ref_labels *being* labels: pml drops the diagonal pairs
    compare(lambda x, r: ours(x, LABELS, ref_emb=r, ref_labels=LABELS),
            lambda x, r: theirs(x, LABELS, ref_emb=r, ref_labels=LABELS), feats(12, D, seed=3), feats(12, D, seed=4))


@backends
@losses
@pytest.mark.parametrize("labels", [[0, 0, 0, 0], [1, 2, 3, 4], [5], [0, 1]], ids=str)
def test_pml_zero_loss_without_pairs(backend, loss, labels):
    """One class (no negative pair), all distinct (no positive), one row, one of each: 0, zero gradient."""
    labels = torch.tensor(labels)
    ours, theirs = pair(loss, backend)
    compare(lambda x: ours(x, labels), lambda x: theirs(x, labels), feats(labels.shape[0], D, seed=5))
    x = feats(labels.shape[0], D, seed=5).requires_grad_()
    out = ours(x, labels)
    out.backward()
    assert out.item() == 0 and torch.all(x.grad == 0)


@backends
def test_supcon_one_class_differs_from_the_functional_loss(backend):
    labels, x = torch.zeros(4, dtype=torch.long), feats(4, D, seed=6)
    assert ml.SupConLoss(backend=backend)(x, labels).item() == 0
    assert fastcl.supcon_loss(x, labels, normalize=True, backend=backend).item() >= math.log(2)  # SPEC's math


@backends
@losses
def test_pml_wrappers(backend, loss):
    ours, theirs = pair(loss, backend)
    for symmetric in (True, False):
        compare(lambda e, r, sym=symmetric: pml_losses.SelfSupervisedLoss(ours, symmetric=sym)(e, r),
                lambda e, r, sym=symmetric: pml_losses.SelfSupervisedLoss(theirs, symmetric=sym)(e, r),
                feats(8, D, seed=7), feats(8, D, seed=8))
    xbm_ours = pml_losses.CrossBatchMemory(ours, D, memory_size=13)
    xbm_theirs = pml_losses.CrossBatchMemory(theirs, D, memory_size=13)
    for step in range(4):  # fills, then wraps the memory; every loss removes the batch's own slots
        labels = torch.randint(0, 4, (6,), generator=torch.Generator().manual_seed(step))
        compare(lambda x, y=labels: xbm_ours(x, y), lambda x, y=labels: xbm_theirs(x, y), feats(6, D, seed=10 + step))
    mask = torch.tensor([True, False, True, False, False, True])
    labels = torch.tensor([0, 1, 1, 0, 2, 2])
    compare(lambda x: xbm_ours(x, labels, enqueue_mask=mask), lambda x: xbm_theirs(x, labels, enqueue_mask=mask),
            feats(6, D, seed=20))


@backends
@losses
def test_pml_reducer_and_similarities(backend, loss):
    per_anchor = pml_reducers.PerAnchorReducer(pml_reducers.AvgNonZeroReducer())
    for options in ({"reducer": per_anchor}, {"reducer": pml_reducers.SumReducer()},
                    {"distance": pml_distances.CosineSimilarity()},
                    {"distance": pml_distances.DotProductSimilarity(normalize_embeddings=False)}):
        ours, theirs = pair(loss, backend, **options)
        compare(lambda x, f=ours: f(x, LABELS), lambda x, f=theirs: f(x, LABELS), feats(12, D, seed=21) / 3)


@backends
@losses
def test_pml_all_pairs_indices_tuple(backend, loss):
    ours, theirs = pair(loss, backend)
    for indices in (lmu.get_all_pairs_indices(LABELS), lmu.get_all_pairs_indices(LABELS, LABELS.clone())):
        compare(lambda x, i=indices: ours(x, LABELS, i), lambda x, i=indices: theirs(x, LABELS, i),
                feats(12, D, seed=22))


@backends
def test_pml_ntxent_caps_a_pair_at_minus_log_tiny(backend):
    """pml adds finfo.tiny to each pair's probability: an extreme pair costs -log(tiny), not more."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])  # 0 and 1 are opposite positives, 2 is 0's copy as a negative
    ours, theirs = pair("NTXentLoss", backend)
    ours.temperature = theirs.temperature = 1e-3
    close(ours(x, labels), theirs(x, labels))
    assert ours(x, labels).item() > 700 / 2


@pytest.mark.parametrize("loss", list(PML))
def test_pml_unsupported_features_raise(loss):
    cls = PML[loss][0]
    unsupported = fastcl.nn.UnsupportedFeatureError
    with pytest.raises(unsupported, match="LpDistance"):
        cls(distance=pml_distances.LpDistance())
    with pytest.raises(unsupported, match="embedding_regularizer"):
        cls(embedding_regularizer=object())
    x = feats(12, D, seed=23)
    mined = pml_miners.MultiSimilarityMiner(epsilon=0.1)(x.float(), LABELS)
    with pytest.raises(unsupported, match="indices_tuple"):
        cls()(x, LABELS, mined)
    with pytest.raises(unsupported, match="indices_tuple"):
        cls()(x, LABELS, lmu.get_all_triplets_indices(LABELS))
    with pytest.raises(unsupported, match="without labels"):
        cls()(x, None, lmu.get_all_pairs_indices(LABELS))
    with pytest.raises(ValueError, match="cannot both be None"):
        cls()(x)
    with pytest.raises(ValueError, match="ref_labels"):
        cls()(x, LABELS, ref_emb=x)
    with pytest.raises(ValueError, match="labels must have shape"):
        cls()(x, LABELS[:5])


def test_positive_pairs_are_torch_where_order():
    gx = torch.tensor([2, 0, 1, 0, 3, 2])
    gy = torch.tensor([0, 2, 2, 1, 0, 0, 4])
    skip = torch.tensor([1, -1, 3, 4, -1, -1])
    matches = gx[:, None] == gy[None, :]
    matches[torch.arange(6)[skip >= 0], skip[skip >= 0]] = False
    rows, cols = positive_pairs(gx, gy, skip)
    want_rows, want_cols = torch.where(matches)
    assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols)


@backends
def test_supcon_views_extension_still_works(backend):
    labels = torch.tensor([0, 1, 0, 2, 1])
    compare(lambda z: ml.SupConLoss(0.3, backend=backend)(z, labels),
            lambda z: pml_losses.SupConLoss(0.3)(z.reshape(10, D), labels.repeat(2)), feats(2, 5, D, seed=24))
