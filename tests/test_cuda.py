"""The ``cuda`` backend on a GPU: its three kernels against float64 math on the materialised S, and
every loss against ``reference`` (and ``triton`` where it runs), in float32, float16 and bfloat16.

Skipped, with the reason, where there is no GPU or fastcl._C was built without CUDA kernels.
Tolerances (tests/tolerances.py, "cuda statistics" and "cuda gradients"): S itself is accurate to
fp32 in every dtype (3xTF32 for float32; 16-bit products are exact in fp32), so statistics and losses
get 2e-5; the gradient GEMMs take G in the input's 16-bit type (float16 scaled by a power of two), so
gradients get that type's rounding.
Each hazard kernels/DESIGN.md names has a test here: G far below float16's subnormals, +-inf inputs,
D not a multiple of 8 and an offset base pointer, and blocks smaller than S (FASTCL_WORKSPACE_MB).
"""
from __future__ import annotations

import pytest
import torch

import fastcl
from cases import CASES, Case, run
from tolerances import assert_close, assert_runs_close, tol

pytestmark = pytest.mark.gpu


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU here (torch.cuda.is_available() is False)"
    from fastcl import _ext

    if _ext._C is None:
        return f"fastcl._C did not load: {_ext.ERROR}"
    if not _ext._C.build_info()["cuda_archs"]:
        return "fastcl._C was built without CUDA kernels (rebuild with FASTCL_CUDA_ARCHS='80;90a')"
    return None


SKIP = _skip_reason()
if SKIP is not None:
    pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason=SKIP)]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N, D): tile tails in both directions, D below / above / not a multiple of the 32-feature
# stage and the 128-feature gradient chunk, few row tiles (B split over CTAs) and many.
SHAPES = [(1, 1, 1), (3, 70, 5), (64, 64, 32), (65, 129, 8), (130, 67, 129), (40, 1500, 48), (700, 90, 300)]


def _inputs(m, n, d, dtype, keyed, seed=0):
    gen = torch.Generator().manual_seed(seed * 1000 + m * 7 + n * 3 + d)
    x = torch.randn(m, d, generator=gen).to(dtype)
    y = torch.randn(n, d, generator=gen).to(dtype)
    keys = (torch.randint(0, 5, (m,), generator=gen), torch.randint(0, 5, (n,), generator=gen)) if keyed else None
    return x, y, keys


def _logits(x, y, scale, keys):
    s = scale * x.double() @ y.double().T
    keyed = None if keys is None else keys[0][:, None] == keys[1][None, :]
    return s, keyed


def _cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


def _no_bias(args):
    """(x, y, scale, row_keys, col_keys) -> pointwise's leading arguments, row_bias None."""
    x, y, scale, row_keys, col_keys = args
    return x, y, scale, None, row_keys, col_keys


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lse_forward(shape, keyed, dtype):
    x, y, keys = _inputs(*shape, dtype, keyed)
    s, mask = _logits(x, y, 1.7, keys)
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    rk, ck = (None, None) if keys is None else _cuda(*keys)
    row, col = torch.ops.fastcl.lse_forward(*_cuda(x, y), torch.tensor(1.7), rk, ck, True, True)
    assert row.dtype == torch.float32 and row.is_cuda
    assert_close(row, s.logsumexp(1), tol("cuda statistics", dtype), "row lse")
    assert_close(col, s.logsumexp(0), tol("cuda statistics", dtype), "col lse")
    row_only, none = torch.ops.fastcl.lse_forward(*_cuda(x, y), torch.tensor(1.7, device="cuda"), rk, ck, True, False)
    assert none.numel() == 0
    assert_close(row_only, s.logsumexp(1), tol("cuda statistics", dtype), "row lse (device scale)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sides", ["rows", "cols", "both"])
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lse_backward(shape, keyed, sides, dtype):
    x, y, keys = _inputs(*shape, dtype, keyed, seed=1)
    s, mask = _logits(x, y, 0.9, keys)
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    shift_r = s.logsumexp(1).nan_to_num(neginf=0.0)
    shift_c = s.logsumexp(0).nan_to_num(neginf=0.0)
    g_r, g_c = torch.randn(shape[0], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
    rows, cols = sides in ("rows", "both"), sides in ("cols", "both")
    grad = torch.zeros_like(s)
    if rows:
        grad += g_r[:, None] * (s - shift_r[:, None]).exp()
    if cols:
        grad += g_c[None, :] * (s - shift_c[None, :]).exp()
    rk, ck = (None, None) if keys is None else _cuda(*keys)
    f32 = [t.float().cuda() for t in (shift_r, shift_c, g_r, g_c)]
    gy, gx = torch.ops.fastcl.lse_backward(*_cuda(x, y), torch.tensor(0.9), rk, ck, f32[0], f32[1], f32[2], f32[3],
                                           rows, cols)
    assert_close(gy, grad @ y.double(), tol("cuda gradients", dtype), "G @ y")
    assert_close(gx, grad.T @ x.double(), tol("cuda gradients", dtype), "G.T @ x")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "g_row"])
