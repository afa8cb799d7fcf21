"""The checks of the ``cuda`` backend's operators, wherever they run: on a GPU (test_cuda.py,
``torch.ops.fastcl`` on CUDA tensors) and executed lane by lane on the CPU (test_cuda_host.py, the
host execution's operators on CPU tensors). One body per check, so both hold the kernels to the same
math and the same tolerances (tests/tolerances.py "cuda statistics", "cuda gradients"): S is accurate
to fp32 in every dtype (3xTF32 for float32; 16-bit products are exact in fp32), so statistics and
losses get 2e-5; the gradient GEMMs take G in the input's 16-bit type (float16 scaled by a power of
two), so gradients get that type's rounding.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import fastcl
from tolerances import assert_close, tol


@dataclass(frozen=True)
class Device:
    """Where the operators run: ``ops`` (lse_forward, lse_backward, pointwise with csrc/ops.cpp's
    schemas), ``put`` moving a CPU tensor to their device, ``backend`` the name a loss reaches them by."""

    ops: object
    put: Callable[[torch.Tensor], torch.Tensor]
    backend: str

    def all(self, *ts):
        return [None if t is None else self.put(t) for t in ts]


def inputs(m, n, d, dtype, keyed, seed=0):
    gen = torch.Generator().manual_seed(seed * 1000 + m * 7 + n * 3 + d)
    x = torch.randn(m, d, generator=gen).to(dtype)
    y = torch.randn(n, d, generator=gen).to(dtype)
    keys = (torch.randint(0, 5, (m,), generator=gen), torch.randint(0, 5, (n,), generator=gen)) if keyed else None
    return x, y, keys


def logits(x, y, scale, keys):
    s = scale * x.double() @ y.double().T
    keyed = None if keys is None else keys[0][:, None] == keys[1][None, :]
    return s, keyed


def no_bias(args):
    """(x, y, scale, row_keys, col_keys) -> pointwise's leading arguments, row_bias None."""
    x, y, scale, row_keys, col_keys = args
    return x, y, scale, None, row_keys, col_keys


def lse_forward(dev: Device, shape, keyed, dtype):
    x, y, keys = inputs(*shape, dtype, keyed)
    s, mask = logits(x, y, 1.7, keys)
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    rk, ck = (None, None) if keys is None else dev.all(*keys)
    row, col = dev.ops.lse_forward(*dev.all(x, y), torch.tensor(1.7), rk, ck, True, True)
    assert row.dtype == torch.float32 and row.device == dev.put(x).device
    assert_close(row, s.logsumexp(1), tol("cuda statistics", dtype), "row lse")
    assert_close(col, s.logsumexp(0), tol("cuda statistics", dtype), "col lse")
    row_only, none = dev.ops.lse_forward(*dev.all(x, y), dev.put(torch.tensor(1.7)), rk, ck, True, False)
    assert none.numel() == 0
    assert_close(row_only, s.logsumexp(1), tol("cuda statistics", dtype), "row lse (device scale)")


def lse_backward(dev: Device, shape, keyed, sides, dtype):
    x, y, keys = inputs(*shape, dtype, keyed, seed=1)
    s, mask = logits(x, y, 0.9, keys)
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
    rk, ck = (None, None) if keys is None else dev.all(*keys)
    f32 = dev.all(*(t.float() for t in (shift_r, shift_c, g_r, g_c)))
    gy, gx = dev.ops.lse_backward(*dev.all(x, y), torch.tensor(0.9), rk, ck, *f32, rows, cols)
    assert_close(gy, grad @ y.double(), tol("cuda gradients", dtype), "G @ y")
    assert_close(gx, grad.T @ x.double(), tol("cuda gradients", dtype), "G.T @ x")


