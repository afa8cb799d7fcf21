"""What the ``triton`` engine costs, proved without a GPU: the work its kernels do, the
memory it allocates, and that it reads its autotuning choice without a race.

- Work: under ``TRITON_INTERPRET=1`` every ``tl.dot`` the kernels execute goes through
  ``InterpreterBuilder.create_dot``; counting there (plus every library GEMM torch runs meanwhile)
  gives the multiply-adds a GPU would issue, padding included. In GEMM-equivalents (``2 M N D``
  flops each) a CLIP forward+backward must stay within 4.2 for any D (the floor is 4: forward S,
  backward S, G @ y, G.T @ x) and SigLIP within 3.2 (floor 3: its gradients come from the forward's S).
- Memory: with ``FASTCL_WORKSPACE_MB=1`` the largest allocation of a CLIP forward+backward may grow
  at most 2.2x when N doubles: workspace is O((M + N) D) plus the bounded budget, never M x N.
- Race-free autotuning: another thread's launch moves an autotuner's shared ``best_config``
  between this launch and its host-side use; results must not depend on it.
- The performance model (``fastcl.benchmark.model``) predicts these counts within 5%.

Like test_triton.py, the interpreter tests run in a child pytest with TRITON_INTERPRET=1
(``test_interpreter_session``).
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastcl
from tolerances import assert_close, tol

ROOT = Path(__file__).resolve().parent.parent
INTERPRETED = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
HAS_TRITON = importlib.util.find_spec("triton") is not None
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child session")


# --- counting the work --------------------------------------------------------------------------

def _einsum_flops(equation: str, *operands) -> int:
    sizes = {}
    for spec, t in zip(equation.split("->")[0].split(","), operands):
        sizes.update(zip(spec.strip(), t.shape))
    return 2 * math.prod(sizes.values())


# Library products torch may run for the backend: (owner, name, flops of the call's tensors).
_LIBRARY = [
    (torch, "mm", lambda a, b, **k: 2 * a.shape[0] * a.shape[1] * b.shape[1]),
    (torch, "addmm", lambda c, a, b, **k: 2 * a.shape[0] * a.shape[1] * b.shape[1]),
    (torch, "matmul", lambda a, b, **k: 2 * math.prod(a.shape) * b.shape[-1]),
    (torch, "bmm", lambda a, b, **k: 2 * math.prod(a.shape) * b.shape[-1]),
    (torch, "mv", lambda a, b, **k: 2 * a.numel()),
    (torch, "dot", lambda a, b, **k: 2 * a.numel()),
    (torch, "einsum", lambda eq, *ops, **k: _einsum_flops(eq, *ops)),
    (torch.Tensor, "mm", lambda a, b, **k: 2 * a.shape[0] * a.shape[1] * b.shape[1]),
    (torch.Tensor, "addmm_", lambda c, a, b, **k: 2 * a.shape[0] * a.shape[1] * b.shape[1]),
    (torch.Tensor, "addmm", lambda c, a, b, **k: 2 * a.shape[0] * a.shape[1] * b.shape[1]),
    (torch.Tensor, "matmul", lambda a, b, **k: 2 * math.prod(a.shape) * b.shape[-1]),
    (torch.Tensor, "__matmul__", lambda a, b, **k: 2 * math.prod(a.shape) * b.shape[-1]),
]


class WorkCounter:
    """Flops of every ``tl.dot`` the interpreter executes and of every library product above."""

    def __init__(self, monkeypatch):
        from triton.runtime.interpreter import InterpreterBuilder

        self.dot_flops = self.library_flops = 0
        create_dot = InterpreterBuilder.create_dot

        def counted_dot(builder, a, b, d, *args, **kwargs):
            *batch, m, k = a.data.shape
            self.dot_flops += 2 * math.prod(batch) * m * k * b.data.shape[-1]
            return create_dot(builder, a, b, d, *args, **kwargs)

        monkeypatch.setattr(InterpreterBuilder, "create_dot", counted_dot)
        for owner, name, flops in _LIBRARY:
            monkeypatch.setattr(owner, name, self._counted(getattr(owner, name), flops))

    def _counted(self, fn, flops):
        def wrapper(*args, **kwargs):
            self.library_flops += flops(*args, **kwargs)
            return fn(*args, **kwargs)
        return wrapper

    def gemm_equivalents(self, m: int, n: int, d: int) -> float:
        return (self.dot_flops + self.library_flops) / (2 * m * n * d)


def _features(n, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
            .to(dtype).requires_grad_() for _ in range(2)]


def clip_step(n, d):
    x, y = _features(n, d)
    scale = torch.tensor(10.0, requires_grad=True)
    fastcl.clip_loss(x, y, scale, backend="triton").backward()


def siglip_step(n, d):
    x, y = _features(n, d)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    fastcl.siglip_loss(x, y, scale, bias, backend="triton").backward()


MATRYOSHKA_DIMS = {512: (64, 128, 200, 384, 512), 48: (5, 16, 48)}


def matryoshka_step(n, d):
    """Matryoshka CLIP (normalised prefixes): one lse_prefixes pass on triton. Dims cut feature
    blocks (200 and 5 are not multiples of the interpreter's blocks) and K = 5 at D = 512."""
    x, y = _features(n, d)
    scale = torch.tensor(10.0, requires_grad=True)
    dims = MATRYOSHKA_DIMS.get(d, (max(1, d // 4), d))
    fastcl.clip_loss(x, y, scale, matryoshka_dims=dims, normalize=True, backend="triton").backward()


def matryoshka_siglip_step(n, d):
    """Matryoshka SigLIP (normalised prefixes): one pointwise_prefixes pass on triton, the dims above."""
    x, y = _features(n, d)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    dims = MATRYOSHKA_DIMS.get(d, (max(1, d // 4), d))
    fastcl.siglip_loss(x, y, scale, bias, matryoshka_dims=dims, normalize=True, backend="triton").backward()


def count_work(monkeypatch, step, n, d) -> float:
    step(8, 16)  # warm-up: first-call work (kernel decoration, autotuner set-up) is not counted
    with monkeypatch.context() as patch:
        counter = WorkCounter(patch)
        step(n, d)
    return counter.gemm_equivalents(n, n, d)


# Recomputing S per 256-wide output slice would cost CLIP 5 / 7 / 11 / 19 GEMM-equivalents at
# D = 128 / 512 / 1024 / 2048, SigLIP 10 at D = 1024 (python/fastcl/backend/triton/DESIGN.md).
@interpreter_only
@pytest.mark.parametrize("d", [128, 512, 1024, 2048])
def test_clip_forward_backward_is_at_the_gemm_floor(monkeypatch, d):
    work = count_work(monkeypatch, clip_step, 256, d)
    assert work <= 4.2, f"CLIP forward+backward at N=256, D={d}: {work:.3f} GEMM-equivalents (floor 4)"


@interpreter_only
def test_siglip_forward_backward_is_at_the_gemm_floor(monkeypatch):
    work = count_work(monkeypatch, siglip_step, 256, 1024)
    assert work <= 3.2, f"SigLIP forward+backward at N=256, D=1024: {work:.3f} GEMM-equivalents (floor 3)"


@interpreter_only
@pytest.mark.parametrize("loss, n, d", [("clip", 256, 1024), ("siglip", 256, 1024), ("clip", 200, 48)])
def test_model_predicts_the_interpreters_count(monkeypatch, loss, n, d):
    from fastcl.benchmark import model

    counted = count_work(monkeypatch, {"clip": clip_step, "siglip": siglip_step}[loss], n, d)
    predicted = model.predict(loss, n, d, "float32", "triton", interpreter=True)["gemm_equivalents"]
    assert abs(predicted - counted) <= 0.05 * counted, \
        f"{loss} N={n} D={d}: model {predicted:.3f} GEMM-equivalents, interpreter {counted:.3f}"


@interpreter_only
@pytest.mark.parametrize("n, d", [(512, 512), (200, 48)])
def test_matryoshka_is_one_pass_at_the_gemm_floor_and_the_model_counts_it(monkeypatch, n, d):
    """K = 5 prefixes of CLIP in the work of one loss at D (4 GEMM-equivalents, plus 16 features per S
    pass and GEMM windows rounded to 16 at a boundary off a multiple of 16, and the prefix norms beside
    the kernels: 4.16 at N = 512), where the K-loop would do 4 sum_k d_k / D (10.1 there); the model's
    count agrees (at N = 200 too, where the interpreter's 256 x 256 tiles pad S)."""
    from fastcl.benchmark import model

    counted = count_work(monkeypatch, matryoshka_step, n, d)
    predicted = model.predict_matryoshka("clip", n, list(MATRYOSHKA_DIMS[d]), "float32", "triton",
                                         interpreter=True)
    assert predicted["schedule"] == "one pass (lse_prefixes)"
    assert abs(predicted["gemm_equivalents"] - counted) <= 0.05 * counted, \
        f"Matryoshka CLIP N={n} D={d}: model {predicted['gemm_equivalents']:.3f}, interpreter {counted:.3f}"
    if d == 512:
        assert counted <= 4.2, f"Matryoshka CLIP K=5 at N={n}, D={d}: {counted:.3f} GEMM-equivalents (floor 4)"


@interpreter_only
@pytest.mark.parametrize("n, d", [(512, 512), (200, 48)])
def test_matryoshka_siglip_is_one_pass_at_the_gemm_floor_and_the_model_counts_it(monkeypatch, n, d):
    """K = 5 prefixes of SigLIP in the work of one SigLIP at D (3 GEMM-equivalents: the S pass that
    forms the gradient tiles, the two per-segment GEMMs on their suffix sums; plus the boundary chunks
    and the prefix norms, as for CLIP), where the K-loop would do 3 sum_k d_k / D (7.6 at D = 512);
    the model's count agrees."""
    from fastcl.benchmark import model

    counted = count_work(monkeypatch, matryoshka_siglip_step, n, d)
    predicted = model.predict_matryoshka("siglip", n, list(MATRYOSHKA_DIMS[d]), "float32", "triton",
                                         interpreter=True)
    assert predicted["schedule"] == "one pass (pointwise_prefixes)"
    assert abs(predicted["gemm_equivalents"] - counted) <= 0.05 * counted, \
        f"Matryoshka SigLIP N={n} D={d}: model {predicted['gemm_equivalents']:.3f}, interpreter {counted:.3f}"
    if d == 512:
        assert counted <= 3.2, f"Matryoshka SigLIP K=5 at N={n}, D={d}: {counted:.3f} GEMM-equivalents (floor 3)"
        assert predicted["k_loop"]["gemm_equivalents"] > 2 * counted


# --- memory -------------------------------------------------------------------------------------

def largest_allocation(step) -> int:
    """Bytes of the largest single allocation torch's profiler sees during ``step()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return max(e.self_cpu_memory_usage for e in prof.events())


@interpreter_only
def test_workspace_is_bounded_by_the_budget(monkeypatch):
    """Per-tile column partials ([ceil(M / 64), N] x 2) would grow 4x per doubling of N."""
    monkeypatch.setenv("FASTCL_WORKSPACE_MB", "1")
    inputs = {n: (*_features(n, 16), torch.tensor(10.0, requires_grad=True)) for n in (2048, 4096)}
    step = lambda n: fastcl.clip_loss(*inputs[n], backend="triton").backward()
    sizes = {n: largest_allocation(lambda n=n: step(n)) for n in inputs}
    assert sizes[4096] <= 2.2 * sizes[2048], f"largest allocation {sizes[2048]} B at N=2048, {sizes[4096]} B at 4096"
    # the budget plus the O((M + N) D) gradients: 4096 x 16 float32 rows
    assert sizes[4096] <= (1 << 20) + 4096 * 16 * 4, f"largest allocation {sizes[4096]} B with a 1 MiB budget"


# --- race-free autotuning -----------------------------------------------------------------------

@interpreter_only
def test_autotune_choice_is_read_race_free(monkeypatch):
    """After every launch, pretend another thread launched the same kernel with other block sizes
    (the autotuner's ``best_config`` is shared by all threads); the results must not change."""
    import triton

    from fastcl.backend.chunked import lse as chunked

    tuners = list(_autotuned_kernels())
    assert tuners, "no autotuned kernel found"

    def clobbering(tuner):
        run = tuner.run

        def wrapper(*args, **kwargs):
            out = run(*args, **kwargs)
            tuner.best_config = triton.Config({k: 16 for k in tuner.configs[0].kwargs})
            return out
        return wrapper

    for tuner in tuners:
        monkeypatch.setattr(tuner, "run", clobbering(tuner))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(150, 24, generator=gen), torch.randn(140, 24, generator=gen)
    scale = torch.tensor(1.5)
    from fastcl.backend import engine

    monkeypatch.setenv("FASTCL_WORKSPACE_MB", "0.001")  # several blocks, several launches
    got = engine("triton").kernels.lse_forward(x, y, scale, None, None, True, True)
    want = chunked.lse_forward(x.double(), y.double(), scale.double(), None, None, True, True)
    assert_close([g.double() for g in got], list(want), tol("triton statistics"), "lse_forward, clobbered autotuner")


# --- compiled variants --------------------------------------------------------------------------

def _autotuned_kernels():
    from triton.runtime.autotuner import Autotuner

    import fastcl.backend.triton as kernels_package
    from fastcl.backend import engine

    _ = engine("triton").kernels  # imports the kernels

    return {id(obj): obj for mod in list(sys.modules.values())
            if getattr(mod, "__name__", "").startswith(kernels_package.__name__ + ".")
            for obj in vars(mod).values() if isinstance(obj, Autotuner)}.values()


@interpreter_only
def test_every_loss_shares_one_compiled_variant_per_kernel(monkeypatch):
    """Triton compiles a kernel once per signature (pointer types, constexprs, specialised ints).
    The flags are run-time arguments and absent operands are stand-ins of the real type, so the
    losses of one dtype, width and shape (keyed or not, one direction or two, with gradients or
    without) launch each kernel with one signature (two for the GEMM: G read either way; a ragged
    last column block specialises differently): what ``aot.launch_variants`` counts and
    gpu_check.sh's compile budget rests on."""
    signatures = {}

    def recording(tuner):
        run = tuner.run

        def wrapper(*args, **kwargs):
            key = (tuner.base_fn.__name__, kwargs.get("TRANSPOSED"))
            sig = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
            consts = tuple(sorted((k, v) for k, v in kwargs.items() if k.isupper()))
            signatures.setdefault(key, set()).add((sig, consts))
            return run(*args, **kwargs)
        return wrapper

    clip_step(8, 16)
    siglip_step(8, 16)
    for tuner in _autotuned_kernels():
        monkeypatch.setattr(tuner, "run", recording(tuner))
    gen = torch.Generator().manual_seed(3)
    x, y = (torch.randn(40, 32, generator=gen, requires_grad=True) for _ in range(2))
    scale, bias = torch.tensor(3.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
    labels = torch.randint(0, 40, (40,), generator=gen)
    losses = [fastcl.clip_loss(x, y, scale, backend="triton"),
              fastcl.infonce_loss(x, y, labels=labels, backend="triton"),
              fastcl.ntxent_loss([x, y], backend="triton"),
              fastcl.siglip_loss(x, y, scale, bias, backend="triton"),
              fastcl.siglip_loss(x, y, scale, bias, reduction="none", backend="triton").sum(),
              fastcl.mw_loss(x, y, backend="triton")]
    sum(losses).backward()
    assert {k[0] for k in signatures} == {"_forward_kernel", "_gradient_kernel", "_pointwise_kernel", "_gemm_kernel"}
    many = {k: v for k, v in signatures.items() if len(v) > 1}
    assert not many, f"kernels launched with several signatures: {many}"


# --- the proof kit's commands ------------------------------------------------------------------

def test_model_command_prints_the_numbers():
    out = subprocess.run([sys.executable, "-m", "fastcl.benchmark.model", "--loss", "clip", "--n", "65536", "--d",
                          "1024", "--dtype", "bfloat16", "--backend", "triton", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    got = json.loads(out.stdout)
    assert got["gemm_equivalents"] == pytest.approx(4.0, abs=0.01)
    assert 0 < got["workspace_bytes"] <= 256 << 20
    assert got["exps"] > 0 and got["hbm_bytes"] > 0
    assert set(got["predicted_ms"]) == {"a100", "h100", "h200"}
    assert all(got["predicted_ms"][k] >= got["floor_ms"][k] > 0 for k in got["predicted_ms"])


def _matryoshka_model(backend, dims="64,128,256,512,768", n="4096"):
    out = subprocess.run([sys.executable, "-m", "fastcl.benchmark.model", "--loss", "clip", "--n", n, "--d",
                          dims.split(",")[-1], "--dtype", "float32", "--efficiency", "assumed", "--gpu", "h200",
                          "--backend", backend, "--matryoshka-dims", dims], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    return json.loads(out.stdout)


def test_model_counts_matryoshka_on_triton_as_one_pass():
    """triton declares lse_prefixes: CLIP at any K is the work of one loss at D (<= 4.2
    GEMM-equivalents; boundaries off multiples of 16 multiply 16 features twice), K times its exps,
    K slots of H; the K-loop would be 4 sum_k d_k / D."""
    for dims in ("768", "384,768", "64,128,256,512,768", "32,64,96,128,192,256,384,512,768", "100,300,768"):
        got = _matryoshka_model("triton", dims)
        k = len(dims.split(","))
        assert got["schedule"] == "one pass (lse_prefixes)"
        assert got["gemm_equivalents"] <= 4.2, (dims, got["gemm_equivalents"])
        assert got["exps"] == pytest.approx(k * got["single_at_d"]["exps"])
        assert got["h_bytes"] == pytest.approx(3 * k * 4096 * 4096 * 4)  # float32 H: K stores, two GEMM reads each
        assert got["predicted_ms"]["h200"] >= got["single_at_d"]["predicted_ms"]["h200"] > 0
    five = _matryoshka_model("triton")
    assert five["k_loop"]["gemm_equivalents"] == pytest.approx(4 * (64 + 128 + 256 + 512 + 768) / 768, rel=0.01)
    assert five["predicted_ms"]["h200"] < five["k_loop"]["predicted_ms"]["h200"]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_model_counts_matryoshka_siglip_as_one_pass(backend):
    """triton and cuda declare pointwise_prefixes: SigLIP at any K is the work of one SigLIP at D (<= 3.2
    GEMM-equivalents), K times its transcendentals, K slots of H; the K-loop would be 3 sum_k d_k / D.
    MW has no one-pass form: the loop, and the model says why."""
    from fastcl.benchmark import model

    dims = [64, 128, 256, 512, 768]
    for ds in ([768], [384, 768], dims, [100, 300, 768]):
        got = model.predict_matryoshka("siglip", 4096, ds, "bfloat16", backend)
        assert got["schedule"] == "one pass (pointwise_prefixes)"
        assert got["gemm_equivalents"] <= 3.2, (ds, got["gemm_equivalents"])
        assert got["exps"] == pytest.approx(len(ds) * got["single_at_d"]["exps"])
        assert got["h_bytes"] == pytest.approx(3 * len(ds) * 4096 * 4096 * 2)  # bfloat16 H
    five = model.predict_matryoshka("siglip", 4096, dims, "bfloat16", backend)
    assert five["k_loop"]["gemm_equivalents"] == pytest.approx(3 * sum(dims) / 768, rel=0.01)
    assert five["predicted_ms"]["h200"] < five["k_loop"]["predicted_ms"]["h200"]
    loop = model.predict_matryoshka("mw", 4096, dims, "bfloat16", backend)
    assert loop["schedule"] == "K-loop" and "no one-pass" in loop["schedule_why"]


def test_model_counts_matryoshka_on_cuda_as_one_pass():
    """cuda declares lse_prefixes (csrc/cuda/prefixes.cuh): CLIP at any K is about the work of one loss
    at D (4 GEMM-equivalents; segments in whole 32-feature stages), K times its exps, K slots of H;
    past 16 prefixes a second launch recomputes from feature 0. The K-loop would be 4 sum_k d_k / D."""
    for dims in ("768", "384,768", "64,128,256,512,768", "32,64,96,128,192,256,384,512,768", "100,300,768"):
        got = _matryoshka_model("cuda", dims)
        k = len(dims.split(","))
        assert got["schedule"] == "one pass (lse_prefixes)" and "cuda declares" in got["schedule_why"]
        assert got["gemm_equivalents"] <= 4.2, (dims, got["gemm_equivalents"])
        assert got["exps"] == pytest.approx(k * got["single_at_d"]["exps"])
        assert got["h_bytes"] == pytest.approx(3 * k * 4096 * 4096 * 4)  # float32 H
        assert got["predicted_ms"]["h200"] >= got["single_at_d"]["predicted_ms"]["h200"] > 0
    five = _matryoshka_model("cuda")
    assert five["k_loop"]["gemm_equivalents"] == pytest.approx(4 * (64 + 128 + 256 + 512 + 768) / 768, rel=0.01)
    assert five["predicted_ms"]["h200"] < five["k_loop"]["predicted_ms"]["h200"]
    many = _matryoshka_model("cuda", ",".join(str(32 * i) for i in range(1, 25)))  # K = 24: two launches
    assert 6.5 < many["gemm_equivalents"] < 6.8  # (512 + 768) / 768 per S pass and per GEMM pair


# --- the child session --------------------------------------------------------------------------

@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter session itself")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_interpreter_session():
    """This file's interpreter tests, in a child pytest with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and " failed" not in out.stdout
