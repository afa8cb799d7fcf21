"""``fastcl.topk``: every backend against the materialised definition (a stable descending sort of S,
eligible columns first), exactly; against ``torch.topk(S)``; ties built on purpose; keys and the
diagonal; NaN and infinities; gradients of the values; errors; peak memory in a fresh process;
``mix_hard_negatives``.

Integer-valued features make every dot product exact in float32 and float64, so all backends
must agree bit for bit, and they make ties everywhere (the tie rule is what is tested). Normal
features check general values in float64 (ties there are improbable and rounding ~1e-16).

The ``triton`` parameters exist only under TRITON_INTERPRET=1: ``test_triton_interpreter_session``
reruns this file's triton cases in a child pytest with it (see tests/test_triton.py for why).
"""
from __future__ import annotations

import pytest
import torch

import fastcl
import sessions
from fastcl.backend import registry
from fastcl.backend.chunked import topk as chunked_topk
from sessions import INTERPRETED
from tolerances import assert_close, tol

# Every backend that declares topk and runs on CPU tensors here (triton in the TRITON_INTERPRET=1 session).
BACKENDS = [b for b in fastcl.backends("cpu", op="topk") if b != "reference"]
# (M, N, D): one element; primes; past the CPU kernel's and the interpreter's block edges (16..256,
# 64) and, with the small chunked tiles below, many chunked tiles with ragged ends.
SHAPES = [(1, 1, 1), (7, 13, 3), (130, 67, 5), (67, 131, 4), (257, 263, 3)]


@pytest.fixture(autouse=True)
def small_chunked_tiles(monkeypatch):
    monkeypatch.setattr(chunked_topk, "MAX_TILE_COLS", 16)
    monkeypatch.setattr(chunked_topk, "TILE_ELEMENTS", 16 * 11)  # 11 x 16 tiles


def integer_features(m, n, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-2, 3, (m, d), generator=gen).to(dtype),
            torch.randint(-2, 3, (n, d), generator=gen).to(dtype))


def keys_for(m, n, seed, groups=4):
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, groups, (m,), generator=gen), torch.randint(0, groups, (n,), generator=gen)


def largest_k(m, n, keyed, diagonal):
    """The largest k (at most 9) every row surely keeps: the diagonal costs one column, the row's key
    group (one of 4) less than half of them plus a few."""
    room = n - (1 if diagonal else 0) - (n // 2 + 3 if keyed else 0)
    return max(0, min(room, 9))


def assert_same(got, want, what):
    assert got.values.dtype == want.values.dtype and got.indices.dtype == torch.int64, what
    assert got.values.shape == want.values.shape, f"{what}: {tuple(got.values.shape)} vs {tuple(want.values.shape)}"
    bad = (got.indices != want.indices).nonzero()
    assert bad.numel() == 0, f"{what}: indices differ first at (row, slot) {bad[0].tolist()}: " \
        f"{got.indices[bad[0, 0]].tolist()} vs {want.indices[bad[0, 0]].tolist()}"
    assert torch.equal(got.values, want.values), f"{what}: values differ by {(got.values - want.values).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("keyed", "diagonal"), [(False, False), (False, True), (True, False), (True, True)],
                         ids=["plain", "diagonal", "keyed", "keyed-diagonal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_and_exclusions_match_the_definition_exactly(backend, shape, keyed, diagonal, dtype):
    m, n, d = shape
    if keyed and n < 8:
        pytest.skip("too few columns to leave k after excluding a key group")
    if backend == "triton" and (m > 256 or (dtype == torch.float32 and not (keyed and diagonal))):
        pytest.skip("interpreter time: its blocks are 64, which the smaller shapes already cross; the int32 keys "
                    "of float32 are checked on the keyed-diagonal cases")
    x, y = integer_features(m, n, d, dtype, seed=m + 7 * n)
    kw = {"exclude_diagonal": diagonal}
    if keyed:
        kw["row_keys"], kw["col_keys"] = keys_for(m, n, seed=m + n)
    k = largest_k(m, n, keyed, diagonal)
    want = fastcl.topk(x, y, k, backend="reference", **kw)
    assert_same(fastcl.topk(x, y, k, backend=backend, **kw), want, f"{backend} {shape} {kw.keys()}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_slot_of_a_full_row_is_ordered_by_column_among_ties(backend):
    """k = N with only three distinct values: the whole row is the tie rule."""
    x = torch.ones(3, 2)
    y = torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 0], [1, 1]])
    got = fastcl.topk(x, y, 7, backend=backend)
    assert got.indices.tolist() == [[2, 6, 0, 1, 4, 3, 5]] * 3
    assert got.values.tolist() == [[2.0, 2, 1, 1, 1, 0, 0]] * 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(13, 67, 7), (64, 130, 33)], ids=lambda s: "x".join(map(str, s)))
