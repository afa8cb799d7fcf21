"""The cpu backend is deterministic.

- Its kernels give bitwise the same results for any thread count: the tile schedule depends on
  the shape only and every sum is taken in a fixed order (csrc/cpu/grid.h).
- Whole losses are bitwise reproducible run to run at a fixed thread count. Across thread counts
  they agree to float32 round-off, not bitwise: the O((M + N) * D) glue around the kernels (target
  logits, label smoothing, the scale's gradient) uses torch's BLAS and reductions, which split
  work by thread count.
"""
import pytest
import torch

import fastcl
from cases import CASES, Case, run
from tolerances import assert_close, tol

DETERMINISTIC = [b for b in fastcl.backends("cpu") if b == "cpu"]
# Shapes with many tiles in both directions and a ragged tail, plus every loss at least once.
# Large enough that torch's own reductions and BLAS calls would go multithreaded.
LARGE = [
    Case("clip_loss", "1500x1700-labels", lambda r, ri, dt: (
        (r(1500, 64), r(1700, 64), torch.tensor(3.0, requires_grad=True)),
        {"labels": ri(1700, 1500), "bidirectional": False, "label_smoothing": 0.1})),
    Case("clip_loss", "1600x1600", lambda r, ri, dt: (
        (r(1600, 64), r(1600, 64), torch.tensor(3.0, requires_grad=True)), {})),
    Case("siglip_loss", "1600x1600", lambda r, ri, dt: (
        (r(1600, 64), r(1600, 64), torch.tensor(3.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)), {})),
]
CHOSEN = LARGE + [c for c in CASES if "many-tiles" in c.shapes] + [
    next(c for c in CASES if c.loss == loss) for loss in sorted({c.loss for c in CASES})]


def _bitwise_equal(a, b):
    out_a, grads_a = a
    out_b, grads_b = b
    assert torch.equal(out_a, out_b)
    for ga, gb in zip(grads_a, grads_b):
        assert (ga is None and gb is None) or torch.equal(ga, gb)


@pytest.mark.parametrize("backend", DETERMINISTIC)
@pytest.mark.parametrize("case", CHOSEN, ids=lambda c: c.id)
def test_repeated_runs_are_bitwise_equal(case, backend):
    _bitwise_equal(run(case, backend, torch.float32), run(case, backend, torch.float32))


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("backend", DETERMINISTIC)
@pytest.mark.parametrize("case", CHOSEN, ids=lambda c: c.id)
def test_thread_counts_agree(case, backend, threads):
    threads(1)
    single_out, single_grads = run(case, backend, torch.float32)
    threads(2)
    out, grads = run(case, backend, torch.float32)
    assert_close(out, single_out, tol("thread count loss", torch.float32), f"{backend}: loss, 2 threads vs 1")
    for i, (g, ref) in enumerate(zip(grads, single_grads)):
        if ref is not None:
            assert_close(g, ref, tol("thread count gradients", torch.float32),
                         f"{backend}: gradient {i}, 2 threads vs 1")


def _kernel_calls(kernels, symmetric: bool):
    """Every kernel on a 1000 x 1300 problem (4 x 6 tiles of 256) with and without keys."""
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(1000, 48, generator=gen), torch.randn(1300, 48, generator=gen)
    scale = torch.tensor(2.5)
    keys = (torch.randint(0, 50, (1000,), generator=gen), torch.randint(0, 50, (1300,), generator=gen))
    g_row, g_col = torch.rand(1000, generator=gen), torch.rand(1300, generator=gen)
    bias = torch.randn(1000, generator=gen)
    for rk, ck in [(None, None), keys]:
        row_lse, col_lse = kernels.lse_forward(x, y, scale, rk, ck, True, True)
        yield row_lse, col_lse
        yield kernels.lse_backward(x, y, scale, rk, ck, row_lse.nan_to_num(neginf=0.0),
                                   col_lse.nan_to_num(neginf=0.0), g_row, g_col, True, True)
        for kind in (0, 1):
            yield kernels.pointwise(x, y, scale, bias, rk, ck, kind, g_row, True)
        if symmetric:  # 1000 rows: 4 blocks, so pairs of tiles and diagonal tiles
            row_lse = kernels.lse_forward_symmetric(x, scale, rk)
            yield row_lse, kernels.lse_backward_symmetric(x, scale, rk, row_lse.nan_to_num(neginf=0.0), g_row)


@pytest.mark.parametrize("backend", DETERMINISTIC)
def test_kernels_are_bitwise_equal_for_any_thread_count(backend, threads):
    from fastcl.backend import engine

    kernels, symmetric = engine(backend).kernels, engine(backend).symmetric
    threads(1)
    single = list(_kernel_calls(kernels, symmetric))
    threads(2)
    for one, two in zip(single, _kernel_calls(kernels, symmetric)):
        for a, b in zip(one, two):
            assert torch.equal(a, b)


def test_cpu_backend_is_declared_here():
    assert "cpu" in fastcl.backends("cpu"), fastcl.info()["extension"]
