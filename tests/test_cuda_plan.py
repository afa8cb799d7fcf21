"""The cuda engine's host-side arithmetic, on CPU (runs in CI, no GPU): csrc/cuda/params.h and
csrc/cuda/plan.h against their Python mirror (fastcl/backend/cuda/plan.py, what the performance model
reads), compiled with the host compiler; the workspace and work of the block shape against the
hazards csrc/cuda/DESIGN.md names; and CPU emulations of float16 G's rounding policy at the shapes
where unscaled rounding loses it and of the 3xTF32 split on infinite inputs.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastcl.backend.cuda import plan as cp
from fastcl.backend.triton import plan as triton_plan
from fastcl.benchmark import model
from tolerances import assert_close, tol

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "cuda"
CXX = shutil.which("c++") or shutil.which("g++")


def test_params_h_constants_equal_the_python_mirror():
    text = (KERNELS / "params.h").read_text()
    found = dict(re.findall(r"constexpr\s+(?:int|int64_t)\s+k(\w+)\s*=\s*(\d+);", text))
    names = {"BlockA": cp.BLOCK_A, "BlockB": cp.BLOCK_B, "BlockK": cp.BLOCK_K, "Warps16": cp.WARPS16,
             "Warps32": cp.WARPS32,
             "BlockQuantum": cp.BLOCK_QUANTUM, "TargetCtas": cp.TARGET_CTAS, "MaxSplits": cp.MAX_SPLITS,
             "GradScaleLog2": cp.GRAD_SCALE_LOG2, "DefaultWorkspaceMb": cp.DEFAULT_WORKSPACE_MB,
             "MaxPrefixes": cp.MAX_PREFIXES}
    assert set(found) == set(names), f"params.h constants {sorted(found)} vs the mirror's {sorted(names)}"
    assert {k: int(v) for k, v in found.items()} == names
    # the shared rule: same default budget and block quantum as the Triton engine
    assert cp.DEFAULT_WORKSPACE_MB == triton_plan.DEFAULT_WORKSPACE_MB and cp.BLOCK_QUANTUM == triton_plan.QUANTUM


TILE_DRIVER = r"""
#include <cstdio>
#include <cuda_runtime.h>  // the host shim: __device__ and friends
#include "tile.cuh"
using namespace fastcl::cuda;
template <typename T> void show(const char* name) {
  std::printf("%s %d %zu\n", name, Warps<T>::kThreads, Smem<T>::kTileBytes);
}
int main() { show<float>("float32"); show<__half>("float16"); show<__nv_bfloat16>("bfloat16"); }
"""


def _run_on_the_host(tmp_path, name: str, driver: str) -> str:
    """Compile ``driver`` (C++ including csrc/cuda headers) for the host through the host execution's
    shim headers, run it, return its stdout."""
    if CXX is None:
        pytest.skip("no host C++ compiler (c++ / g++) on PATH")
    (tmp_path / f"{name}.cpp").write_text(driver)
    built = subprocess.run([CXX, "-std=c++20", "-O0", "-DFASTCL_HOST_EXEC", f"-I{KERNELS / 'host' / 'include'}",
                            f"-I{KERNELS}", str(tmp_path / f"{name}.cpp"), "-o", str(tmp_path / name)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    return subprocess.run([str(tmp_path / name)], capture_output=True, text=True, check=True).stdout


def test_tile_kernels_launch_what_the_mirror_says(tmp_path):
    """Threads per CTA and dynamic shared memory per launch, from tile.cuh itself (compiled for the
    host through the host execution's shim headers), equal the mirror's: the model's occupancy."""
    out = _run_on_the_host(tmp_path, "tile", TILE_DRIVER)
    got = {name: (int(threads), int(smem)) for name, threads, smem in (line.split() for line in out.splitlines())}
    assert got == {str(d).removeprefix("torch."): (cp.threads(d), cp.smem_bytes(d))
                   for d in (torch.float32, torch.float16, torch.bfloat16)}


PREFIX_DRIVER = r"""
#include <cstdio>
#include <cuda_runtime.h>  // the host shim
#include "prefixes.cuh"
using namespace fastcl::cuda;
template <typename T> void show(const char* name) {
  for (int k = 1; k <= kMaxPrefixes; ++k) std::printf("%s %d %zu\n", name, k, PrefixSmem<T>::forward_bytes(k));
}
int main() { show<float>("float32"); show<__half>("float16"); show<__nv_bfloat16>("bfloat16"); }
"""


def test_prefix_forward_shared_memory_is_the_mirrors(tmp_path):
    """Op lse_prefixes' forward launches with PrefixSmem::forward_bytes(K) of dynamic shared memory
    (prefixes.cuh, compiled for the host): the tile stages plus 3 KiB a prefix, what the model's
    occupancy of that kernel takes (cp.prefix_forward_smem_bytes), for K = 1 .. MAX_PREFIXES."""
    out = _run_on_the_host(tmp_path, "prefix", PREFIX_DRIVER)
    got = {(name, int(k)): int(smem) for name, k, smem in (line.split() for line in out.splitlines())}
    want = {(str(d).removeprefix("torch."), k): cp.prefix_forward_smem_bytes(d, k)
            for d in (torch.float32, torch.float16, torch.bfloat16) for k in range(1, cp.MAX_PREFIXES + 1)}
    assert got == want
    assert cp.prefix_forward_smem_bytes(torch.bfloat16, 2) - cp.prefix_forward_smem_bytes(torch.bfloat16, 1) == 3072


DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include "plan.h"
using namespace fastcl::cuda::plan;
static void two(long long a, long long b) { std::printf("%lld %lld\n", a, b); }
int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    const char* rest = std::strchr(line.c_str(), ' ');
    rest = rest ? rest + 1 : "";
    long long a = 0, b = 0, c = 0, d = 0, e = 0;
    std::sscanf(rest, "%lld %lld %lld %lld %lld", &a, &b, &c, &d, &e);
    const std::string op = line.substr(0, line.find(' '));
    if (op == "budget_null") std::printf("%lld\n", (long long)workspace_budget(nullptr));
    else if (op == "budget") std::printf("%lld\n", (long long)workspace_budget(rest));
    else if (op == "scale") std::printf("%d\n", grad_scale_exponent(std::strtof(rest, nullptr)));
    else if (op == "blocks") { Block k = blocks(a, b, c); two(k.rows, k.cols); }
    else if (op == "fwd") { Block k = forward_block(a, b, c); two(k.rows, k.cols); }
    else if (op == "grad") { Block k = gradient_block(a, b, c, d); two(k.rows, k.cols); }
    else if (op == "split") { Split k = split_b(a, b); two(k.per, k.count); }
    else if (op == "align") std::printf("%lld\n", (long long)aligned_features(a, b));
    else if (op == "fws") std::printf("%zu\n", forward_layout(a, b, c != 0, d != 0, e, nullptr).bytes);
    else if (op == "fwdk") { Block k = forward_block(a, b, c, prefix_group(d)); two(k.rows, k.cols); }
    else if (op == "gradk") { Block k = gradient_block(a, b, c, d, prefix_group(e)); two(k.rows, k.cols); }
    else if (op == "fwsk") {  // m n budget prefixes: rows and columns
      std::printf("%zu\n", forward_layout(a, b, true, true, c, nullptr, d).bytes);
    } else if (op == "ends") {  // elem dims...: the prefixes' ends in the kernels' copy
      long long dims[16];
      int k = 0;
      const char* at = std::strchr(rest, ' ');
      while (at && k < 16 && std::sscanf(at, " %lld", &dims[k]) == 1) { ++k; at = std::strchr(at + 1, ' '); }
      int64_t in[16], out[16];
      for (int q = 0; q < k; ++q) in[q] = dims[q];
      prefix_ends(in, k, a, out);
      for (int q = 0; q < k; ++q) std::printf(q ? " %lld" : "%lld", (long long)out[q]);
      std::printf("\n");
    }
    else std::printf("?\n");
  }
}
"""


@pytest.fixture(scope="module")
def plan_h(tmp_path_factory):
    """Run queries through csrc/cuda/plan.h compiled for the host: list of lines -> list of answers."""
    if CXX is None:
        pytest.skip("no host C++ compiler (c++ / g++) on PATH")
    out = tmp_path_factory.mktemp("plan_h")
    (out / "driver.cpp").write_text(DRIVER)
    built = subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{KERNELS}",
                            str(out / "driver.cpp"), "-o", str(out / "driver")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr

    def ask(lines):
        run = subprocess.run([str(out / "driver")], input="\n".join(lines) + "\n", capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout.splitlines()
    return ask


def _pair(rc):
    return f"{rc[0]} {rc[1]}"


SIZES = [0, 1, 63, 64, 65, 127, 128, 129, 1000, 4096, 11520, 11521, 65536, 100_003, 1 << 20]
BUDGETS = [1, 1 << 16, 5 << 20, 256 << 20, 3 << 30]


def test_block_rule_is_the_triton_rule_in_both_languages(plan_h):
    queries, want = [], []
    for m in SIZES:
        for n in SIZES[::3]:
            for elements in (1, 5000, 1 << 20, 1 << 27):
                queries.append(f"blocks {m} {n} {elements}")
                want.append(_pair(triton_plan.blocks(m, n, elements, cp.BLOCK_QUANTUM)))
            for budget in BUDGETS:
                queries.append(f"fwd {m} {n} {budget}")
                want.append(_pair(cp.forward_block(m, n, budget)))
                for dtype in (torch.float32, torch.bfloat16):
                    queries.append(f"grad {m} {n} {cp.element_bytes(dtype)} {budget}")
                    want.append(_pair(cp.gradient_block(m, n, dtype, budget)))
    assert plan_h(queries) == want


def test_split_alignment_and_forward_workspace_match(plan_h):
    queries, want = [], []
    for ctas in (0, 1, 2, 7, 100, 264, 1000):
        for tiles in (0, 1, 3, 31, 32, 33, 512, 16384):
            queries.append(f"split {ctas} {tiles}")
            want.append(_pair(cp.split_b(ctas, tiles)))
    for d in (0, 1, 5, 7, 8, 9, 100, 1023, 1024):
        for elem in (2, 4):
            queries.append(f"align {d} {elem}")
            want.append(str(cp.aligned_features(d, elem)))
    for m in SIZES[::2]:
        for n in SIZES[1::2]:
            for rows, cols in ((1, 1), (1, 0), (0, 1)):
                for budget in (1 << 16, 256 << 20):
                    queries.append(f"fws {m} {n} {rows} {cols} {budget}")
                    want.append(str(cp.forward_workspace_bytes(m, n, bool(rows), bool(cols), budget)))
    assert plan_h(queries) == want


def test_prefix_blocks_workspace_and_segment_layout_match(plan_h):
    """Op lse_prefixes: the block rules with the budget divided by a launch's prefixes (groups of
    MAX_PREFIXES beyond), the forward workspace with K running states, and the kernels' segment layout."""
    queries, want = [], []
    for m in SIZES[::2]:
        for n in SIZES[1::3]:
            for k in (1, 2, 5, 8, 13):
                for budget in (1 << 16, 5 << 20, 256 << 20):
                    queries.append(f"fwdk {m} {n} {budget} {k}")
                    want.append(_pair(cp.forward_block(m, n, budget, cp.prefix_group(k))))
                    queries.append(f"gradk {m} {n} 2 {budget} {k}")
                    want.append(_pair(cp.gradient_block(m, n, torch.float16, budget, cp.prefix_group(k))))
                    queries.append(f"fwsk {m} {n} {budget} {k}")
                    want.append(str(cp.forward_workspace_bytes(m, n, True, True, budget, k)))
    for dims in ((1,), (8, 24, 40), (7, 33, 64), (16, 32, 64), (3, 5, 16, 17, 40), (64, 128, 256, 512, 768)):
        for elem in (2, 4):
            queries.append(f"ends {elem} {' '.join(map(str, dims))}")
            want.append(" ".join(map(str, cp.prefix_ends(dims, elem))))
    assert plan_h(queries) == want
    assert cp.prefix_ends((7, 33, 64), 2) == [8, 40, 72] and cp.prefix_ends((16, 32, 64), 2) == [16, 32, 64]
    # one prefix: the plain op's rules
    assert cp.forward_block(4096, 4096, 5 << 20, 1) == cp.forward_block(4096, 4096, 5 << 20)