def test_normal_features_in_float64_match_torch_topk(backend, shape):
    m, n, d = shape
    gen = torch.Generator().manual_seed(n)
    x, y = torch.randn(m, d, generator=gen, dtype=torch.float64), torch.randn(n, d, generator=gen, dtype=torch.float64)
    s = 2.5 * x @ y.T
    want_values, want_indices = torch.topk(s, 11, dim=1)
    got = fastcl.topk(x, y, 11, scale=2.5, backend=backend)
    assert_close(got.values, want_values, tol("regrouped"), f"{backend}: values")
    assert torch.equal(got.indices, want_indices)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_matches_torch_topk_to_round_off(backend):
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(97, 48, generator=gen), torch.randn(181, 48, generator=gen)
    got = fastcl.topk(x, y, 16, backend=backend)
    assert_close(got.values, torch.topk(x @ y.T, 16, dim=1).values, tol("topk float32", torch.float32),
                 f"{backend}: values")
    # The picked columns are the top 16 in float64 too (up to swaps within round-off).
    exact = x.double() @ y.double().T
    assert_close(exact.gather(1, got.indices), torch.topk(exact, 16, dim=1).values, tol("topk picks"),
                 f"{backend}: picked columns in float64")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_ranks_above_everything_and_signed_zeros_tie(backend):
    """The order of torch.sort(descending=True, stable=True): NaN first, then +inf, ..., -inf;
    -0.0 and +0.0 are equal (the lower column first)."""
    x = torch.tensor([[1.0]])
    y = torch.tensor([[0.0], [float("nan")], [-0.0], [float("inf")], [-1.0], [float("-inf")], [float("nan")], [2.0]])
    got = fastcl.topk(x, y, 8, backend=backend)
    want = torch.sort(x @ y.T, dim=1, descending=True, stable=True)
    assert got.indices.tolist() == want.indices.tolist() == [[1, 6, 3, 7, 0, 2, 4, 5]]
    assert torch.equal(got.values.isnan(), want.values.isnan())


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs_compare_in_float32_and_return_their_dtype(backend, dtype):
    x, y = integer_features(33, 70, 6, dtype, seed=5)
    got = fastcl.topk(x, y, 5, exclude_diagonal=True, backend=backend)
    want = fastcl.topk(x.float(), y.float(), 5, exclude_diagonal=True, backend="reference")
    assert got.values.dtype == dtype
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values.float(), want.values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_gradients_match_the_reference(backend):
    gen = torch.Generator().manual_seed(11)
    x0, y0 = torch.randn(19, 6, generator=gen, dtype=torch.float64), torch.randn(29, 6, generator=gen,
                                                                                dtype=torch.float64)
    weights = torch.randn(19, 4, generator=gen, dtype=torch.float64)
    grads = []
    for b in ("reference", backend):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        values, _ = fastcl.topk(x, y, 4, scale=1.5, exclude_diagonal=True, normalize=True, backend=b)
        (values * weights).sum().backward()
        grads.append((x.grad, y.grad))
    assert_close(grads[1], grads[0], tol("regrouped"), f"{backend}: gradients of x and y")


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_k_zero_and_no_rows_give_empty_results(backend):
    x, y = torch.randn(4, 3), torch.randn(6, 3)
    got = fastcl.topk(x, y, 0, backend=backend)
    assert got.values.shape == got.indices.shape == (4, 0)
    got = fastcl.topk(x[:0], y, 2, backend=backend)
    assert got.values.shape == got.indices.shape == (0, 2)
    got = fastcl.topk(x, y[:0], 0, backend=backend)
    assert got.values.shape == (4, 0)


