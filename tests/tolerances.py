"""Every tolerance the tests compare numbers with, and the one helper that compares them.

``TOLERANCES[name][dtype]`` is a ``Tol``, read through ``tol(name, dtype)``; a dtype a row does not
declare is a ``KeyError``, not a silent default. A ``Tol`` is one of two rules:
- elementwise (``rtol``, ``atol``): ``|got - want| <= atol + rtol * |want|`` everywhere (torch.isclose's
  rule), between tensors of one dtype: results that should agree to round-off;
- in norm (``norm``, ``floor``): ``||got - want|| / max(||want||, floor) <= norm``: a low-precision
  result measured against float64 math on the same rounded inputs, where single elements near zero
  carry no meaning. ``floor = 1`` makes small results absolute, ``floor = 0`` purely relative.

``assert_close`` applies either rule after the shape (and, elementwise, the dtype) matches, an
infinity of ``want`` is matched in place and sign, and NaN appears nowhere (or, with ``equal_nan``,
in the same places); its message gives the error and where. Rows that measure the same kind of
thing with different numbers say why in their comment.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


@dataclass(frozen=True)
class Tol:
    rtol: float = 0.0
    atol: float = 0.0
    norm: float | None = None  # set: the in-norm rule instead of the elementwise one
    floor: float = 1.0

    def __mul__(self, k: float) -> Tol:
        """The same rule, ``k`` times as loose."""
        if self.norm is not None:
            return replace(self, norm=self.norm * k)
        return replace(self, rtol=self.rtol * k, atol=self.atol * k)

    __rmul__ = __mul__

    def __str__(self) -> str:
        if self.norm is not None:
            return f"{self.norm:.3g} in norm (floor {self.floor:g})"
        return f"rtol {self.rtol:.3g}, atol {self.atol:.3g}"


def _in_norm(floor: float = 1.0, **by_dtype: float) -> dict[torch.dtype, Tol]:
    dtypes = {"float64": F64, "float32": F32, "float16": F16, "bfloat16": BF16}
    return {dtypes[name]: Tol(norm=value, floor=floor) for name, value in by_dtype.items()}


_LOW_PRECISION = _in_norm(float32=2e-5, float16=4e-3, bfloat16=2e-2)
_TRITON_KERNEL_TOL = _in_norm(float64=1e-12, float32=2e-6, float16=2e-3, bfloat16=1e-2)

TOLERANCES: dict[str, dict[torch.dtype, Tol]] = {
    # --- a fused backend against the materialised reference, both in float64 ------------------------
    # The same sums in another order: every loss, value and gradients, on every engine backend
    # (test_backends, test_triton, test_temperature) and each rank of a group against the
    # single-process reference (test_distributed).
    "float64": {F64: Tol(rtol=1e-9, atol=1e-11)},
    # MaxSim against its [B, N, Lq, Ld] reference (test_maxsim). Looser atol than "float64" (1e-9 vs
    # 1e-11): set on its own when MaxSim came; chunked and cpu meet it with room (at rtol 1e-9 they
    # need no atol at all, measured 2026-12-04). Kept as it was.
    "maxsim float64": {F64: Tol(rtol=1e-9, atol=1e-9)},
    # MaxSim over a process group against the single-process reference (test_maxsim_distributed):
    # tighter atol than "maxsim float64" (1e-12 vs 1e-9), set on its own by that test. Kept as it was.
    "maxsim distributed": {F64: Tol(rtol=1e-9, atol=1e-12)},
    # A module's nn.Parameter against the functional's tensor, both float64 on chunked or reference
    # (test_temperature): atol 1e-12 where "float64" has 1e-11, set on its own by those tests. Kept.
    "module parameter": {F64: Tol(rtol=1e-9, atol=1e-12)},
    # First derivatives of a fused backend that also offers a graph for second ones
    # (test_double_backward): relative only, as that test has always asked.
    "first derivatives": {F64: Tol(rtol=1e-9, atol=0.0)},
    # A drop-in against its peer library's own code (test_anchors, test_dropins): another formula
    # for the same number, in float64 (and the float32 rows a memory bank stores, by the same rule).
    "peer": {F64: Tol(rtol=1e-10, atol=1e-12)},
    # fastcl.nn's distributed modules against open_clip's and lightly's formulas on each rank
    # (test_distributed): the largest |difference| of value and gradients, as the rank reports it.
    "peer distributed": {F64: Tol(atol=1e-10)},
    # PyLate's and colpali-engine's own classes, run in the environment tools/late_interaction_venv.sh
    # makes, against fastcl's drop-ins (test_late_interaction_packages): float64 as "peer"; float32
    # relative to each tensor's norm, 1e-5 as the acceptance asked (measured 2026-12-05: 5e-7; single
    # small gradient elements differ by up to 1e-4 of themselves, so not elementwise).
    "peer package float32": {F32: Tol(norm=1e-5, floor=0.0)},

    # --- the same computation regrouped: equal to round-off of a few operations -----------------------
    # A tensor scale against the number it holds (test_temperature), top-k values and their
    # gradients against the reference and torch.topk (test_topk), a cached step's tensors against the
    # plain step's without dropout (test_cached).
    "regrouped": {F64: Tol(rtol=1e-12, atol=1e-12)},
    # The cached step's returned loss against the plain step's (test_cached): one number, relative.
    "cached loss": {F64: Tol(rtol=1e-12, atol=0.0)},
    # Cached gradients against the plain step's, absolute: with dropout replayed per chunk and over
    # DDP ranks (test_cached, test_cached_distributed; the acceptance asked 1e-6), accumulated twice
    # against twice once, and scaled by a GradScaler against 256 x unscaled (test_cached).
    "cached gradients": {F64: Tol(atol=1e-9)},
    "cached accumulated": {F64: Tol(atol=1e-12)},
    "cached scaled": {F64: Tol(atol=1e-10)},
    # A NumPy scalar against the Python number it holds (test_temperature): the same bits.
    "exact": {F64: Tol(rtol=0.0, atol=0.0)},

    # --- float32 results of one backend against each other --------------------------------------------
    # A torch.compile(fullgraph=True) step against eager (test_compile, test_maxsim).
    "compiled": {F32: Tol(rtol=1e-5, atol=1e-6)},
    # Comparisons that name no tolerance: torch.testing.assert_close's defaults for the dtype
    # (test_temperature's compiled temperature, test_maxsim's module and hand-computed loss,
    # test_topk's MoCHi mixtures).
    "torch default": {F32: Tol(rtol=1.3e-6, atol=1e-5), F64: Tol(rtol=1e-7, atol=1e-7)},
    # The cpu backend at one thread against two (test_determinism): its kernels are bitwise equal,
    # the glue around them (torch's BLAS and reductions) splits work by thread count.
    "thread count loss": {F32: Tol(rtol=1e-6, atol=1e-7)},
    "thread count gradients": {F32: Tol(rtol=1e-5, atol=1e-7)},
    # fastcl.topk in float32 against torch.topk(x @ y.T) (test_topk): values to float32 round-off of a
    # D = 48 dot; the picked columns' float64 values against the float64 top k, absolute only.
    "topk float32": {F32: Tol(rtol=2e-6, atol=2e-5)},
    "topk picks": {F64: Tol(rtol=0.0, atol=2e-5)},

    # --- low precision against float64 math on the same rounded inputs, in norm -----------------------
    # Every loss, value and gradients: fp32 math with outputs rounded to 8 (bf16) or 11 (fp16)
    # mantissa bits. test_backends' engines, test_triton under the interpreter, and test_cuda's
    # losses (there named LOSS_TOL: the same numbers).
    "low precision": _LOW_PRECISION,
    # test_triton's losses on a GPU: float32 tiles use three TF32 products and exp is the hardware's
    # approximation: about 1e-6 per element, 1e-4 in norm with margin. test_cuda asks 2e-5 of the
    # cuda backend in float32 ("low precision"): its S is 3xTF32 too, but neither number has been
    # measured on a GPU yet; kept as each file set it.
    "low precision triton gpu": {**_LOW_PRECISION, F32: Tol(norm=1e-4)},
    # cuda against triton on one GPU (test_cuda): each within "low precision" of the reference.
    "cuda vs triton": {dtype: 2 * t for dtype, t in _LOW_PRECISION.items()},
    # MaxSim (test_maxsim, one masked case with labels and extra documents): purely relative (floor
    # 1e-30, not 1); float32 2x tighter and float16 / bfloat16 1.25x / 1.5x looser than "low
    # precision", set on its own when MaxSim came. Kept as it was.
    "maxsim low precision": _in_norm(1e-30, float32=1e-5, bfloat16=3e-2, float16=5e-3),
    # A float32 temperature's gradient with float32 or bfloat16 features (test_temperature),
    # elementwise against float64 math on the same rounded features.
    "temperature gradient": {F64: Tol(rtol=2e-2, atol=1e-3)},
    # CPU autocast (bfloat16) cached step against the plain one (test_cached): bfloat16 precision.
    "cached autocast": {F32: Tol(norm=1e-2, floor=0.0)},
    # open_clip_train's main, stock against fastcl's losses, 5 AdamW steps of a tiny CLIP
    # (test_open_clip_train): float32 round-off of the loss, carried through the steps into the weights
    # (measured 2026-12-05: losses <= 2.3e-7 relative; weights 1.4e-7 absolute in one process, 2.1e-7
    # for CLIP on 2 ranks, 1.5e-6 for SigLIP on 2 ranks: AdamW's steps divide by the gradient's size,
    # so the round-off of small gradients reaches the weights at a fraction of lr = 1e-3).
    "trainer float32": {F32: Tol(rtol=2e-6, atol=4e-6)},
    # ... under --precision amp_bf16: open_clip's logits are bfloat16 products, fastcl's float32; one
    # bfloat16 rounding (2**-8) in norm (measured 5.8e-4).
    "trainer bfloat16 autocast": {F32: Tol(norm=4e-3, floor=0.0)},

    # --- engine kernels -------------------------------------------------------------------------------
    # triton's three kernels against chunked's in float64 on the same rounded inputs (test_triton).
    # float32 grows with sqrt(D / 16) at the call site (round-off of a length-D dot).
    "triton kernels": _TRITON_KERNEL_TOL,
    # ... on a GPU: float32 as "low precision triton gpu"; G is rounded to TF32 for float16 and to
    # bfloat16 for bfloat16 before the gradient GEMMs, as under the interpreter.
    "triton kernels gpu": {**_TRITON_KERNEL_TOL, F32: Tol(norm=1e-4)},
    # triton's float32 forward statistics with an autotuner another thread clobbers
    # (test_triton_engine), elementwise against chunked in float64.
    "triton statistics": {F64: Tol(rtol=1e-5, atol=1e-5)},
    # The cuda kernels against float64 math on the materialised S (test_cuda). S is accurate to fp32
    # in every input dtype (3xTF32 for float32; 16-bit products are exact in fp32), so statistics and
    # row losses get 2e-5; the gradient GEMMs take G in the input's 16-bit type (float16 scaled by a
    # power of two), so gradients get that type's rounding. bfloat16 gradients get 1.5e-2 where
    # "triton kernels" asks 1e-2 of the same bfloat16 G, and float32 2e-5 where triton's GPU row has
    # 1e-4: each file set its own, and neither has run on a GPU yet. Kept as each file set it.
    "cuda statistics": _in_norm(float32=2e-5, float16=2e-5, bfloat16=2e-5),
    "cuda gradients": _in_norm(float32=2e-5, float16=2e-3, bfloat16=1.5e-2),
    # The CPU emulations of the cuda kernels' arithmetic (test_cuda_plan): float16 G stored times 2^k,
    # G @ y relative to the exact product; 3xTF32 S of finite rows, absolute.
    "emulated float16 G": {F64: Tol(norm=1e-3, floor=0.0)},
    "emulated 3xtf32": {F64: Tol(atol=1e-5)},
}

# torch.autograd.gradcheck's tolerances for every loss and scale (test_backends, test_temperature).
GRADCHECK = {"eps": 1e-6, "atol": 1e-6, "rtol": 1e-5}


def tol(name: str, dtype: torch.dtype = torch.float64) -> Tol:
    """The row ``name``'s tolerance for results in ``dtype``."""
    return TOLERANCES[name][dtype]