def listed_columns(m, n, width, seed=0):
    """[m, width] column indices as op lse_exclude takes them: -1 padding, a repeat in every row,
    columns of any tile (and block), the last column, columns past the end (they list nothing), a
    row with nothing listed and, where ``width >= n``, a row listing every column (its lse is -inf)."""
    gen = torch.Generator().manual_seed(seed * 1000 + m * 5 + n + width)
    listed = torch.randint(-1, max(n, 1), (m, width), generator=gen)
    if m == 0 or width == 0:
        return listed
    if width > 1:
        listed[:, 1] = listed[:, 0]
    if width > 2:
        listed[1::3, 2:] = -1
    if width > 3:
        listed[2::5, 3] = n + 7
    listed[-1, -1] = n - 1
    if 0 < n <= width and m > 2:
        listed[2, :n] = torch.arange(n)
    listed[0] = -1
    return listed


def left_out(listed, n, keyed=None):
    """[m, n] bool: the pairs a list (and keys) leave out, the rule written out pair by pair."""
    hit = torch.zeros(listed.shape[0], n, dtype=torch.bool)
    for i, row in enumerate(listed.tolist()):
        for j in row:
            if 0 <= j < n:
                hit[i, j] = True
    return hit if keyed is None else hit | keyed


def lse_excluding(dev: Device, shape, keyed, sides, dtype, width=5, scale=1.3):
    """Op lse_exclude (lse_forward_excluding, lse_backward_excluding) against float64 on the same
    rounded inputs: chunked's kernels where both sides have lines (chunked refuses N = 0) and the
    materialised S with the listed pairs at -inf: statistics, then G @ y and G.T @ x."""
    from fastcl.backend import engine
    from fastcl.backend.primitives.shared import _finite_shift

    m, n, _ = shape
    x, y, keys = inputs(*shape, dtype, keyed, seed=6)
    s, mask = logits(x, y, scale, keys)
    listed = listed_columns(m, n, width)
    s = s.masked_fill(left_out(listed, n, mask), float("-inf"))
    rows, cols = sides in ("rows", "both"), sides in ("cols", "both")
    keys = (None, None) if keys is None else keys
    want = [s.logsumexp(1) if rows else s.new_empty(0), s.logsumexp(0) if cols else s.new_empty(0)]
    g_r, g_c = torch.randn(m, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    shifts = [_finite_shift(v) for v in want]
    grad = torch.zeros_like(s)
    if rows:
        grad += g_r[:, None] * (s - shifts[0][:, None]).exp()
    if cols:
        grad += g_c[None, :] * (s - shifts[1][None, :]).exp()
    terms = (*shifts, g_r if rows else g_r[:0], g_c if cols else g_c[:0])
    want_g = [grad @ y.double(), grad.T @ x.double()]
    if m > 0 and n > 0:
        chunked = engine("chunked").kernels
        wide = (x.double(), y.double(), torch.tensor(scale, dtype=torch.float64), *keys, listed)
        for a, b in zip(chunked.lse_forward_excluding(*wide, rows, cols), want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for a, b in zip(chunked.lse_backward_excluding(*wide, *terms, rows, cols), want_g):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    mine = (*dev.all(x, y), torch.tensor(scale), *dev.all(*keys, listed))
    got = dev.ops.lse_forward_excluding(*mine, rows, cols)
    for what, a, b in (("row lse", got[0], want[0]), ("col lse", got[1], want[1])):
        assert a.shape == b.shape, what
        assert_close(a, b, tol("cuda statistics", dtype), what)
    got_g = dev.ops.lse_backward_excluding(*mine, *dev.all(*(v.float() for v in terms)), rows, cols)
    assert_close(got_g[0], want_g[0], tol("cuda gradients", dtype), "G @ y")
    assert_close(got_g[1], want_g[1], tol("cuda gradients", dtype), "G.T @ x")


def excluding_nothing_is_the_plain_op(dev: Device, shape, dtype):
    """No columns, or only -1 padding: the same bits as lse_forward and lse_backward (the padding
    marks no pair; no list skips the marks altogether)."""
    m, n, _ = shape
    x, y, keys = inputs(*shape, dtype, True, seed=7)
    args = (*dev.all(x, y), torch.tensor(0.8), *dev.all(*keys))
    plain = dev.ops.lse_forward(*args, True, True)
    g = dev.all(torch.rand(m), torch.rand(n))
    plain_g = dev.ops.lse_backward(*args, *plain, *g, True, True)
    for listed in (torch.empty(m, 0, dtype=torch.long), torch.full((m, 3), -1)):
        got = dev.ops.lse_forward_excluding(*args, dev.put(listed), True, True)
        assert all(torch.equal(a, b) for a, b in zip(got, plain))
        got = dev.ops.lse_backward_excluding(*args, dev.put(listed), *plain, *g, True, True)
        assert all(torch.equal(a, b) for a, b in zip(got, plain_g))


def excluding_in_blocks(dev: Device, monkeypatch, shape=(300, 270, 40)):
    """A tiny FASTCL_WORKSPACE_MB cuts S into 128 x 128 blocks: each block reads its rows' lists and
    numbers their columns from its own first one (listed columns in every block)."""
    monkeypatch.setenv("FASTCL_WORKSPACE_MB", "0.01")
    lse_excluding(dev, shape, True, "both", torch.bfloat16, width=9)


def bad_exclude_lists_are_refused(dev: Device):
    x, y, _ = inputs(6, 5, 8, torch.float32, False)
    args = (*dev.all(x, y), torch.tensor(1.0), None, None)
    for listed, message in ((torch.zeros(5, 2, dtype=torch.long), r"exclude must be a contiguous \[6, E\] matrix"),
                            (torch.zeros(6, 2, dtype=torch.int32), "exclude must be Long"),
                            (torch.zeros(2, 6, dtype=torch.long).T, "exclude must be a contiguous")):
        with pytest.raises(RuntimeError, match=message):
            dev.ops.lse_forward_excluding(*args, dev.put(listed), True, True)


def pointwise(dev: Device, shape, kind, weighted, dtype):
    m, n, _ = shape
    x, y, keys = inputs(*shape, dtype, True, seed=2)
    bias = torch.randn(m, dtype=torch.float64)
    weight = torch.rand(m, dtype=torch.float64) + 0.5 if weighted else None
    s, mask = logits(x, y, 1.3, keys)
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
    args = (*dev.all(x, y), torch.tensor(1.3), dev.put(bias.float()), *dev.all(*keys), kind)
    w = None if weight is None else dev.put(weight.float())
    row_loss, gy, gx, d_bias = dev.ops.pointwise(*args, w, True)
    assert_close(row_loss, loss.sum(1), tol("cuda statistics", dtype), "row loss")
    assert_close(d_bias, grad.sum(1), tol("cuda statistics", dtype), "row sums of D")
    assert_close(gy, grad @ y.double(), tol("cuda gradients", dtype), "D @ y")
    assert_close(gx, grad.T @ x.double(), tol("cuda gradients", dtype), "D.T @ x")
    loss_only, *empty = dev.ops.pointwise(*args, w, False)
    assert all(t.numel() == 0 for t in empty)
    assert_close(loss_only, loss.sum(1), tol("cuda statistics", dtype), "row loss without gradients")


def unaligned_inputs(dev: Device, dtype, d):
    """An offset base pointer (buf[1:]) and D not whole 16-byte chunks: the host pads a copy (the
    kernels only take aligned rows); results equal the aligned ones."""
    x, y, _ = inputs(70, 90, d, dtype, False)
    buf = dev.put(torch.empty(70 * d + 1, dtype=dtype))
    xs = buf[1:].view(70, d).copy_(dev.put(x))
    assert xs.data_ptr() % 16 != 0
    row, col = dev.ops.lse_forward(xs, dev.put(y), torch.tensor(2.0), None, None, True, True)
    s = 2.0 * x.double() @ y.double().T
    assert_close(row, s.logsumexp(1), tol("cuda statistics", dtype), "row lse")
    assert_close(col, s.logsumexp(0), tol("cuda statistics", dtype), "col lse")
    shift_r, shift_c = s.logsumexp(1), s.logsumexp(0)
    g_r, g_c = torch.rand(70, dtype=torch.float64), torch.rand(90, dtype=torch.float64)
    grad = g_r[:, None] * (s - shift_r[:, None]).exp() + g_c[None, :] * (s - shift_c[None, :]).exp()
    f32 = dev.all(*(t.float() for t in (shift_r, shift_c, g_r, g_c)))
    gy, gx = dev.ops.lse_backward(xs, dev.put(y), torch.tensor(2.0), None, None, *f32, True, True)
    assert_close(gy, grad @ y.double(), tol("cuda gradients", dtype), "G @ y")
    assert_close(gx, grad.T @ x.double(), tol("cuda gradients", dtype), "G.T @ x")


def float16_gradient_far_below_subnormals(dev: Device, n, d=512, share=0.15):
    """A mean CLIP loss has G ~ 1 / (2 N^2) (unit features, D = 512, scale 14.3): rounded to float16
    unscaled, 22% (N = 4096) / 92% (N = 8192) of it would flush to zero and G @ y be off by up to
    36%. Stored times 2^k it keeps float16's relative precision. (Smaller N on the CPU: the upstream
    gradient is then shrunk by the same factor, so G sits as far below float16's subnormals.)"""
    gen = torch.Generator().manual_seed(n)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).half()
    y = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).half()
    s = 14.3 * x.double() @ y.double().T
    shift_r, shift_c = s.logsumexp(1), s.logsumexp(0)
    g = torch.full((n,), 1.0 / (2 * n), dtype=torch.float64) * min(1.0, (n / 4096) ** 2)
    grad = g[:, None] * (s - shift_r[:, None]).exp() + g[None, :] * (s - shift_c[None, :]).exp()
    assert (grad < 2.0 ** -25).double().mean().item() > share  # what float16 rounds to 0 unscaled
    f32 = dev.all(*(t.float() for t in (shift_r, shift_c, g, g)))
    gy, gx = dev.ops.lse_backward(*dev.all(x, y), torch.tensor(14.3), None, None, *f32, True, True)
    scale = 1.0 / g[0].item()  # compare in units of the upstream gradient
    assert_close(gy.double().cpu() * scale, (grad @ y.double()) * scale, tol("cuda gradients", torch.float16), "G @ y")
    assert_close(gx.double().cpu() * scale, (grad.T @ x.double()) * scale, tol("cuda gradients", torch.float16),
                 "G.T @ x")
    # SigLIP with a tiny upstream gradient: G ~ w, float16 subnormal; weights 1e-9
    w = dev.put(torch.full((n,), 1e-9))
    bias = dev.put(torch.zeros(n))
    keys = dev.put(torch.arange(n))
    _, gy, _, _ = dev.ops.pointwise(*dev.all(x, y), torch.tensor(14.3), bias, keys, keys, 0, w, True)
    eye = torch.eye(n, dtype=torch.bool)
    f = torch.where(eye, -s, s)
    grad = 1e-9 * torch.where(eye, -f.sigmoid(), f.sigmoid())
    assert_close(gy.cpu() * 1e9, (grad @ y.double()) * 1e9, tol("cuda gradients", torch.float16), "pointwise D @ y")