def test_bad_arguments_raise_errors_that_name_them():
    x, y = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"k must be in \[0, N\] with N = 6.*k=7"):
        fastcl.topk(x, y, 7)
    with pytest.raises(ValueError, match="k must be"):
        fastcl.topk(x, y, -1)
    with pytest.raises(TypeError, match="k must be an integer"):
        fastcl.topk(x, y, 2.0)
    with pytest.raises(ValueError, match="k=6 exceeds the 5 eligible columns"):
        fastcl.topk(x, y, 6, exclude_diagonal=True)
    rows, cols = torch.tensor([0, 1, 1, 2]), torch.tensor([1, 0, 1, 1, 2, 3])  # rows 1, 2 keep columns 1, 4, 5
    with pytest.raises(ValueError, match="k=4 exceeds the 3 eligible columns of row [12]"):
        fastcl.topk(x, y, 4, row_keys=rows, col_keys=cols)
    fastcl.topk(x, y, 3, row_keys=rows, col_keys=cols)  # every row keeps 3
    with pytest.raises(ValueError, match="k=3 exceeds the 2 eligible columns of row 1.*diagonal"):
        fastcl.topk(x, y, 3, row_keys=rows, col_keys=cols, exclude_diagonal=True)
    with pytest.raises(ValueError, match="both row_keys and col_keys"):
        fastcl.topk(x, y, 2, row_keys=rows)
    with pytest.raises(ValueError, match=r"col_keys must have shape \[6\]"):
        fastcl.topk(x, y, 2, row_keys=rows, col_keys=rows)
    with pytest.raises(TypeError, match="row_keys must be an integer tensor"):
        fastcl.topk(x, y, 2, row_keys=rows.float(), col_keys=cols)
    with pytest.raises(ValueError, match="y has feature width D=2"):
        fastcl.topk(x, y[:, :2], 2)
    with pytest.raises(TypeError, match="y has dtype torch.float64"):
        fastcl.topk(x, y.double(), 2)
    with pytest.raises(ValueError, match="x must be 2-D"):
        fastcl.topk(x[0], y, 2)
    with pytest.raises(ValueError, match="scale must be a positive"):
        fastcl.topk(x, y, 2, scale=0.0)
    with pytest.raises(fastcl.BackendUnavailableError, match="no CUDA top-k kernel"):
        fastcl.topk(x, y, 2, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastcl.topk(x, y, 2, backend="fast")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_the_custom_op_passes_opcheck(backend):
    """Schema, fake (meta) implementation and registered autograd agree with the real op."""
    from fastcl.backend.topk import _topk_op

    x, y = integer_features(9, 14, 3, torch.float64, seed=4)
    keys = keys_for(9, 14, seed=4, groups=7)
    scale = torch.tensor(1.5, dtype=torch.float64)
    torch.library.opcheck(_topk_op, (backend, x.requires_grad_(), y, scale, 4, *keys, True))
    torch.library.opcheck(_topk_op, (backend, x.detach(), y, scale, 0, None, None, False))


def test_torch_compile_traces_topk_without_graph_breaks():
    x, y = integer_features(21, 40, 4, torch.float32, seed=2)
    compiled = torch.compile(lambda a, b: fastcl.topk(a, b, 5, exclude_diagonal=True, backend="cpu"),
                             fullgraph=True, backend="aot_eager")
    assert_same(compiled(x, y), fastcl.topk(x, y, 5, exclude_diagonal=True, backend="reference"), "compiled")


# --- memory -------------------------------------------------------------------------------------

PROBE = """
    import sys, torch, fastcl
    backend, m, n, d, k = sys.argv[1], *map(int, sys.argv[2:])
    x, y = torch.randn(m, d), torch.randn(n, d)
    fastcl.topk(x[:64], y[:512], k, backend=backend)  # warm-up: lazy initialisation is not the op's memory
    def step():
        values, indices = fastcl.topk(x, y, k, backend=backend)
        return values.nbytes + indices.nbytes
"""


@pytest.mark.skipif("cpu" not in fastcl.backends("cpu"), reason="the cpu backend is not built here")
def test_cpu_peak_memory_at_n65536_d256_k16_is_under_64_mib_beyond_inputs_and_outputs():
    """A fresh process (glibc keeps freed heap). M = 1024 rows against N = 65536 columns keeps the
    test to seconds (the S it avoids: 256 MiB); bench/cached_topk.py measures M = N = 65536 (S: 16 GiB)
    and the chunked backend."""
    extra = sessions.peak_extra_bytes(PROBE, "cpu", 1024, 65536, 256, 16)
    assert extra < 64 * 2**20, f"{extra / 2**20:.1f} MiB beyond inputs and outputs"


# --- MoCHi mixing -------------------------------------------------------------------------------

def test_mixed_negatives_are_unit_mixtures_of_each_querys_hardest():
    gen = torch.Generator().manual_seed(0)
    q, bank = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(20, 5, generator=gen,
                                                                                dtype=torch.float64)
    hardest = fastcl.topk(q, bank, 1, normalize=True).indices  # one hardest: every mix of it is itself
    mixed = fastcl.mix_hard_negatives(q, bank, hardest, num_mixed=3, num_query_mixed=2, query_weight_max=0.3,
                                      generator=gen)
    assert mixed.shape == (6, 5, 5) and not mixed.requires_grad
    assert_close(mixed.norm(dim=2), torch.ones(6, 5, dtype=torch.float64), tol("torch default"), "norms")
    unit_q, unit_bank = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(bank, dim=1)
    assert_close(mixed[:, :3], unit_bank[hardest[:, 0]][:, None].expand(6, 3, 5), tol("torch default"),
                 "mixes of one hardest")
    # query mixes: b q + (1 - b) n with b <= 0.3: closer to n than to q, and in their plane
    n = unit_bank[hardest[:, 0]][:, None]
    qm = mixed[:, 3:]
    assert ((qm * n).sum(2) > (qm * unit_q[:, None]).sum(2)).all()
    plane = torch.linalg.matrix_rank(torch.stack([qm[:, 0], unit_q, n[:, 0]], 1))
    assert (plane == 2).all()


def test_per_query_recipe_equals_the_materialised_loss():
    """The docstring's recipe adds each query's own synthetic negatives to its normaliser only."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(8, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    bank = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    hardest = fastcl.topk(q.detach(), bank, 3).indices
    mixed = fastcl.mix_hard_negatives(q, bank, hardest, num_mixed=2, num_query_mixed=1, generator=gen)
    t = 0.2
    base = fastcl.infonce_loss(q, k, t, reduction="none")
    pos = (q * k).sum(1) / t
    extra = torch.einsum("md,msd->ms", q, mixed) / t
    got = (torch.logaddexp(base + pos, extra.logsumexp(1)) - pos).mean()
    logits = torch.cat([q @ k.T, torch.einsum("md,msd->ms", q, mixed)], 1) / t
    want = torch.nn.functional.cross_entropy(logits, torch.arange(8))
    assert_close(got, want, tol("regrouped"), "recipe vs materialised")


# --- the interpreter session ----------------------------------------------------------------------

@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter session itself")
@pytest.mark.skipif(not registry.TRITON_INSTALLED, reason="Triton is not installed")
def test_triton_interpreter_session():
    """This file's triton cases, in a child pytest with TRITON_INTERPRET=1."""
    sessions.interpreter_session(__file__, "-k", "triton and not session", timeout_s=600)