def assert_close(got, want, tol: Tol, what: str = "", *, equal_nan: bool = False) -> None:
    """``got`` within ``tol`` of ``want``: tensors, numbers, or lists, tuples and mappings of them."""
    if isinstance(want, Mapping):
        assert isinstance(got, Mapping) and got.keys() == want.keys(), f"{what}: keys {list(got)} vs {list(want)}"
        for key in want:
            assert_close(got[key], want[key], tol, f"{what}[{key!r}]", equal_nan=equal_nan)
        return
    if isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{what}: {len(got)} vs {len(want)} items"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, tol, f"{what}[{i}]", equal_nan=equal_nan)
        return
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    if tol.norm is None:
        assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} vs {want.dtype}"
    got, want = got.detach().cpu().double().flatten(), want.detach().cpu().double().flatten()
    nan = want.isnan()
    if equal_nan:
        assert torch.equal(got.isnan(), nan), f"{what}: NaN in other places"
    else:
        assert not nan.any() and not got.isnan().any(), f"{what}: NaN ({int(got.isnan().sum())} in got, " \
            f"{int(nan.sum())} in want)"
    inf = want.isinf()
    assert torch.equal(got[inf], want[inf]), f"{what}: infinities differ"
    g, w = got[~inf & ~nan], want[~inf & ~nan]
    if tol.norm is None:
        err, bound = (g - w).abs(), tol.atol + tol.rtol * w.abs()
        if not bool((err <= bound).all()):
            worst = int((err - bound).argmax())
            index = int(torch.nonzero(~inf & ~nan)[worst])
            raise AssertionError(f"{what}: max error {err.max().item():.3g} beyond {tol}; worst at flat index "
                                 f"{index} (got {g[worst].item():.12g}, want {w[worst].item():.12g})")
        return
    diff, scale = (g - w).norm().item(), max(w.norm().item(), tol.floor)
    err = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    if not err <= tol.norm:
        worst = int((g - w).abs().argmax())
        index = int(torch.nonzero(~inf & ~nan)[worst])
        raise AssertionError(f"{what}: relative error {err:.3g} > {tol}; max abs {(g - w).abs().max().item():.3g} "
                             f"at flat index {index}")


def assert_runs_close(got, want, tol: Tol, what: str, *, equal_nan: bool = False) -> None:
    """Two ``(loss, gradients)`` results (``cases.run``): the loss and every gradient within ``tol``,
    a gradient present in both or in neither."""
    (out, grads), (ref_out, ref_grads) = got, want
    assert_close(out, ref_out, tol, f"{what}: loss", equal_nan=equal_nan)
    assert len(grads) == len(ref_grads), f"{what}: {len(grads)} vs {len(ref_grads)} gradients"
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert (g is None) == (r is None), f"{what}: gradient {i} present in only one of them"
        if g is not None:
            assert_close(g, r, tol, f"{what}: gradient {i}", equal_nan=equal_nan)