def test_workspace_env_rule_matches_the_triton_engine(plan_h, monkeypatch):
    texts = ["256", " 0.5 ", "1e3", "2048.25", "0", "-3", "abc", "nan", "inf", "12x"]
    got = plan_h(["budget_null"] + [f"budget {t}" for t in texts])
    assert int(got[0]) == triton_plan.DEFAULT_WORKSPACE_MB << 20
    for text, answer in zip(texts, got[1:]):
        monkeypatch.setenv(triton_plan.WORKSPACE_ENV, text)
        try:
            want = triton_plan.workspace_budget()
        except ValueError:
            want = -1
        assert int(answer) == want, text


def test_grad_scale_exponent_matches(plan_h):
    values = [0.0, -1.0, float("inf"), float("nan"), 1.0, 0.5, 0.75, 2.0 ** -20, 3e-7, 1 / 8192, 1e-38, 1e-45,
              6e4, 3.4e38, 1.2e-7 + 2.0 ** -23]
    values = [float(torch.tensor(v, dtype=torch.float32)) for v in values]  # what the kernel's float holds
    got = plan_h([f"scale {v.hex() if math.isfinite(v) else v}" for v in values])
    assert [int(g) for g in got] == [cp.grad_scale_exponent(v) for v in values]
    for v in values:
        if v > 0 and math.isfinite(v):
            k, top = cp.grad_scale_exponent(v), 2.0 ** cp.GRAD_SCALE_LOG2
            assert v * 2.0 ** k <= top and (k == 126 or v * 2.0 ** (k + 1) > top)