@pytest.mark.parametrize("kind", [0, 1], ids=["siglip", "mw"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pointwise(shape, kind, weighted, dtype):
    m, n, _ = shape
    x, y, keys = _inputs(*shape, dtype, True, seed=2)
    bias = torch.randn(m, dtype=torch.float64)
    weight = torch.rand(m, dtype=torch.float64) + 0.5 if weighted else None
    s, mask = _logits(x, y, 1.3, keys)
    f = s + bias[:, None]
    if kind == 0:
        f = torch.where(mask, -f, f)
        loss, dsig = torch.nn.functional.softplus(f), torch.sigmoid(f)
        grad = torch.where(mask, -dsig, dsig)
    else:
        loss = torch.nn.functional.softplus(f).masked_fill(mask, 0.0)
        grad = torch.sigmoid(f).masked_fill(mask, 0.0)
    if weight is not None:
        grad = grad * weight[:, None]
    args = (*_cuda(x, y), torch.tensor(1.3), bias.float().cuda(), *_cuda(*keys), kind)
    w = None if weight is None else weight.float().cuda()
    row_loss, gy, gx, d_bias = torch.ops.fastcl.pointwise(*args, w, True)
    assert_close(row_loss, loss.sum(1), tol("cuda statistics", dtype), "row loss")
    assert_close(d_bias, grad.sum(1), tol("cuda statistics", dtype), "row sums of D")
    assert_close(gy, grad @ y.double(), tol("cuda gradients", dtype), "D @ y")
    assert_close(gx, grad.T @ x.double(), tol("cuda gradients", dtype), "D.T @ x")
    loss_only, *empty = torch.ops.fastcl.pointwise(*args, w, False)
    assert all(t.numel() == 0 for t in empty)
    assert_close(loss_only, loss.sum(1), tol("cuda statistics", dtype), "row loss without gradients")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 13], ids=["d64", "d13"])
def test_unaligned_inputs(dtype, d):
    """An offset base pointer (buf[1:]) and D not whole 16-byte chunks: the host pads a copy (the
    kernels only take aligned rows); results equal the aligned ones."""
    x, y, _ = _inputs(70, 90, d, dtype, False)
    buf = torch.empty(70 * d + 1, dtype=dtype, device="cuda")
    xs = buf[1:].view(70, d).copy_(x.cuda())
    assert xs.data_ptr() % 16 != 0
    row, col = torch.ops.fastcl.lse_forward(xs, y.cuda(), torch.tensor(2.0), None, None, True, True)
    s = 2.0 * x.double() @ y.double().T
    assert_close(row, s.logsumexp(1), tol("cuda statistics", dtype), "row lse")
    assert_close(col, s.logsumexp(0), tol("cuda statistics", dtype), "col lse")
    shift_r, shift_c = s.logsumexp(1), s.logsumexp(0)
    g_r, g_c = torch.rand(70, dtype=torch.float64), torch.rand(90, dtype=torch.float64)
    grad = g_r[:, None] * (s - shift_r[:, None]).exp() + g_c[None, :] * (s - shift_c[None, :]).exp()
    f32 = [t.float().cuda() for t in (shift_r, shift_c, g_r, g_c)]
    gy, gx = torch.ops.fastcl.lse_backward(xs, y.cuda(), torch.tensor(2.0), None, None, *f32, True, True)
    assert_close(gy, grad @ y.double(), tol("cuda gradients", dtype), "G @ y")
    assert_close(gx, grad.T @ x.double(), tol("cuda gradients", dtype), "G.T @ x")