def infinite_float32_inputs_follow_float32_math(dev: Device, value):
    """An infinite feature makes a plain 3xTF32 split compute inf - inf = NaN for whole rows and
    columns. S must be what float32 gives (+-inf where y's feature is nonzero), so statistics are
    +-inf or finite exactly where the float64 reference's are, and the loss is NaN."""
    x, y, _ = inputs(70, 70, 16, torch.float32, False)
    x[3, 2] = value
    s = 1.5 * x.double() @ y.double().T
    row, col = dev.ops.lse_forward(*dev.all(x, y), torch.tensor(1.5), None, None, True, True)
    assert_close(row, s.logsumexp(1), tol("cuda statistics", torch.float32), "row lse")
    assert_close(col, s.logsumexp(0), tol("cuda statistics", torch.float32), "col lse")
    loss = fastcl.clip_loss(*dev.all(x, y), 1.5, backend=dev.backend)
    assert torch.isnan(loss)


def blocks_smaller_than_s(dev: Device, monkeypatch, shape=(300, 270, 40)):
    """A tiny FASTCL_WORKSPACE_MB cuts S into 128 x 128 blocks: forward partials folded across
    blocks, G blocks accumulated into the gradients in order; same results as one block."""
    m, n, _ = shape
    x, y, keys = inputs(*shape, torch.bfloat16, True, seed=4)
    args = (*dev.all(x, y), torch.tensor(1.2), *dev.all(*keys))
    whole_f = dev.ops.lse_forward(*args, True, True)
    g_r, g_c = dev.put(torch.rand(m)), dev.put(torch.rand(n))
    whole_b = dev.ops.lse_backward(*args, whole_f[0], whole_f[1], g_r, g_c, True, True)
    whole_p = dev.ops.pointwise(*no_bias(args), 0, None, True)
    monkeypatch.setenv("FASTCL_WORKSPACE_MB", "0.01")
    for got, want in zip(dev.ops.lse_forward(*args, True, True), whole_f):
        assert_close(got, want, tol("cuda statistics", torch.bfloat16), "forward in blocks")
    for got, want in zip(dev.ops.lse_backward(*args, whole_f[0], whole_f[1], g_r, g_c, True, True), whole_b):
        assert_close(got, want, tol("cuda gradients", torch.bfloat16), "backward in blocks")
    for got, want in zip(dev.ops.pointwise(*no_bias(args), 0, None, True), whole_p):
        assert_close(got, want, tol("cuda gradients", torch.bfloat16), "pointwise in blocks")


