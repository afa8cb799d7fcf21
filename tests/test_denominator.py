"""What stays in a row's denominator, on ``clip_loss`` and ``infonce_loss``: false negatives
(``row_keys=``/``col_keys=``) and more positives (``positives=``, ``multi_positive="joint"`` or
``"decoupled"``), GISTEmbed's guided false negatives (``guide=``, ``guide_margin=``). Every
backend against the rule written out pair by pair, and the errors. Every backend against the reference, in
every dtype and with tiny tiles, is ``tests/cases.py``'s keyed cases (test_backends.py and the rest);
over a process group, ``tests/distributed_cases.py``'s."""
from __future__ import annotations

import pytest
import torch

import fastcl
import sessions
from fastcl.backend import registry
from sessions import INTERPRETED

# Every backend that leaves listed pairs out inside its kernels (op lse_exclude) and runs on CPU
# tensors here: triton in the TRITON_INTERPRET=1 session (``test_triton_interpreter_session``).
EXCLUDING = [*fastcl.backends("cpu", torch.float64, op="lse_exclude"), "auto"]


def _inputs(m, n, k, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(m, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    negs = torch.randn(k, d, generator=g, dtype=torch.float64) if k else None
    return x, y, negs, torch.randint(0, 3, (m,), generator=g), torch.randint(0, 3, (n + k,), generator=g), g


def _by_hand(x, y, negs, s, rk, ck, targets, bidirectional):
    """The SPEC's rule, one row (and column) at a time: j leaves i's denominator when the keys are
    equal and j is not i's positive."""
    cols = y if negs is None else torch.cat([y, negs])
    S = s * x @ cols.T
    m = S.shape[0]
    rows = []
    for i in range(m):
        kept = [j for j in range(S.shape[1]) if rk[i] != ck[j] or j == targets[i]]
        rows.append(S[i, kept].logsumexp(0) - S[i, targets[i]])
    r = torch.stack(rows)
    if not bidirectional:
        return r
    c = torch.stack([S[[i for i in range(m) if rk[i] != ck[j] or i == j], j].logsumexp(0) - S[j, j]
                     for j in range(S.shape[1])])
    return (r + c) / 2


@pytest.mark.parametrize("backend", fastcl.backends("cpu", torch.float64))
@pytest.mark.parametrize("shape", [(9, 9, 0, True), (5, 11, 4, False), (8, 8, 3, False)],
                         ids=["bidirectional", "labels-negatives", "diagonal-negatives"])
def test_every_backend_is_the_rule_written_out(backend, shape):
    m, n, k, bidirectional = shape
    x, y, negs, rk, ck, g = _inputs(m, n, k)
    labels = None if bidirectional or m == n else torch.randint(0, n, (m,), generator=g)
    targets = torch.arange(m) if labels is None else labels
    got = fastcl.clip_loss(x, y, 1.7, labels=labels, bidirectional=bidirectional, extra_negatives=negs,
                           row_keys=rk, col_keys=ck, reduction="none", backend=backend)
    want = _by_hand(x, y, negs, 1.7, rk, ck, targets, bidirectional)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_keys_that_touch_nothing_change_nothing():
    x, y, _, _, _, _ = _inputs(10, 10, 0)
    plain = fastcl.clip_loss(x, y, 2.0)
    distinct = fastcl.clip_loss(x, y, 2.0, row_keys=torch.arange(10), col_keys=torch.arange(10))  # only targets keyed
    torch.testing.assert_close(distinct, plain, rtol=1e-13, atol=1e-13)


def test_module_and_infonce_take_the_keys():
    x, y, _, rk, ck, _ = _inputs(7, 7, 0)
    a = fastcl.nn.InfoNCELoss(temperature=0.5)(x, y, row_keys=rk, col_keys=ck)
    b = fastcl.clip_loss(x, y, 2.0, bidirectional=False, row_keys=rk, col_keys=ck, backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_row_left_without_negatives_is_an_error(backend):
    x, y, _, _, _, _ = _inputs(4, 4, 0)
    same = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="leave row 0 no negative"):
        fastcl.infonce_loss(x, y, row_keys=same, col_keys=same, backend=backend)
    col_keys = torch.tensor([0, 1, 1, 1])  # row 0 keeps them all; rows 1-3 keep only column 0 and their target
    fastcl.infonce_loss(x, y, row_keys=torch.tensor([0, 1, 1, 1]), col_keys=col_keys, backend=backend)
    with pytest.raises(ValueError, match="leave column 0 no negative"):  # column 0: every other row has key 0
        fastcl.clip_loss(x, y, 1.0, row_keys=torch.tensor([0, 0, 0, 0]), col_keys=torch.tensor([0, 1, 2, 3]),
                         backend=backend)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"row_keys": torch.zeros(5, dtype=torch.long)}, ValueError, "both row_keys and col_keys"),
    ({"row_keys": torch.zeros(4), "col_keys": torch.zeros(5, dtype=torch.long)}, TypeError,
     "row_keys must hold integers"),
    ({"row_keys": torch.zeros(4, dtype=torch.long), "col_keys": torch.zeros(4, dtype=torch.long)}, ValueError,
     r"col_keys must have shape \[5\]"),
    ({"row_keys": torch.arange(4), "col_keys": torch.arange(5), "label_smoothing": 0.1}, ValueError,
     "label_smoothing must be 0 with row_keys"),
])
def test_bad_keys_name_the_argument(kwargs, error, match):
    x, y, _, _, _, _ = _inputs(4, 5, 0)
    with pytest.raises(error, match=match):
        fastcl.clip_loss(x, y, 1.0, labels=torch.arange(4), bidirectional=False, **kwargs)