@pytest.mark.parametrize("n", [4096, 8192])
def test_float16_gradient_far_below_subnormals(n):
    """A mean CLIP loss has G ~ 1 / (2 N^2) (unit features, D = 512, scale 14.3): rounded to float16
    unscaled, 22% (N = 4096) / 92% (N = 8192) of it would flush to zero and G @ y be off by up to
    36%. Stored times 2^k it keeps float16's relative precision."""
    gen = torch.Generator().manual_seed(n)
    x = torch.nn.functional.normalize(torch.randn(n, 512, generator=gen), dim=1).half().cuda()
    y = torch.nn.functional.normalize(torch.randn(n, 512, generator=gen), dim=1).half().cuda()
    s = 14.3 * x.double() @ y.double().T
    shift_r, shift_c = s.logsumexp(1), s.logsumexp(0)
    g = torch.full((n,), 1.0 / (2 * n), dtype=torch.float64, device="cuda")
    grad = g[:, None] * (s - shift_r[:, None]).exp() + g[None, :] * (s - shift_c[None, :]).exp()
    assert (grad < 2.0 ** -25).double().mean().item() > 0.15  # what float16 rounds to 0 unscaled
    f32 = [t.float() for t in (shift_r, shift_c, g, g)]
    gy, gx = torch.ops.fastcl.lse_backward(x, y, torch.tensor(14.3), None, None, *f32, True, True)
    assert_close(gy, grad @ y.double(), tol("cuda gradients", torch.float16), "G @ y")
    assert_close(gx, grad.T @ x.double(), tol("cuda gradients", torch.float16), "G.T @ x")
    # SigLIP with a 1 / N upstream gradient: G ~ 1 / N, float16 subnormal from N ~ 16k; weights 1e-9
    w = torch.full((n,), 1e-9, device="cuda")
    bias = torch.zeros(n, device="cuda")
    keys = torch.arange(n, device="cuda")
    _, gy, _, _ = torch.ops.fastcl.pointwise(x, y, torch.tensor(14.3), bias, keys, keys, 0, w, True)
    f = torch.where(torch.eye(n, dtype=torch.bool, device="cuda"), -s, s)
    grad = 1e-9 * torch.where(torch.eye(n, dtype=torch.bool, device="cuda"), -f.sigmoid(), f.sigmoid())
    assert_close(gy * 1e9, (grad @ y.double()) * 1e9, tol("cuda gradients", torch.float16), "pointwise D @ y")


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_float32_inputs_follow_float32_math(value):
    """An infinite feature makes a plain 3xTF32 split compute inf - inf = NaN for whole rows and
    columns. S must be what float32 gives (+-inf where y's feature is nonzero), so statistics are
    +-inf or finite exactly where the float64 reference's are, and the loss is NaN."""
    x, y, _ = _inputs(70, 70, 16, torch.float32, False)
    x[3, 2] = value
    s = 1.5 * x.double() @ y.double().T
    row, col = torch.ops.fastcl.lse_forward(*_cuda(x, y), torch.tensor(1.5), None, None, True, True)
    assert_close(row, s.logsumexp(1), tol("cuda statistics", torch.float32), "row lse")
    assert_close(col, s.logsumexp(0), tol("cuda statistics", torch.float32), "col lse")
    loss = fastcl.clip_loss(x.cuda(), y.cuda(), 1.5, backend="cuda")
    assert torch.isnan(loss)


