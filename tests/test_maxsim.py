"""``fastcl.maxsim_loss`` (late interaction): every backend against ``reference`` (the materialised
``[B, N, Lq, Ld]`` definition) in float64, loss and every gradient, with masks, labels, extra
documents, odd shapes and ties built on purpose; low precision; gradcheck; errors; compile; memory.

Integer-valued tokens make every dot product exact, so ties are everywhere and every backend must
route each gradient to the same (lowest-index) document token. The ``triton`` parameters exist only
under TRITON_INTERPRET=1: ``test_triton_interpreter_session`` reruns this file's triton cases in a
child pytest with it (see tests/test_triton.py for why).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import fastcl
import sessions
from fastcl.backend import registry
from fastcl.backend.chunked import maxsim as chunked_maxsim
from sessions import INTERPRETED
from tolerances import assert_close, assert_runs_close, tol

# Every backend that declares maxsim and runs on CPU tensors here (triton in the TRITON_INTERPRET=1 session).
BACKENDS = [b for b in fastcl.backends("cpu", op="maxsim") if b != "reference"]


@pytest.fixture(params=["default", "tiny"], ids=["tiles=default", "tiles=tiny"])
def tiles(request, monkeypatch):
    """Tiny chunked tiles: one query against one document per tile, many tiles with ragged ends."""
    if request.param == "tiny":
        monkeypatch.setattr(chunked_maxsim, "TILE_ELEMENTS", 40)
    return request.param


@dataclass(frozen=True)
class Case:
    name: str
    b: int
    n: int
    lq: int
    ld: int
    dim: int
    k: int = 0                      # extra documents
    masks: bool = False
    integer: bool = False           # integer tokens: exact products, ties everywhere
    options: dict = field(default_factory=dict)

    def inputs(self, dtype=torch.float64):
        gen = torch.Generator().manual_seed(sum(map(ord, self.name)))

        def tokens(*shape):
            if self.integer:
                t = torch.randint(-2, 3, shape, generator=gen).to(torch.float64)
            else:
                t = torch.randn(*shape, generator=gen, dtype=torch.float64)
            return t.to(dtype).requires_grad_()

        q, d = tokens(self.b, self.lq, self.dim), tokens(self.n, self.ld, self.dim)
        kwargs = dict(self.options)
        if self.k:
            kwargs["extra_docs"] = tokens(self.k, self.ld, self.dim)
        if self.masks:
            kwargs["q_mask"] = torch.rand(self.b, self.lq, generator=gen) > 0.3
            d_mask = torch.rand(self.n, self.ld, generator=gen) > 0.4
            d_mask[:, 0] = True
            if self.n > 2 and "labels" in kwargs:
                d_mask[1] = False  # an all-padding document (no query targets it): -inf, no gradient
            kwargs["d_mask"] = d_mask
            if self.k:
                kwargs["extra_docs_mask"] = torch.rand(self.k, self.ld, generator=gen) > 0.2
                kwargs["extra_docs_mask"][0] = False  # an all-padding hard negative
        if "labels" in kwargs:
            labels = torch.randint(0, self.n, (self.b,), generator=gen)
            kwargs["labels"] = labels.masked_fill(labels == 1, 0) if self.n > 2 else labels
        if isinstance(kwargs.get("temperature"), float):  # a learnable temperature
            kwargs["temperature"] = torch.tensor(kwargs["temperature"], dtype=torch.float64).requires_grad_()
        return q, d, kwargs


CASES = [
    Case("1x1", 1, 1, 1, 1, 1),
    Case("5x5-ints", 5, 5, 3, 7, 4, integer=True),
    Case("7x13-labels-extra-masks", 7, 13, 5, 11, 3, k=3, masks=True, options={"labels": True}),
    Case("11x11-ints-masks-normscores", 11, 11, 6, 9, 2, masks=True, integer=True,
         options={"normalize_scores": True, "reduction": "sum"}),
    Case("6x6-symmetric-temp", 6, 6, 4, 5, 8, masks=True, options={"symmetric": True, "temperature": 0.3}),
    Case("9x9-none-normalize", 9, 9, 2, 17, 5, k=2, options={"reduction": "none", "normalize": True}),
    Case("3x17-ints-extra-labels", 3, 17, 7, 3, 3, k=4, integer=True, masks=True, options={"labels": True}),
    Case("13x13-tile-tails", 13, 13, 19, 29, 6, options={"temperature": 0.7}),
    # several query and document blocks on cpu (16 query tokens x 64 document tokens: 3 x 5 tiles)
    Case("40x40-many-tiles", 40, 40, 16, 64, 8, k=3, masks=True),
]
MANY_TILES = CASES[-1]
GRAD_CASES = [c for c in CASES if c.b > 1]


def run(case: Case, backend: str, dtype=torch.float64):
    q, d, kwargs = case.inputs(dtype)
    out = fastcl.maxsim_loss(q, d, **{"temperature": 0.5, **kwargs}, backend=backend)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    leaves = [q, d, kwargs.get("extra_docs"), kwargs.get("temperature")]
    grads = [None if not isinstance(t, torch.Tensor) else t.grad for t in leaves]
    return out.detach(), grads


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_matches_reference(backend, case, tiles):
    if tiles == "tiny" and backend != "chunked":
        pytest.skip("tile sizes are the chunked backend's")
    if backend == "triton" and case is MANY_TILES:
        pytest.skip("interpreter time: one program per (query, document)")
    assert_runs_close(run(case, backend), run(case, "reference"), tol("maxsim float64"), f"{backend} vs reference")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_ties_go_to_the_lowest_document_token(backend):
    """Document 0 repeats one token three times (every query token ties there); a padding token
    holding a larger copy must not win; only the first copy receives gradient."""
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [1.0, 1.0]]], dtype=torch.float64, requires_grad=True)
    d = torch.tensor([[[9.0, 9.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]],
                      [[0.0, -1.0], [-1.0, 0.0], [-1.0, 0.0], [0.2, 0.1]]], dtype=torch.float64, requires_grad=True)
    d_mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    loss = fastcl.maxsim_loss(q, d, 1.0, d_mask=d_mask, backend=backend)
    loss.backward()
    assert d.grad[0, 0].abs().sum() == 0, "padding received gradient"
    assert d.grad[0, 1].abs().sum() > 0
    assert d.grad[0, 2:].abs().sum() == 0, "a later tied token received gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_within_dtype_tolerance(backend, dtype):
    case = CASES[2]
    got_out, got_grads = run(case, backend, dtype)
    # the reference on the same rounded inputs, in float64
    want_out, want_grads = _reference_on_rounded(case, dtype)
    assert got_out.dtype == dtype
    for i, (g, w) in enumerate(zip([got_out, *got_grads], [want_out, *want_grads])):
        if w is None:
            continue
        assert g.dtype == dtype
        assert_close(g, w, tol("maxsim low precision", dtype), f"{backend} {dtype}: output {i}")


def _reference_on_rounded(case, dtype):
    q, d, kwargs = case.inputs(dtype)
    q64, d64 = q.detach().double().requires_grad_(), d.detach().double().requires_grad_()
    kw = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for k, v in kwargs.items()}
    out = fastcl.maxsim_loss(q64, d64, **{"temperature": 0.5, **kw}, backend="reference")
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    x = kw.get("extra_docs")
    return out.detach(), [q64.grad, d64.grad, None if x is None else x.grad]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gradcheck(backend):
    """Random (tie-free) tokens: the max picks are locally constant, the loss smooth."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    d = torch.randn(4, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    q_mask = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    d_mask = torch.rand(4, 6, generator=gen) > 0.3
    d_mask[:, 0] = True
    labels = torch.tensor([2, 0, 3])

    def f(q, d, x, t):
        return fastcl.maxsim_loss(q, d, t, q_mask=q_mask, d_mask=d_mask, labels=labels, extra_docs=x,
                                  normalize_scores=True, backend=backend)

    assert torch.autograd.gradcheck(f, (q, d, x, t))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_backward_is_bitwise_deterministic_for_any_thread_count(backend):
    first = run(MANY_TILES, backend)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        second = run(MANY_TILES, backend)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", *[b for b in BACKENDS if b != "triton"]])