def _joint_by_hand(x, y, s, positives, targets, rk=None, ck=None):
    """SupCon's L_out over a row: the mean over P_i of lse over the kept columns minus S_ip."""
    S = s * x @ y.T
    out = []
    for i in range(S.shape[0]):
        pos = sorted({int(targets[i])} | {int(p) for p in positives[i] if p >= 0})
        kept = [j for j in range(S.shape[1]) if rk is None or rk[i] != ck[j] or j in pos]
        out.append(S[i, kept].logsumexp(0) - S[i, pos].mean())
    return torch.stack(out)


@pytest.mark.parametrize("backend", fastcl.backends("cpu", torch.float64))
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keys"])
def test_joint_positives_are_the_rule_written_out(backend, keyed):
    x, y, _, rk, ck, g = _inputs(6, 13, 0)
    labels = torch.randint(0, 13, (6,), generator=g)
    positives = torch.randint(-1, 13, (6, 4), generator=g)
    positives[0] = labels[0]  # a repeat of the target counts once
    positives[1, :2] = -1
    kw = {"row_keys": rk, "col_keys": ck} if keyed else {}
    got = fastcl.infonce_loss(x, y, 0.6, labels=labels, positives=positives, multi_positive="joint",
                              reduction="none", backend=backend, **kw)
    want = _joint_by_hand(x, y, 1 / 0.6, positives, labels, *((rk, ck) if keyed else ()))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_positives_only_padding_is_plain_infonce():
    x, y, _, _, _, _ = _inputs(5, 5, 0)
    padded = fastcl.infonce_loss(x, y, 0.5, positives=torch.full((5, 3), -1), multi_positive="joint")
    torch.testing.assert_close(padded, fastcl.infonce_loss(x, y, 0.5), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"positives": torch.zeros(4, 2, dtype=torch.long)}, ValueError, "needs multi_positive="),
    ({"multi_positive": "joint"}, ValueError, r"needs positives=\[M, P\]"),
    ({"positives": torch.zeros(4, 2, dtype=torch.long), "multi_positive": "both"}, ValueError, "one of"),
    ({"positives": torch.zeros(3, 2, dtype=torch.long), "multi_positive": "joint"}, ValueError,
     r"positives must have shape \[4, P\]"),
    ({"positives": torch.full((4, 2), 5), "multi_positive": "joint"}, ValueError, r"must lie in \[0, 5\)"),
    ({"positives": torch.full((4, 2), -2), "multi_positive": "joint"}, ValueError, "must lie in"),
    ({"positives": torch.zeros(4, 2), "multi_positive": "joint"}, TypeError, "positives must hold integers"),
])
def test_bad_positives_name_the_argument(kwargs, error, match):
    x, y, _, _, _, _ = _inputs(4, 5, 0)
    with pytest.raises(error, match=match):
        fastcl.infonce_loss(x, y, labels=torch.arange(4), **kwargs)


