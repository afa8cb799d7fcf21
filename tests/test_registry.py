"""The declarations in ``fastcl/backend/registry.py`` drive dispatch: a backend declared in this
process (``chunked``'s kernels under a new name, for some ops only) is listed, picked by ``"auto"``
for the ops it declares, skipped for the others, and refused with the declared reason when asked
explicitly for what it lacks. Nothing else in the library lists backends."""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import fastcl
from fastcl.backend import BackendUnavailableError, registry, resolve
from fastcl.backend.chunked import lse as chunked_lse
from fastcl.backend.chunked import topk as chunked_topk
from fastcl.backend.registry import BackendSpec, Op

ROOT = Path(__file__).resolve().parent.parent
TEXT = (".py", ".md", ".sh", ".txt", ".json", ".cpp", ".h", ".cu", ".cuh")
TOY_MODULE = "fastcl_test_toy_kernels"  # a module made here: chunked's kernels, counting calls


@pytest.fixture
def toy_kernels(monkeypatch):
    module = types.ModuleType(TOY_MODULE)
    module.calls = []

    def counted(name, kernel):
        def run(*args):
            module.calls.append(name)
            return kernel(*args)
        return run

    module.lse_forward = counted("lse_forward", chunked_lse.lse_forward)
    module.lse_backward = counted("lse_backward", chunked_lse.lse_backward)
    module.topk = counted("topk", chunked_topk.topk)
    monkeypatch.setitem(sys.modules, TOY_MODULE, module)
    return module


@pytest.fixture
def declare():
    """Declare backends for one test; their declarations are removed after it."""
    added = []

    def add(**fields):
        spec = BackendSpec(**{"label": fields["name"], "devices": ("cpu",), "dtypes": registry.FLOATS,
                              "native_dtypes": registry.WIDE, "priority": 100, **fields})
        registry.register(spec)
        added.append(spec.name)
        return spec

    yield add
    for name in added:
        registry.unregister(name)