@pytest.mark.parametrize("where", ["q", "d", "extra_docs"])
def test_nonfinite_token_gives_nan_loss(backend, where):
    q, d, kwargs = Case("nan", 3, 3, 2, 4, 3, k=2).inputs()
    tensors = {"q": q, "d": d, **kwargs}
    bad = tensors[where].detach().clone()
    bad[1, 1, 0] = float("nan")
    tensors[where] = bad
    out = fastcl.maxsim_loss(tensors.pop("q"), tensors.pop("d"), 0.1, **tensors, backend=backend)
    assert torch.isnan(out)


def test_module_is_the_functional():
    q, d, kwargs = CASES[2].inputs()
    module = fastcl.nn.MaxSimLoss(temperature=0.5)
    assert_close(module(q, d, **kwargs), fastcl.maxsim_loss(q, d, 0.5, **kwargs), tol("torch default"), "module")
    assert "maxsim_loss" in fastcl.functional.__all__


def test_scores_are_the_definition_in_plain_words():
    """One query, one document, by hand: s = sum over real query tokens of their best real match."""
    q = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]], dtype=torch.float64)
    d = torch.tensor([[[3.0, 1.0], [0.0, 1.0], [100.0, 100.0]]], dtype=torch.float64)
    q_mask, d_mask = torch.tensor([[True, True, False]]), torch.tensor([[True, True, False]])
    for backend in ["reference", *[b for b in BACKENDS if b != "triton"]]:
        # s = max(3, 0) + max(2, 2) = 5; one document: the loss is lse of one logit minus it = 0
        loss = fastcl.maxsim_loss(q, d, 1.0, q_mask=q_mask, d_mask=d_mask, backend=backend)
        assert loss.item() == 0.0
        two = torch.cat([d, d * 0])
        loss = fastcl.maxsim_loss(q, two, 1.0, q_mask=q_mask, d_mask=torch.cat([d_mask, d_mask]),
                                  labels=torch.tensor([0]), backend=backend)
        assert_close(loss, torch.log1p(torch.exp(torch.tensor(-5.0, dtype=torch.float64))), tol("torch default"),
                     f"{backend}: two documents")