def test_positives_are_row_direction_only_and_keep_a_negative():
    x, y, _, _, _, _ = _inputs(4, 4, 0)
    with pytest.raises(ValueError, match="bidirectional=False"):
        fastcl.clip_loss(x, y, 1.0, positives=torch.zeros(4, 1, dtype=torch.long), multi_positive="joint")
    every = torch.arange(4).expand(4, 4)
    with pytest.raises(ValueError, match="leave row 0 no negative"):
        fastcl.infonce_loss(x, y, positives=every, multi_positive="joint")


def _decoupled_by_hand(x, y, s, positives, targets, rk=None, ck=None):
    """DEXML: each positive against the kept columns that are not positives."""
    S = s * x @ y.T
    out = []
    for i in range(S.shape[0]):
        pos = sorted({int(targets[i])} | {int(p) for p in positives[i] if p >= 0})
        negs = [j for j in range(S.shape[1]) if j not in pos and (rk is None or rk[i] != ck[j])]
        out.append(sum(torch.logaddexp(S[i, p], S[i, negs].logsumexp(0)) - S[i, p] for p in pos) / len(pos))
    return torch.stack(out)


@pytest.mark.parametrize("backend", EXCLUDING)
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keys"])
@pytest.mark.parametrize("tiles", ["default", "tiny"])
def test_decoupled_positives_are_the_rule_written_out(backend, keyed, tiles, monkeypatch):
    from fastcl.backend.chunked import tiles as chunked_tiles

    if tiles == "tiny":
        monkeypatch.setattr(chunked_tiles, "MAX_TILE_COLS", 5)
        monkeypatch.setattr(chunked_tiles, "TILE_ELEMENTS", 15)
    x, y, _, rk, ck, g = _inputs(7, 15, 0)
    x.requires_grad_(), y.requires_grad_()
    labels = torch.randint(0, 15, (7,), generator=g)
    positives = torch.randint(-1, 15, (7, 3), generator=g)
    positives[0, 0] = labels[0]  # a repeat of the target counts once
    kw = {"row_keys": rk, "col_keys": ck} if keyed else {}
    got = fastcl.clip_loss(x, y, 1.7, labels=labels, bidirectional=False, positives=positives,
                           multi_positive="decoupled", reduction="none", backend=backend, **kw)
    want = _decoupled_by_hand(x, y, 1.7, positives, labels, *((rk, ck) if keyed else ()))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)
    grads = [torch.autograd.grad((out * weights).sum(), (x, y)) for out in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_decoupled_needs_a_backend_that_leaves_pairs_out():
    """The positives leave the tiles' log-sum-exp inside the kernels (op lse_exclude): a backend
    without that op says so and names those that have it; cpu and chunked compute it."""

    x, y, _, _, _, _ = _inputs(5, 5, 0)
    positives = torch.tensor([[1], [-1], [0], [-1], [-1]])
    registry.register(registry.BackendSpec(
        name="lse_only", label="lse-only", devices=("cpu",), dtypes=registry.FLOATS, native_dtypes=registry.WIDE,
        ops={"lse": registry.Op("fastcl.backend.chunked.lse")}))
    try:
        with pytest.raises(fastcl.backend.BackendUnavailableError, match="lse_exclude.*'cpu' or 'chunked'"):
            fastcl.infonce_loss(x, y, positives=positives, multi_positive="decoupled", backend="lse_only")
    finally:
        registry.unregister("lse_only")
    want = fastcl.infonce_loss(x, y, positives=positives, multi_positive="decoupled", backend="reference")
    for backend in ("cpu", "chunked"):
        got = fastcl.infonce_loss(x, y, positives=positives, multi_positive="decoupled", backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _guided_by_hand(S, G, targets, margin, positives=None):
    """GISTEmbed's rule: j leaves row i when G_ij > G_{i,t(i)} - margin (strict) and is no positive."""
    out = []
    for i in range(S.shape[0]):
        t = int(targets[i])
        pos = {t} | ({int(p) for p in positives[i] if p >= 0} if positives is not None else set())
        kept = [j for j in range(S.shape[1]) if j in pos or not G[i, j] > G[i, t] - margin]
        if positives is None:
            out.append(S[i, kept].logsumexp(0) - S[i, t])
        else:  # joint
            out.append(S[i, kept].logsumexp(0) - S[i, sorted(pos)].mean())
    return torch.stack(out)


@pytest.mark.parametrize("backend", EXCLUDING)
@pytest.mark.parametrize("margin", [0.0, 0.5, -1.0])
def test_guide_is_the_rule_written_out_with_ties(backend, margin, monkeypatch):
    """Integer guide embeddings: every similarity exact, so the tie (a column equal to the
    target's, guide-wise) is a tie in the computation too, and stays in at margin 0. The guide's
    similarities are taken a few columns at a time."""
    from fastcl.losses import _denominator

    monkeypatch.setattr(_denominator, "GUIDE_TILE", 20)  # 2 columns per step at M = 8
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(13, 6, generator=g, dtype=torch.float64)
    negs = torch.randn(3, 6, generator=g, dtype=torch.float64)
    gx = torch.randint(-3, 4, (8, 4), generator=g).double()
    gy = torch.randint(-3, 4, (16, 4), generator=g).double()
    labels = torch.randperm(12, generator=g)[:8]
    gy[labels] = 2 * gx  # each row's target the most similar, guide-wise, or nearly
    gy[labels[0] + 1] = gy[labels[0]]  # row 0: a column as similar as its target
    got = fastcl.clip_loss(x, y, 1.3, labels=labels, bidirectional=False, extra_negatives=negs, guide=(gx, gy),
                           guide_margin=margin, reduction="none", backend=backend)
    S, G = 1.3 * x @ torch.cat([y, negs]).T, gx @ gy.T
    torch.testing.assert_close(got, _guided_by_hand(S, G, labels, margin), rtol=1e-12, atol=1e-12)
    if margin == 0.0:
        assert not G[0, labels[0] + 1] > G[0, labels[0]] - margin  # the tie was there, and stayed in


@pytest.mark.parametrize("backend", EXCLUDING[:-1])
def test_guide_with_keys_and_joint_positives(backend):
    x, y, _, rk, ck, g = _inputs(7, 11, 0)
    gx, gy = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(11, 3, generator=g, dtype=torch.float64)
    gy[:7] += 2 * gx  # the targets lean towards their rows
    positives = torch.randint(-1, 11, (7, 2), generator=g)
    got = fastcl.infonce_loss(x, y, 0.5, labels=torch.arange(7), positives=positives, multi_positive="joint",
                              row_keys=torch.arange(7),
                              col_keys=torch.arange(11), guide=(gx, gy), guide_margin=0.1, reduction="none",
                              backend=backend)  # keys that touch only the targets
    want = _guided_by_hand(2.0 * x @ y.T, gx @ gy.T, torch.arange(7), 0.1, positives)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"guide": torch.zeros(4, 3)}, TypeError, "guide must be a pair"),
    ({"guide": (torch.zeros(4, 3), torch.zeros(4, 3))}, ValueError, r"guide\[1\] must have 5 rows"),
    ({"guide": (torch.zeros(3, 3), torch.zeros(5, 3))}, ValueError, r"guide\[0\] must have 4 rows"),
    ({"guide": (torch.zeros(4, 3), torch.zeros(5, 2))}, ValueError, "feature width"),
    ({"guide": (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(5, 3))}, TypeError, "dtype"),
    ({"guide": (torch.zeros(4, 3), torch.zeros(5, 3)), "guide_margin": float("inf")}, ValueError, "guide_margin"),
])
def test_bad_guides_name_the_argument(kwargs, error, match):
    x, y, _, _, _, _ = _inputs(4, 5, 0)
    with pytest.raises(error, match=match):
        fastcl.infonce_loss(x, y, labels=torch.arange(4), **kwargs)


def test_guide_is_row_direction_only_and_keeps_a_negative():
    x, y, _, _, _, _ = _inputs(4, 4, 0)
    guide = (torch.ones(4, 2, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="guide needs bidirectional=False"):
        fastcl.clip_loss(x, y, 1.0, guide=guide)
    # every column as similar as the target: with margin 1, all leave
    with pytest.raises(ValueError, match="guide .* leave row 0 no negative"):
        fastcl.infonce_loss(x, y, guide=guide, guide_margin=1.0, backend="chunked")
    fastcl.infonce_loss(x, y, guide=guide, guide_margin=0.0, backend="chunked")  # ties stay: fine


# --- the interpreter session ----------------------------------------------------------------------

@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter session itself")
@pytest.mark.skipif(not registry.TRITON_INSTALLED, reason="Triton is not installed")
def test_triton_interpreter_session():
    """This file's triton cases, in a child pytest with TRITON_INTERPRET=1."""
    sessions.interpreter_session(__file__, "-k", "triton and not session", timeout_s=600)