def fully_keyed_lines_and_nan(dev: Device):
    x, y, _ = inputs(70, 80, 16, torch.float32, False)
    keys_r, keys_c = torch.zeros(70, dtype=torch.long), torch.zeros(80, dtype=torch.long)  # every pair keyed
    row, col = dev.ops.lse_forward(*dev.all(x, y), torch.tensor(1.0), *dev.all(keys_r, keys_c), True, True)
    assert torch.isneginf(row).all() and torch.isneginf(col).all()
    x[3, 2] = float("nan")
    row, col = dev.ops.lse_forward(*dev.all(x, y), torch.tensor(1.0), None, None, True, True)
    assert torch.isnan(row[3]) and torch.isnan(col).all() and torch.isfinite(row[torch.arange(70) != 3]).all()


def bitwise_deterministic(dev: Device, shape):
    x, y, keys = inputs(*shape, torch.bfloat16, True)
    args = (*dev.all(x, y), torch.tensor(1.1), *dev.all(*keys))
    first = dev.ops.pointwise(*no_bias(args), 0, None, True)
    again = dev.ops.pointwise(*no_bias(args), 0, None, True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    first = dev.ops.lse_forward(*args, True, True)
    again = dev.ops.lse_forward(*args, True, True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    g_r, g_c = dev.put(torch.rand(shape[0])), dev.put(torch.rand(shape[1]))
    first = dev.ops.lse_backward(*args, *again, g_r, g_c, True, True)
    again = dev.ops.lse_backward(*args, *dev.ops.lse_forward(*args, True, True), g_r, g_c, True, True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def non_finite_inputs(dev: Device, dtype):
    """+inf, -inf and NaN features in every input type: S is what IEEE arithmetic gives (+-inf where
    the other side's feature is nonzero, NaN through a NaN), so each statistic is infinite or NaN
    exactly where the float64 reference's is."""
    x, y, _ = inputs(70, 67, 24, dtype, False)
    x[3, 2], x[5, 0], y[9, 4] = float("inf"), float("-inf"), float("inf")
    for nan in (False, True):
        if nan:
            x[11, 1] = float("nan")
        s = 1.5 * x.double() @ y.double().T
        row, col = dev.ops.lse_forward(*dev.all(x, y), torch.tensor(1.5), None, None, True, True)
        assert_close(row, s.logsumexp(1), tol("cuda statistics", dtype), "row lse", equal_nan=True)
        assert_close(col, s.logsumexp(0), tol("cuda statistics", dtype), "col lse", equal_nan=True)


# Features this large make S about 2^104 (2^30 in float16, near its largest value): still finite in
# float32, where the statistics and the pointwise losses must stay accurate (no overflow in a shift).
_HUGE = {torch.float32: 2.0 ** 50, torch.float16: 2.0 ** 13, torch.bfloat16: 2.0 ** 50}


def huge_finite_logits(dev: Device, dtype):
    x, y, keys = inputs(70, 67, 24, dtype, True, seed=5)
    x = (x.double() * _HUGE[dtype]).to(dtype)
    y = (y.double() * _HUGE[dtype]).to(dtype)
    s = x.double() @ y.double().T
    row, col = dev.ops.lse_forward(*dev.all(x, y), torch.tensor(1.0), None, None, True, True)
    assert torch.isfinite(row).all() and torch.isfinite(col).all()
    assert_close(row, s.logsumexp(1), tol("cuda statistics", dtype), "row lse")
    assert_close(col, s.logsumexp(0), tol("cuda statistics", dtype), "col lse")
    mask = keys[0][:, None] == keys[1][None, :]
    f = torch.where(mask, -s, s)
    row_loss, _, _, d_bias = dev.ops.pointwise(*dev.all(x, y), torch.tensor(1.0), None, *dev.all(*keys), 0, None, True)
    assert_close(row_loss, torch.nn.functional.softplus(f).sum(1), tol("cuda statistics", dtype), "row loss")
    grad = torch.where(mask, -f.sigmoid(), f.sigmoid())
    assert_close(d_bias, grad.sum(1), tol("cuda statistics", dtype), "row sums of D")


# --- op lse_prefixes (Matryoshka): K nested feature prefixes in one pass ---------------------------

def prefix_factors(k, m, n, seed=0):
    """Per-prefix row and column factors [K, M], [K, N] in [0.5, 1.5) (inverse prefix norms' role)."""
    gen = torch.Generator().manual_seed(seed * 100 + k * 7 + m * 3 + n)
    return torch.rand(k, m, generator=gen) + 0.5, torch.rand(k, n, generator=gen) + 0.5


def lse_prefixes(dev: Device, shape, dims, factors, sides, dtype, scale=1.3, seed=3, g_size=1.0):
    """Op lse_prefixes (lse_forward_prefixes, lse_backward_prefixes) against float64 on the same
    rounded inputs: each prefix's S^q = scale a^q b^q x[:, :d_q] @ y[:, :d_q].T materialised; its row
    and column lse; then G^q, gy / gx (segment s of the features: sum over q >= s of (a^q b^q G^q) @ y,
    0 past d_K) and the row / column sums of G^q S^q. The chunked backend's kernels in float64 agree
    with this yardstick to 1e-10 (where both sides have lines). ``g_size`` scales the upstream
    gradients (float16 G far below its subnormals when small)."""
    from fastcl.backend import engine
    from fastcl.backend.primitives.shared import _finite_shift

    m, n, d = shape
    k = len(dims)
    x, y, _ = inputs(m, n, d, dtype, False, seed=seed)
    rs, cs = prefix_factors(k, m, n, seed) if factors else (None, None)
    rows, cols = sides in ("rows", "both"), sides in ("cols", "both")
    xd, yd = x.double(), y.double()
    gen = torch.Generator().manual_seed(seed + m + n + d + k)
    g_r = torch.randn(k, m, generator=gen, dtype=torch.float64) * g_size
    g_c = torch.randn(k, n, generator=gen, dtype=torch.float64) * g_size
    want_row, want_col, row_gs, col_gs, hs = [], [], [], [], []
    for q, dq in enumerate(dims):
        s = scale * xd[:, :dq] @ yd[:, :dq].T
        if factors:
            s = s * rs[q, :, None].double() * cs[q, None, :].double()
        want_row.append(s.logsumexp(1))
        want_col.append(s.logsumexp(0))
        grad = torch.zeros_like(s)
        if rows:
            grad += g_r[q, :, None] * (s - _finite_shift(want_row[-1])[:, None]).exp()
        if cols:
            grad += g_c[q, None, :] * (s - _finite_shift(want_col[-1])[None, :]).exp()
        row_gs.append((grad * s).sum(1))
        col_gs.append((grad * s).sum(0))
        hs.append(grad * rs[q, :, None].double() * cs[q, None, :].double() if factors else grad)
    want = (torch.stack(want_row) if rows else xd.new_empty(k, 0),
            torch.stack(want_col) if cols else xd.new_empty(k, 0))
    gy, gx = xd.new_zeros(m, d), yd.new_zeros(n, d)
    for q, dq in enumerate(dims):
        gy[:, :dq] += hs[q] @ yd[:, :dq]
        gx[:, :dq] += hs[q].T @ xd[:, :dq]
    shifts = (_finite_shift(want[0]), _finite_shift(want[1]))
    terms = (*shifts, g_r if rows else g_r[:, :0], g_c if cols else g_c[:, :0])
    want_g = (gy, gx, torch.stack(row_gs), torch.stack(col_gs))
    if m > 0 and n > 0:
        chunked = engine("chunked").kernels
        wide = (xd, yd, torch.tensor(scale, dtype=torch.float64), list(dims),
                None if rs is None else rs.double(), None if cs is None else cs.double())
        for a, b in zip(chunked.lse_forward_prefixes(*wide, rows, cols), want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        got_c = chunked.lse_backward_prefixes(*wide, *terms, rows, cols)
        for a, b in zip(got_c, want_g):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * g_size)
    args = (*dev.all(x, y), torch.tensor(scale), list(dims), *dev.all(rs, cs))
    got = dev.ops.lse_forward_prefixes(*args, rows, cols)
    for what, a, b in (("row lse", got[0], want[0]), ("col lse", got[1], want[1])):
        assert a.shape == b.shape and a.dtype == torch.float32, what
        assert_close(a, b, tol("cuda statistics", dtype), f"{what} (prefixes)")
    got_g = dev.ops.lse_backward_prefixes(*args, *dev.all(*(t.float() for t in terms)), rows, cols)
    # compared at unit size (the tolerances' norm floor is 1: tiny gradients would pass as zeros)
    unit = [a.cpu().double() / g_size for a in got_g]
    want_unit = [b / g_size for b in want_g]
    assert_close(unit[0], want_unit[0], tol("cuda gradients", dtype), "sum_q H^q @ y by segment")
    assert_close(unit[1], want_unit[1], tol("cuda gradients", dtype), "sum_q H^q.T @ x by segment")
    assert torch.all(got_g[0][:, dims[-1]:] == 0) and torch.all(got_g[1][:, dims[-1]:] == 0), "features past d_K"
    assert_close(unit[2], want_unit[2], tol("cuda statistics", dtype), "row sums of G^q S^q")
    assert_close(unit[3], want_unit[3], tol("cuda statistics", dtype), "column sums of G^q S^q")
    return got, got_g


def pointwise_prefixes(dev: Device, shape, dims, factors, kind, weighted, keyed, dtype, scale=1.3, seed=4,
                       g_size=1.0):
    """Op pointwise_prefixes (Matryoshka SigLIP / MW) against float64 on the same rounded inputs: per
    prefix f = T^q + bias with T^q = scale a^q b^q x[:, :d_q] @ y[:, :d_q].T, the loss's row sums and
    G^q = w^q d loss / dS (``pointwise``'s rule per prefix); d_bias the row sums of sum_q G^q, the
    factor sums of G^q T^q, gy / gx by segment from the suffix sums. The chunked backend's kernels in
    float64 agree with this yardstick (where both sides have lines). Also the loss alone."""
    from fastcl.backend import engine

    m, n, d = shape
    k = len(dims)
    x, y, keys = inputs(m, n, d, dtype, keyed, seed=seed)
    rs, cs = prefix_factors(k, m, n, seed) if factors else (None, None)
    gen = torch.Generator().manual_seed(seed + m + n + d + k)
    bias = torch.randn(m, generator=gen, dtype=torch.float64)
    weight = (torch.rand(k, m, generator=gen, dtype=torch.float64) + 0.5) * g_size if weighted else None
    xd, yd = x.double(), y.double()
    mask = None if keys is None else keys[0][:, None] == keys[1][None, :]
    row_sum, row_gs, col_gs, hs = [], [], [], []
    d_bias = xd.new_zeros(m)
    for q, dq in enumerate(dims):
        t = scale * xd[:, :dq] @ yd[:, :dq].T
        if factors:
            t = t * rs[q, :, None].double() * cs[q, None, :].double()
        f = t + bias[:, None]
        if kind == 0:
            if mask is not None:
                f = torch.where(mask, -f, f)
            loss, dsig = torch.nn.functional.softplus(f), torch.sigmoid(f)
            grad = dsig if mask is None else torch.where(mask, -dsig, dsig)
        else:
            loss, grad = torch.nn.functional.softplus(f), torch.sigmoid(f)
            if mask is not None:
                loss, grad = loss.masked_fill(mask, 0.0), grad.masked_fill(mask, 0.0)
        if weight is not None:
            grad = grad * weight[q, :, None]
        row_sum.append(loss.sum(1))
        d_bias += grad.sum(1)
        row_gs.append((grad * t).sum(1))
        col_gs.append((grad * t).sum(0))
        hs.append(grad * rs[q, :, None].double() * cs[q, None, :].double() if factors else grad)
    gy, gx = xd.new_zeros(m, d), yd.new_zeros(n, d)
    for q, dq in enumerate(dims):
        gy[:, :dq] += hs[q] @ yd[:, :dq]
        gx[:, :dq] += hs[q].T @ xd[:, :dq]
    want = (torch.stack(row_sum), gy, gx, d_bias, torch.stack(row_gs), torch.stack(col_gs))
    keys = (None, None) if keys is None else keys
    if m > 0 and n > 0:
        chunked = engine("chunked").kernels
        got_c = chunked.pointwise_prefixes(xd, yd, torch.tensor(scale, dtype=torch.float64), bias, list(dims),
                                           None if rs is None else rs.double(), None if cs is None else cs.double(),
                                           *keys, kind, weight, True)
        for a, b in zip(got_c, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * max(g_size, 1.0))
    args = (*dev.all(x, y), torch.tensor(scale), dev.put(bias.float()), list(dims), *dev.all(rs, cs), *dev.all(*keys),
            kind)
    w = None if weight is None else dev.put(weight.float())
    got = dev.ops.pointwise_prefixes(*args, w, True)
    assert got[0].shape == (k, m) and got[0].dtype == torch.float32
    assert_close(got[0], want[0], tol("cuda statistics", dtype), "row loss (prefixes)")
    unit = [a.cpu().double() / g_size for a in got[1:]]  # at unit size (the tolerances' norm floor is 1)
    want_unit = [b / g_size for b in want[1:]]
    assert_close(unit[0], want_unit[0], tol("cuda gradients", dtype), "sum_q H^q @ y by segment")
    assert_close(unit[1], want_unit[1], tol("cuda gradients", dtype), "sum_q H^q.T @ x by segment")
    assert torch.all(got[1][:, dims[-1]:] == 0) and torch.all(got[2][:, dims[-1]:] == 0), "features past d_K"
    for i, what in ((2, "row sums of sum_q G^q"), (3, "row sums of G^q T^q"), (4, "column sums of G^q T^q")):
        assert_close(unit[i], want_unit[i], tol("cuda statistics", dtype), what)
    loss_only, *empty = dev.ops.pointwise_prefixes(*args, w, False)
    assert all(t.numel() == 0 for t in empty)
    assert_close(loss_only, want[0], tol("cuda statistics", dtype), "row loss without gradients")
    return got