def test_blocks_smaller_than_s(monkeypatch):
    """A tiny FASTCL_WORKSPACE_MB cuts S into 128 x 128 blocks: forward partials folded across
    blocks, G blocks accumulated into the gradients in order; same results as one block."""
    x, y, keys = _inputs(300, 270, 40, torch.bfloat16, True, seed=4)
    args = (*_cuda(x, y), torch.tensor(1.2), *_cuda(*keys))
    whole_f = torch.ops.fastcl.lse_forward(*args, True, True)
    g_r, g_c = torch.rand(300, device="cuda"), torch.rand(270, device="cuda")
    whole_b = torch.ops.fastcl.lse_backward(*args, whole_f[0], whole_f[1], g_r, g_c, True, True)
    whole_p = torch.ops.fastcl.pointwise(*_no_bias(args), 0, None, True)
    monkeypatch.setenv("FASTCL_WORKSPACE_MB", "0.01")
    for got, want in zip(torch.ops.fastcl.lse_forward(*args, True, True), whole_f):
        assert_close(got, want, tol("cuda statistics", torch.bfloat16), "forward in blocks")
    for got, want in zip(torch.ops.fastcl.lse_backward(*args, whole_f[0], whole_f[1], g_r, g_c, True, True), whole_b):
        assert_close(got, want, tol("cuda gradients", torch.bfloat16), "backward in blocks")
    for got, want in zip(torch.ops.fastcl.pointwise(*_no_bias(args), 0, None, True), whole_p):
        assert_close(got, want, tol("cuda gradients", torch.bfloat16), "pointwise in blocks")


def test_fully_keyed_lines_and_nan():
    x, y, _ = _inputs(70, 80, 16, torch.float32, False)
    keys_r, keys_c = torch.zeros(70, dtype=torch.long), torch.zeros(80, dtype=torch.long)  # every pair keyed
    row, col = torch.ops.fastcl.lse_forward(*_cuda(x, y), torch.tensor(1.0), *_cuda(keys_r, keys_c), True, True)
    assert torch.isneginf(row).all() and torch.isneginf(col).all()
    x[3, 2] = float("nan")
    row, col = torch.ops.fastcl.lse_forward(*_cuda(x, y), torch.tensor(1.0), None, None, True, True)
    assert torch.isnan(row[3]) and torch.isnan(col).all() and torch.isfinite(row[torch.arange(70) != 3]).all()


@pytest.mark.parametrize("shape", [(40, 1500, 48), (700, 90, 300)], ids=["split-columns", "many-row-tiles"])
def test_bitwise_deterministic(shape):
    x, y, keys = _inputs(*shape, torch.bfloat16, True)
    args = (*_cuda(x, y), torch.tensor(1.1), *_cuda(*keys))
    first = torch.ops.fastcl.pointwise(*_no_bias(args), 0, None, True)
    again = torch.ops.fastcl.pointwise(*_no_bias(args), 0, None, True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    first = torch.ops.fastcl.lse_forward(*args, True, True)
    again = torch.ops.fastcl.lse_forward(*args, True, True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    g_r, g_c = torch.rand(shape[0], device="cuda"), torch.rand(shape[1], device="cuda")
    first = torch.ops.fastcl.lse_backward(*args, *again, g_r, g_c, True, True)
    again = torch.ops.fastcl.lse_backward(*args, *torch.ops.fastcl.lse_forward(*args, True, True), g_r, g_c, True, True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# --- every loss through the engine ------------------------------------------------------------

def _to_cuda(t: torch.Tensor) -> torch.Tensor:
    return t.cuda()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_loss_matches_reference(case: Case, dtype):
    got = run(case, "cuda", dtype, transform=_to_cuda)
    want = run(case, "reference", dtype, in_float64=True)
    assert got[0].is_cuda
    assert_runs_close(got, want, tol("low precision", dtype), f"cuda {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_loss_matches_triton(case: Case, dtype):
    if "triton" not in fastcl.backends("cuda"):
        pytest.skip("the triton backend cannot run on CUDA here (fastcl.backends('cuda') lacks it)")
    got = run(case, "cuda", dtype, transform=_to_cuda)
    want = run(case, "triton", dtype, transform=_to_cuda)
    assert got[0].is_cuda
    assert_runs_close(got, want, tol("cuda vs triton", dtype), f"cuda vs triton {dtype}")