def _features(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_a_backend_declared_for_lse_only_runs_clip_and_nothing_else(declare, toy_kernels, monkeypatch):
    monkeypatch.setattr(registry, "MATERIALISE_BELOW_PAIRS", {})  # these sizes would take the reference path
    declare(name="toy", ops={"lse": Op(TOY_MODULE)})
    assert "toy" in fastcl.backends() and "toy" in fastcl.backends(op="lse")
    assert "toy" not in fastcl.backends(op="pointwise") and "toy" not in fastcl.backends(op="maxsim")
    assert fastcl.info()["declared"]["toy"]["ops"] == ["lse"]
    x, y = _features(9, 4, seed=1).requires_grad_(), _features(9, 4, seed=2)

    # "auto" takes it for CLIP (an lse loss), forward and backward, with the reference's result
    assert resolve("auto", x, op="lse") == "toy"
    loss = fastcl.clip_loss(x, y, 3.0)
    loss.backward()
    assert {"lse_forward", "lse_backward"} <= set(toy_kernels.calls)
    torch.testing.assert_close(loss, fastcl.clip_loss(x, y, 3.0, backend="reference"))

    # and skips it for SigLIP (pointwise), which it does not declare
    toy_kernels.calls.clear()
    assert resolve("auto", x, op="pointwise") != "toy"
    fastcl.siglip_loss(x, y, 3.0, -1.0)
    assert toy_kernels.calls == []

    # asked for MaxSim explicitly, it raises the declared reason, naming the missing op
    q, d = _features(3, 5, 4), _features(3, 6, 4)
    with pytest.raises(BackendUnavailableError, match="backend='toy' cannot run the 'maxsim' op") as err:
        fastcl.maxsim_loss(q, d, backend="toy")
    [reason] = err.value.reasons
    assert "there is no toy MaxSim kernel: the toy backend does not declare the 'maxsim' op" in reason
    assert "'chunked'" in reason  # where it runs instead


def test_declared_dtypes_devices_and_limits_are_the_reasons(declare, toy_kernels):
    declare(name="toy", ops={"lse": Op(TOY_MODULE), "topk": Op(TOY_MODULE, limits={"k": (2, "a toy")})},
            dtypes=(torch.float64,))
    assert "toy" in fastcl.backends("cpu", torch.float64) and "toy" not in fastcl.backends("cpu", torch.float32)
    assert "toy" not in fastcl.backends("meta", torch.float64)
    assert registry.not_supported_reasons("toy", torch.device("cpu"), torch.float32) == [
        "the toy kernels take float64, not float32"]
    assert registry.not_supported_reasons("toy", torch.device("meta"), torch.float64) == [
        "the toy kernels run on CPU tensors only, got meta"]

    x, y = _features(6, 3, seed=3), _features(8, 3, seed=4)
    fastcl.topk(x, y, 2)  # within the declared limit: "auto" takes it
    assert toy_kernels.calls == ["topk"]
    fastcl.topk(x, y, 3)  # beyond it: "auto" takes the next backend
    assert toy_kernels.calls == ["topk"]
    with pytest.raises(BackendUnavailableError, match=r"the toy top-k kernel takes k <= 2 \(a toy\), got k=3"):
        fastcl.topk(x, y, 3, backend="toy")


def test_the_builtin_declarations_are_the_reasons():
    cpu = torch.device("cpu")
    assert any("k <= 256" in r for r in registry.not_supported_reasons("triton", cpu, torch.float32, "topk", k=257))
    assert not any("k <= 256" in r for r in registry.not_supported_reasons("triton", cpu, torch.float32, "topk", k=256))
    cuda = registry.not_supported_reasons("cuda", cpu, torch.float64, "maxsim")
    assert "the CUDA kernels run on CUDA tensors only, got cpu" in cuda
    assert "the CUDA kernels take float32, float16 and bfloat16, not float64" in cuda
    assert any(r.startswith("there is no CUDA MaxSim kernel") for r in cuda)
    for name, spec in registry.BACKENDS.items():  # every declared op module provides its contract
        for op, entry in spec.ops.items():
            if entry.module is not None and not registry.not_supported_reasons(name, cpu, torch.float32, op):
                module = registry.kernels(name, op)
                assert all(callable(getattr(module, f)) for f in registry.OPS[op].functions), (name, op)


def test_an_op_module_without_its_functions_is_named(declare):
    declare(name="toy", ops={"lse": Op("fastcl.backend.chunked.pointwise")})
    x = _features(4, 3)
    with pytest.raises(AttributeError, match=r"fastcl.backend.chunked.pointwise .* backend 'toy'.*'lse_forward'"):
        fastcl.clip_loss(x, x, 1.0, backend="toy")


def test_an_unknown_op_is_refused_at_declaration():
    with pytest.raises(ValueError, match=r"unknown ops \['lse_fused'\]"):
        registry.register(BackendSpec(name="toy", label="toy", devices=None, dtypes=registry.FLOATS,
                                      native_dtypes=registry.WIDE, ops={"lse_fused": Op("x")}))
    assert "toy" not in registry.BACKENDS


def test_auto_tries_backends_by_declared_priority():
    for device in ("cpu", "cuda", "meta"):
        ranked = [registry.BACKENDS[n].priority for n in registry.auto_candidates(device)]
        assert ranked == sorted(ranked, reverse=True)
    assert registry.auto_candidates("cuda") == ["triton", "cuda", "chunked"]
    assert registry.auto_candidates("cpu") == ["cpu", "chunked"]  # the Triton interpreter is never picked unasked
    assert registry.auto_candidates("meta") == ["chunked"]


def test_kernel_modules_import_nothing_of_the_dispatch_layer():
    """The registry imports op modules when a call first runs on them; a kernel module importing the
    registry, the primitives or the shared ops back would close an import cycle. Kernels import their
    own backend's folder, fastcl._ext (the compiled extension) and libraries."""
    for spec in registry.BACKENDS.values():
        for entry in spec.ops.values():
            if entry.module is None:
                continue
            own = entry.module.rsplit(".", 1)[0]
            tree = ast.parse(Path(importlib.util.find_spec(entry.module).origin).read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    base = ".".join(filter(None, (entry.module.rsplit(".", node.level)[0] if node.level else "",
                                                  node.module)))
                    targets = [base] if node.module else [f"{base}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                else:
                    continue
                for target in targets:
                    assert not target.startswith("fastcl") or target.startswith(own) or target == "fastcl._ext", \
                        f"{entry.module} imports {target}"


def test_one_declaration_site():
    """What each backend can do is said in registry.py only: the repository has no other table of
    engines, kernels or auto order (the names are spelled in pieces here, so that this file is not one)."""
    pattern = re.compile("|".join(["_EN" "GINES", "_KER" "NELS", "AUTO" "_ORDER"]))
    tops = ("python", "csrc", "tests", "bench", "tools", "docs", "examples", "cmake")
    files = [ROOT / "README.md", *(p for top in tops for p in (ROOT / top).rglob("*") if p.suffix in TEXT)]
    sites = {p.relative_to(ROOT).as_posix() for p in files if pattern.search(p.read_text(errors="replace"))}
    assert sites == {"python/fastcl/backend/registry.py"}


class _Extension:
    """A stand-in for fastcl._C whose build_info says what a test needs (a build with CUDA kernels)."""

    def __init__(self, **info):
        self.info = {"cuda_archs": "", "cuda_version": "", "cpu_capability": "AVX2", **info}

    def build_info(self):
        return dict(self.info)


@pytest.fixture
def cuda_build(monkeypatch):
    """fastcl._C built for sm_80 / sm_90a with CUDA 13.0, and a driver whose CUDA version the test
    sets: faked where the versions come from (build_info and torch's cuDriverGetVersion binding)."""
    monkeypatch.setattr(fastcl._ext, "_C", _Extension(cuda_archs="80,90a", cuda_version="13.0"))

    def driver(version: int):
        monkeypatch.setattr(torch._C, "_cuda_getDriverVersion", lambda: version, raising=False)
    return driver


def test_cuda_backend_refuses_a_driver_older_than_its_kernels_cuda(cuda_build):
    cuda_build(12040)  # a driver for CUDA 12.4 (R550), which a torch for CUDA 12 runs on
    [reason] = registry._extension_problems(cuda=True)
    assert reason.startswith("the NVIDIA driver supports CUDA 12.4, fastcl._C's CUDA kernels were built with "
                             "CUDA 13.0 (static runtime): update the driver to R580 or newer")
    assert "rebuild fastcl with the CUDA toolkit of your driver (CUDA 12.x)" in reason
    # and the declaration built from it is what dispatch and fastcl doctor report
    declared = dataclasses.replace(registry.CUDA, unusable=registry._extension_problems(cuda=True))
    try:
        registry.register(declared)
        assert reason in registry.not_supported_reasons("cuda", torch.device("cuda"), torch.float32)
    finally:
        registry.register(registry.CUDA)


@pytest.mark.parametrize("driver", [13000, 13020, 14000])
def test_cuda_backend_takes_a_driver_as_new_as_its_kernels_cuda(cuda_build, driver):
    cuda_build(driver)
    assert registry._extension_problems(cuda=True) == ()


def test_cuda_backend_takes_an_older_minor_of_its_kernels_cuda(monkeypatch, cuda_build):
    """CUDA's minor version compatibility: cubins built with 13.2 run under a driver for 13.0."""
    monkeypatch.setattr(fastcl._ext, "_C", _Extension(cuda_archs="80", cuda_version="13.2"))
    cuda_build(13000)
    assert registry._extension_problems(cuda=True) == ()


def test_no_driver_is_left_to_the_device_check(cuda_build, monkeypatch):
    from fastcl import _cuda_driver

    monkeypatch.setattr(_cuda_driver, "extension_cuda_versions", lambda info: (None, (13, 0)))
    assert registry._extension_problems(cuda=True) == ()


def test_auto_materialises_a_small_s_and_only_auto(declare, toy_kernels, monkeypatch):
    """Up to MATERIALISE_BELOW_PAIRS pairs "auto" takes the reference path (S materialised: cheaper
    than an engine's fixed cost there); above it the declared engines; an explicit backend always."""
    declare(name="toy", ops={"lse": Op(TOY_MODULE), "pointwise": Op("fastcl.backend.chunked.pointwise")})
    monkeypatch.setattr(registry, "MATERIALISE_BELOW_PAIRS", {"lse": 9 * 9})
    x, y = _features(9, 4, seed=1).requires_grad_(), _features(10, 4, seed=2)
    assert resolve("auto", x, op="lse", pairs=81) == "reference"
    assert resolve("auto", x, op="lse", pairs=82) == "toy"
    assert resolve("toy", x, op="lse", pairs=1) == "toy"
    assert resolve("auto", x, op="pointwise", pairs=1) == "toy"  # each op has its own threshold (none here)
    assert resolve("auto", x, op="lse") == "toy"  # a call that does not say its size
    want = fastcl.infonce_loss(x, y[:9], 0.5, backend="reference")
    for rows, kernels in ((9, []), (10, ["lse_forward"])):  # 9 x 9 pairs, and 9 x 10 with an extra negative
        toy_kernels.calls.clear()
        got = fastcl.infonce_loss(x, y[:9], 0.5, extra_negatives=y[9:] if rows == 10 else None)
        assert toy_kernels.calls == kernels
        if rows == 9:
            torch.testing.assert_close(got, want)
    toy_kernels.calls.clear()
    fastcl.infonce_loss(x, y[:9], 0.5, backend="toy")
    assert toy_kernels.calls == ["lse_forward"]


def test_auto_materialises_more_pairs_at_wider_features(declare, monkeypatch):
    """The limit is MATERIALISE_BELOW_PAIRS up to D = MATERIALISE_WIDTH and grows with D / 256 above
    it (the GEMM both paths share grows with D; the passes over S the engines save do not)."""
    declare(name="toy", ops={"lse": Op(TOY_MODULE)})
    monkeypatch.setattr(registry, "MATERIALISE_BELOW_PAIRS", {"lse": 100})
    for d, most in ((16, 100), (256, 100), (512, 200), (768, 300)):
        x = torch.zeros(2, d)
        assert resolve("auto", x, op="lse", pairs=most) == "reference", d
        assert resolve("auto", x, op="lse", pairs=most + 1) == "toy", d
        assert resolve("toy", x, op="lse", pairs=1) == "toy"