# --- workspace and work, as numbers the host code and the model compute -----------------------

N_1M = 1 << 20


def test_forward_workspace_is_linear_not_quadratic():
    """Column partials per row tile, cdiv(N, 64) x N floats x 2, would be N^2 / 8 bytes (128 GiB at
    1M); the running statistics are linear."""
    budget = 256 << 20
    at_1m = cp.forward_workspace_bytes(N_1M, N_1M, True, True, budget)
    assert at_1m < 1 << 30, at_1m
    per_tile = 2 * 4 * cdiv64(N_1M) * N_1M
    assert per_tile == N_1M ** 2 // 8 and at_1m < per_tile / 500
    # beyond the budget, growing N adds O(N): 16 bytes per row and column of running state
    grow = cp.forward_workspace_bytes(2 * N_1M, 2 * N_1M, True, True, budget) - at_1m
    assert grow <= 2 * 2 * 2 * 4 * N_1M + 4096


def cdiv64(n):
    return -(-n // 64)


@pytest.mark.parametrize("d", [128, 1024, 2048, 4096])
def test_model_counts_the_floor(d):
    """Recomputing S per 128-wide slice of D would cost 19 GEMM-equivalents at D = 1024; the block
    backward forms each S tile once: 4 for CLIP, 3 for SigLIP/MW."""
    clip = model.predict("clip", 65536, d, "bfloat16", "cuda")
    siglip = model.predict("siglip", 65536, d, "bfloat16", "cuda")
    assert 4.0 <= clip["gemm_equivalents"] <= 4.05, clip["gemm_equivalents"]
    assert 3.0 <= siglip["gemm_equivalents"] <= 3.05, siglip["gemm_equivalents"]


@pytest.mark.parametrize("loss,limit", [("clip", 4.2), ("siglip", 3.2), ("mw", 3.2)])
def test_acceptance_at_one_million(loss, limit):
    p = model.predict(loss, N_1M, 1024, "bfloat16", "cuda", budget=256 << 20)
    assert p["gemm_equivalents"] <= limit and p["workspace_bytes"] < 1 << 30, p


def test_model_cli_prints_cuda_json(capsys):
    assert model.main(["--loss", "clip", "--n", "1048576", "--d", "1024", "--dtype", "bfloat16", "--backend",
                       "cuda", "--json", "--workspace-mb", "256"]) == 0
    out = capsys.readouterr().out
    assert '"backend": "cuda"' in out


# --- float16 G, emulated on CPU with the policy the host code uses ------------------------------

def _mean_clip_gradient_rows(n, d, scale, rows, seed=0):
    """Exact (float64) G of a mean bidirectional CLIP loss for `rows` of S, unit-norm features:
    G_ij = (softmax_row_ij + softmax_col_ij) / (2 N); plus y (for G @ y) and the upstream gradients."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    col_lse = torch.full((n,), float("-inf"), dtype=torch.float64)
    for start in range(0, n, 1024):  # column log-sum-exp over all rows, 1024 rows at a time
        col_lse = torch.logaddexp(col_lse, (scale * x[start:start + 1024] @ y.T).logsumexp(0))
    s = scale * x[rows] @ y.T
    g = 1.0 / (2 * n)
    grad = g * (s - s.logsumexp(1, keepdim=True)).exp() + g * (s - col_lse[None, :]).exp()
    return grad, y, torch.full((n,), g), torch.full((n,), g)


def _stored(grad, g_row, g_col, exponent=None):
    """G as the backward stores it for float16 inputs: times 2^k (k from plan.h's rule unless given),
    rounded to float16; returned decoded (divided by 2^k again) in float64."""
    k = cp.grad_scale_exponent(float(g_row.abs().max() + g_col.abs().max())) if exponent is None else exponent
    assert cp.g_dtype(torch.float16) == torch.float16
    return (grad * 2.0 ** k).to(torch.float16).double() / 2.0 ** k


@pytest.mark.parametrize("n", [4096, 8192])
def test_float16_gradient_tile_keeps_tiny_values(n):
    """At N = 4096 / 8192, D = 512, scale 14.3, G ~ 1 / N^2 sits at or below float16's smallest
    subnormal: rounded unscaled, 22% / 92% of it flushes to zero. The scaled policy
    must keep every entry and G @ y to float16's relative precision."""
    rows = torch.arange(0, n, n // 64)
    grad, y, g_row, g_col = _mean_clip_gradient_rows(n, 512, 14.3, rows)
    exact = grad @ y
    unscaled = _stored(grad, g_row, g_col, exponent=0)
    flushed = (unscaled == 0).double().mean().item()
    assert flushed > 0.15, f"the emulation should reproduce the unscaled underflow, got {flushed:.2%}"
    new = _stored(grad, g_row, g_col)
    assert (new == 0).sum().item() == 0
    rel = ((new - grad).abs() / grad).max().item()
    assert rel <= 2.0 ** -11, rel
    assert_close(new @ y, exact, tol("emulated float16 G"), "G @ y")


# --- +-inf through the 3xTF32 split, emulated on CPU ------------------------------------------

def _tf32(x: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero (inf stays inf)."""
    bits = x.float().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _three_tf32(x: torch.Tensor, y: torch.Tensor, gated: bool) -> torch.Tensor:
    """x @ y.T as mma.cuh computes it in float32: a = big + small per operand; big * big, and the
    corrections small * big + big * small added (only where big * big is finite, when gated)."""
    xb, yb = _tf32(x), _tf32(y)
    xs, ys = _tf32(x - xb), _tf32(y - yb)
    main = xb.double() @ yb.double().T
    corr = xs.double() @ yb.double().T + xb.double() @ ys.double().T
    if not gated:
        return main + corr
    return torch.where(torch.isfinite(main), main + corr, main)


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_input_through_three_tf32(value):
    """An ungated split makes every pair of an infinite row NaN (small = inf - inf); gated, S is what
    float32 math gives: +-inf by the sign of the partner's feature, finite rows accurate to ~2^-21."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 16, generator=gen), torch.randn(9, 16, generator=gen)
    x[2, 5] = value
    want = x.double() @ y.double().T
    ungated = _three_tf32(x, y, gated=False)
    assert torch.isnan(ungated[2]).all()
    new = _three_tf32(x, y, gated=True)
    assert torch.equal(new[2], want[2])  # +-inf, signs included
    rows = torch.arange(6) != 2
    assert_close(new[rows], want[rows], tol("emulated 3xtf32"), "finite rows")


def _fill(ctas, b_tiles, per, count):
    """How full the forward's waves are: ideal tile visits over what the waves take."""
    return ctas * b_tiles / (cp.TARGET_CTAS * cp.cdiv(ctas * count, cp.TARGET_CTAS) * per)


def test_split_fills_the_last_wave():
    """Issue 23 P3: 362 row tiles of N = 65536's first block ran 2 waves 69% full (one split); two
    splits run 3 waves 91% full. The rule takes the fewest splits with waves at least 90% full,
    else the fullest."""
    assert cp.forward_block(65536, 65536, cp.DEFAULT_WORKSPACE_MB << 20) == (46336, 46336)
    assert cp.split_b(362, 362) == (181, 2) and _fill(362, 362, 181, 2) > 0.9 > _fill(362, 362, 362, 1)
    for ctas in (1, 7, 100, 150, 264, 300, 362, 527, 1000, 5000):
        for b_tiles in (1, 5, 31, 150, 362, 512):
            per, count = cp.split_b(ctas, b_tiles)
            options = {(cp.cdiv(b_tiles, s), cp.cdiv(b_tiles, cp.cdiv(b_tiles, s)))
                       for s in range(1, min(b_tiles, cp.MAX_SPLITS) + 1)}
            fills = {o: _fill(ctas, b_tiles, *o) for o in options}
            good = [o for o in fills if fills[o] >= 0.9]
            if good:
                assert fills[(per, count)] >= 0.9 and count == min(o[1] for o in good), (ctas, b_tiles)
            else:
                assert fills[(per, count)] == pytest.approx(max(fills.values())), (ctas, b_tiles)