# --- errors -----------------------------------------------------------------------------------------

def _good():
    return dict(q=torch.randn(3, 4, 5), d=torch.randn(3, 6, 5))


BAD = {
    "q-rank2": (dict(q=torch.randn(3, 5)), ValueError, "q"),
    "q-int": (dict(q=torch.zeros(3, 4, 5, dtype=torch.long)), TypeError, "q"),
    "q-list": (dict(q=[[0.0]]), TypeError, "q"),
    "d-empty": (dict(d=torch.randn(3, 0, 5)), ValueError, "d"),
    "d-width": (dict(d=torch.randn(3, 6, 4)), ValueError, "d"),
    "d-dtype": (dict(d=torch.randn(3, 6, 5, dtype=torch.float64)), TypeError, "d"),
    "d-device": (dict(d=torch.randn(3, 6, 5, device="meta")), ValueError, "d"),
    "q_mask-float": (dict(q_mask=torch.ones(3, 4)), TypeError, "q_mask"),
    "q_mask-shape": (dict(q_mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, "q_mask"),
    "d_mask-shape": (dict(d_mask=torch.ones(6, 3, dtype=torch.bool)), ValueError, "d_mask"),
    "d_mask-device": (dict(d_mask=torch.ones(3, 6, dtype=torch.bool, device="meta")), ValueError, "d_mask"),
    "unpaired": (dict(d=torch.randn(4, 6, 5)), ValueError, "labels"),
    "labels-range": (dict(labels=torch.tensor([0, 1, 3])), ValueError, "labels"),
    "labels-float": (dict(labels=torch.zeros(3)), TypeError, "labels"),
    "labels-length": (dict(labels=torch.zeros(2, dtype=torch.long)), ValueError, "labels"),
    "extra_docs-tokens": (dict(extra_docs=torch.randn(2, 7, 5)), ValueError, "extra_docs"),
    "extra_docs-width": (dict(extra_docs=torch.randn(2, 6, 4)), ValueError, "extra_docs"),
    "extra_docs_mask-alone": (dict(extra_docs_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "extra_docs"),
    "extra_docs_mask-shape": (dict(extra_docs=torch.randn(2, 6, 5), extra_docs_mask=torch.ones(2, 5, dtype=torch.bool)),
                              ValueError, "extra_docs_mask"),
    "temperature-zero": (dict(temperature=0.0), ValueError, "temperature"),
    "temperature-str": (dict(temperature="hot"), TypeError, "temperature"),
    "reduction": (dict(reduction="avg"), ValueError, "reduction"),
    "symmetric-labels": (dict(symmetric=True, labels=torch.tensor([0, 1, 2])), ValueError, "symmetric"),
    "backend-unknown": (dict(backend="fastest"), ValueError, "backend"),
    "backend-cuda": (dict(backend="cuda"), fastcl.BackendUnavailableError, "CUDA MaxSim"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_input_raises_naming_the_argument(what):
    changes, exc, arg = BAD[what]
    kwargs = {**_good(), **changes}
    with pytest.raises(exc, match=arg):
        fastcl.maxsim_loss(kwargs.pop("q"), kwargs.pop("d"), **kwargs)


# --- the custom op, torch.compile -----------------------------------------------------------------

@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_the_custom_op_passes_opcheck(backend):
    from fastcl.backend.maxsim import _maxsim_op

    q, d, kwargs = CASES[2].inputs()
    torch.library.opcheck(_maxsim_op, (backend, q, d, kwargs["q_mask"], kwargs["d_mask"]))
    torch.library.opcheck(_maxsim_op, (backend, q.detach(), d, None, None))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_fullgraph_training_step_matches_eager(backend):
    torch._dynamo.reset()
    case = CASES[2]

    def step(q, d, kwargs):
        out = fastcl.maxsim_loss(q, d, 0.5, **kwargs, backend=backend)
        out.backward()
        return out.detach()

    q, d, kwargs = case.inputs(torch.float32)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, d, kwargs)
    got_grads = [q.grad, d.grad, kwargs["extra_docs"].grad]
    torch._dynamo.reset()
    q, d, kwargs = case.inputs(torch.float32)
    want = step(q, d, kwargs)
    assert_runs_close((got, got_grads), (want, [q.grad, d.grad, kwargs["extra_docs"].grad]),
                      tol("compiled", torch.float32), f"{backend} compiled")


def test_second_derivatives_refused_on_fused_backends():
    q, d, _ = CASES[1].inputs()
    loss = fastcl.maxsim_loss(q, d, 0.5, backend="chunked")
    (gq,) = torch.autograd.grad(loss, q, create_graph=True)
    with pytest.raises(NotImplementedError, match="first derivatives"):
        gq.sum().backward()


# --- memory -----------------------------------------------------------------------------------------

PROBE = """
    import sys, torch, fastcl
    backend, b, lq, ld, dim = sys.argv[1], *map(int, sys.argv[2:])
    q = torch.randn(b, lq, dim, requires_grad=True)
    d = torch.randn(b, ld, dim, requires_grad=True)
    fastcl.maxsim_loss(q[:2], d[:2], backend=backend).backward()  # warm-up: lazy initialisation
    q.grad = d.grad = None
    def step():
        fastcl.maxsim_loss(q, d, backend=backend).backward()
        return q.grad.nbytes + d.grad.nbytes
"""


@pytest.mark.skipif("cpu" not in fastcl.backends("cpu"), reason="the cpu backend is not built here")
def test_cpu_peak_memory_is_a_few_tiles_not_the_token_similarities():
    """B = N = 96, Lq = 32, Ld = 256, D = 64 in a fresh process: the materialised similarities alone
    would be 288 MiB (and as much again for their gradient); bench/ measures B = N = 512."""
    extra = sessions.peak_extra_bytes(PROBE, "cpu", 96, 32, 256, 64)
    assert extra < 24 * 2**20, f"{extra / 2**20:.1f} MiB beyond inputs and gradients"


# --- the interpreter session ------------------------------------------------------------------------

@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter session itself")
@pytest.mark.skipif(not registry.TRITON_INSTALLED, reason="Triton is not installed")
def test_triton_interpreter_session():
    """This file's triton cases, in a child pytest with TRITON_INTERPRET=1."""
    sessions.interpreter_session(__file__, "-k", "triton and not session", timeout_s=600)
