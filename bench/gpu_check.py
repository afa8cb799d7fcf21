"""bench/gpu_check.sh's Python side: python bench/gpu_check.py facts|collect|compile|estimate|summary ...

Kept beside the script, which runs it with the GPU machine's Python (see the script's header)."""
import argparse
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path.cwd()
CORES = 16  # the GPU machine's
# Seconds assumed where nothing here can measure them (each multiplied by SLACK like the rest):
SLACK = 1.25  # a measured or modelled time, times this: another CPU, a busier machine
PER_TEST_S = 0.12  # a GPU test at the sizes tests/ use: launches of microseconds, float64 references on the CPU
PYTEST_START_S = 10.0  # interpreter, torch, collection, the CUDA context and cuBLAS handles
CUDA_INIT_S = 5.0  # the env phase on the GPU machine: a CUDA context, nvidia-smi
# The extension's build: each translation unit's seconds, measured on a 2-core machine (ninja -j2,
# FASTCL_CUDA_ARCHS=90a, 2026-12: the whole build 142 s there); configure (cmake, torch_facts.py) and
# pip's own work; the link (static cudart). A unit not listed takes the slowest's time.
TU_S = {"csrc/module.cpp": 4.0, "csrc/ops.cpp": 22.0, "csrc/cpu/lse.cpp": 20.0, "csrc/cpu/lse_prefixes.cpp": 22.0,
        "csrc/cpu/lse_symmetric.cpp": 29.0,
        "csrc/cpu/pointwise.cpp": 29.0, "csrc/cpu/topk.cpp": 27.0, "csrc/cpu/maxsim.cpp": 26.0,
        "csrc/cuda/ops_cuda.cpp": 20.0, "csrc/cuda/*.cu": 6.5,
        # the prefix kernels (7 per input type, 16-bit epilogues unrolled over row parts), sm_90a alone
        "csrc/cuda/prefixes_f32.cu": 9.0, "csrc/cuda/prefixes_f16.cu": 32.0, "csrc/cuda/prefixes_bf16.cu": 33.0}
CONFIGURE_S, LINK_S, PIP_S = 10.0, 12.0, 8.0


def log(msg: str) -> None:
    print(msg, flush=True)


def write_json(path, obj) -> None:
    """Written beside and renamed over: a run killed meanwhile leaves the previous complete file."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(partial, path)


def update_json(path, **parts) -> dict:
    """plan.json grows phase by phase: each dry-run phase adds its part as soon as it has it."""
    path = Path(path)
    obj = {**(json.loads(path.read_text()) if path.exists() else {}), **parts}
    write_json(path, obj)
    return obj


def _run(cmd) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# --- facts ------------------------------------------------------------------------------------

def facts(out: str, shell: str) -> int:
    """What runs here -> info.json; ARCH (e.g. 90a) for the build -> a shell file."""
    start = time.perf_counter()
    info = {"git_sha": os.environ.get("FASTCL_GIT_SHA", ""), "python": sys.version.split()[0],
            "executable": sys.executable, "cores": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        info["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        info["triton"] = None
    nvcc = shutil.which("nvcc") or shutil.which(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                             "nvcc"))
    info["nvcc"] = next((line.split("release")[-1].strip(" ,") for line in _run([nvcc, "--version"]).splitlines()
                         if "release" in line), "?") if nvcc else None
    info["gcc"] = (_run(["gcc", "--version"]).splitlines() or [None])[0]
    info["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or None
    arch = ""
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                        multiprocessors=p.multi_processor_count)
            arch = f"{p.major}{p.minor}" + ("a" if p.major == 9 else "")
    except Exception as exc:  # noqa: BLE001 - a fact to report
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import fastcl

        info["fastcl_path"] = os.path.dirname(fastcl.__file__)
        info["fastcl"] = fastcl.info()
    except Exception as exc:  # noqa: BLE001 - a fact to report
        info["fastcl_error"] = f"{type(exc).__name__}: {exc}"
    info["seconds"] = round(time.perf_counter() - start, 2)
    write_json(out, info)
    Path(shell).write_text(f"ARCH={arch}\n")
    ext = (info.get("fastcl") or {}).get("extension") or {}
    log(f"python {info['python']} ({sys.executable}), {info['cores']} cores; torch {info.get('torch')} "
        f"(CUDA {info.get('torch_cuda')}), triton {info['triton']}, nvcc {info['nvcc']}, driver {info['driver']}")
    log(f"GPU: {info.get('gpu', 'none visible')}" + (f" (sm_{arch}, {info['gpu_memory_gib']} GiB)" if arch else ""))
    log(f"fastcl from {info.get('fastcl_path', '?')}: extension "
        + (f"cuda_archs={ext.get('cuda_archs')!r}" if ext else "not loaded")
        + "".join(f"; {dev}: {d['backends']} (auto {d['auto']})" for dev, d in
                  ((info.get("fastcl") or {}).get("devices") or {}).items())
        + (f"; {info['fastcl_error']}" if "fastcl_error" in info else ""))
    log(f"git {info['git_sha']}; wrote {out}")
    return 0


# --- collect (dry run) ------------------------------------------------------------------------

HIDDEN = '''import sys


class _Absent:
    names = {"pytorch_metric_learning", "hypothesis", "rich", "matplotlib", "open_clip", "inf_cl"}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by gpu_check.sh --dry-run)", name=name)
        return None


sys.meta_path.insert(0, _Absent())
'''


def _collect(args: list[str], hide: str) -> tuple[int, str]:
    """Node ids pytest collects, with the optional test dependencies hidden and no plugins loaded
    from the environment (as on a bare GPU image)."""
    env = {**os.environ, "PYTHONPATH": hide + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         capture_output=True, text=True, env=env)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    return (len(ids) if out.returncode == 0 else -1), out.stdout[-1500:] + out.stderr[-1500:]


def collect(out: str, triton: list[str], matrix: list[str], smoke: list[str], matrix_mark: str = "gpu") -> int:
    """How many tests each test phase runs; all of them must collect, every smoke id must exist."""
    counts, rc = {}, 0
    with tempfile.TemporaryDirectory() as hide:
        Path(hide, "sitecustomize.py").write_text(HIDDEN)
        for name, files, args in (("triton", triton, ["-m", "gpu", *triton]), ("smoke", smoke, smoke),
                                  ("matrix", matrix, ["-m", matrix_mark, *matrix])):
            n, text = _collect(args, hide) if files else (0, "")
            counts[name] = n
            if n < 0 or (name == "smoke" and n != len(smoke)):
                log(f"collect {name}: FAILED ({n} of {len(smoke) if name == 'smoke' else 'some'} tests):\n{text}")
                rc = 1
            else:
                mark = matrix_mark if name == "matrix" else "gpu"
                log(f"collect {name}: {n} tests"
                    + (f" (-m '{mark}' {' '.join(files)})" if name != "smoke" else " (ids)"))
    update_json(out, git_sha=os.environ.get("FASTCL_GIT_SHA", ""), tests=counts)
    return rc


# --- compile (dry run) ------------------------------------------------------------------------

def _width(case) -> int:
    import torch

    first = case.inputs(torch.float64, requires_grad=False)[0][0]
    return (first[0] if isinstance(first, (list, tuple)) else first).shape[-1]


def _widths() -> set[int]:
    """The feature widths the GPU tests launch Triton with: every case's, every kernel test shape's."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_cuda
    import test_triton
    from cases import CASES

    return {_width(c) for c in CASES} | {d for *_, d in test_triton.SHAPES + test_cuda.SHAPES}


def bench_estimate(bench: list[str]) -> dict:
    """bench/gpu.py's own estimate of its run, and the widths and dtype it launches."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), *bench, "--estimate"], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench/gpu.py {' '.join(bench)} --estimate failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def _serial_seconds(variants, samples: int = 8) -> tuple[float, int]:
    """Mean seconds of a cold compile in one process (how a test session meets them: one after
    another, the first paying Triton's own start), over a spread sample of the variants. The pool's
    wall time says less: its workers' start-up, and as many workers as variants on a large machine."""
    from fastcl.backend.triton import aot

    sample = variants[::max(1, len(variants) // samples)][:samples]
    if not sample:
        return 0.0, 0
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # not the pool's: every compile here is cold
        start = time.perf_counter()
        for v in sample:
            aot.compile_variant(v)
        return (time.perf_counter() - start) / len(sample), len(sample)


def _launchers(variants) -> tuple[int, float]:
    """(C launchers Triton compiles at first launch, seconds gcc takes for one), (0, 0) when this
    Triton has none. Triton 3.6 generates a C launcher per kernel signature (make_launcher in
    triton/backends/nvidia/driver.py; compile_module_from_src builds it with gcc, once, into Triton's
    cache) and one more module for the driver itself; 3.9 launches every kernel through one function
    compiled into Triton. The count is exact: Triton's own make_launcher, on each variant's signature."""
    from triton.backends.nvidia import driver

    from fastcl.backend.triton import aot

    if not hasattr(driver, "make_launcher"):
        return 0, 0.0
    sources = set()
    for v in variants:
        try:
            src = aot._source(v)[0]
            constants = {(src.fn.arg_names.index(k),) if isinstance(k, str) else k: c
                         for k, c in src.constants.items()}
            sources.add(driver.make_launcher(constants, dict(src.signature), None))
        except Exception:  # noqa: BLE001 - a private API: count one launcher per kernel instead
            sources.add(v.kernel)
    text = next((s for s in sources if len(s) > 200), None)
    seconds = 2.0  # what one took on a GPU machine, when gcc cannot be timed here
    if text is not None and shutil.which("gcc"):
        import sysconfig

        with tempfile.TemporaryDirectory() as tmp:
            c = Path(tmp, "launcher.c")
            c.write_text(text)
            inc = [Path(driver.__file__).parent / "include", sysconfig.get_paths()["include"]]
            start = time.perf_counter()
            cmd = ["gcc", str(c), "-O3", "-shared", "-fPIC", "-Wno-psabi", "-o", str(c.with_suffix(".so"))]
            rc = subprocess.run([*cmd, *[f"-I{i}" for i in inc]], capture_output=True).returncode
            if rc == 0:
                seconds = time.perf_counter() - start
    return len(sources) + 1, seconds  # + 1: the driver's own cuda_utils module


def compile_variants(out: str, bench: list[str], smoke_cases: list[str]) -> int:
    """Every variant the GPU tests and the bench launch, compiled for sm_90 under this Triton."""
    import torch
    import triton

    from fastcl.backend.triton import aot

    sys.path.insert(0, str(ROOT / "tests"))
    from cases import CASES

    b = bench_estimate(bench)
    bench_dims, bench_dtype = sorted({r["d"] for r in b["per_row"]}), getattr(torch, b["dtype"])
    dims = sorted(_widths() | set(bench_dims))
    variants = aot.launch_variants(dims, arch=90)
    smoke_dims = sorted(_width(c) for c in CASES if c.id in smoke_cases)
    # What the smoke and bench phases compile if the triton phase left Triton's cache cold.
    smoke_variants = aot.launch_variants(smoke_dims, arch=90, dtypes=(torch.float32, torch.bfloat16))
    bench_variants = aot.launch_variants(bench_dims, arch=90, dtypes=(bench_dtype,))
    jobs = min(os.cpu_count() or 1, len(variants))
    log(f"compile: {len(variants)} Triton variants for sm_90 (aot.launch_variants of feature widths {dims}), "
        f"triton {triton.__version__}, {jobs} processes")
    # Triton's compiler can print pages of IR before it aborts: keep them out of the log. A fresh
    # cache (the workers inherit the variable): cold compiles, as on a bare GPU machine.
    err = tempfile.TemporaryFile(mode="w+")
    saved = os.dup(2)
    os.dup2(err.fileno(), 2)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        start = time.perf_counter()
        try:
            results = aot.compile_all(variants, jobs)
        finally:
            os.dup2(saved, 2)
        wall = time.perf_counter() - start
    errors = [(v, r) for v, r in zip(variants, results) if "error" in r]
    unsupported = [(v, r) for v, r in zip(variants, results) if "unsupported" in r]
    reasons = {}
    for v, r in unsupported:
        reasons.setdefault(r["unsupported"], []).append(f"{v.kernel} {v.dtype} {v.label}")
    for why, which in reasons.items():
        log(f"  unsupported by this Triton (the launchers refuse them, saying so): {len(which)} variants "
            f"({', '.join(which[:3])}{', ...' if len(which) > 3 else ''}): {why[:200]}")
    for v, r in zip(variants, results):
        bad = [] if "error" in r or "unsupported" in r else aot.problems(v, r)
        if bad:
            log(f"  compiled, but: {v.kernel} {v.dtype} {v.label}: {'; '.join(bad)[:160]}")
    for v, r in errors:
        log(f"  FAILED: {v.kernel} {v.dtype} {v.label}: {r['error'][:200]}")
    if errors:
        err.seek(0)
        log("  Triton's stderr, last lines:\n" + "\n".join(line[:200] for line in err.read().splitlines()[-8:]))
    per_variant, sample = _serial_seconds([v for v, r in zip(variants, results) if "error" not in r
                                           and "unsupported" not in r])
    launchers, launcher_s = _launchers(variants)
    compiled = len(variants) - len(errors) - len(unsupported)
    log(f"compile: {compiled} compiled, {len(unsupported)} unsupported, {len(errors)} failed, in {wall:.0f} s on "
        f"{jobs} processes; one after another, as a test session compiles them: {per_variant:.2f} s each "
        f"({sample} of them timed in one process); "
        + (f"{launchers} C launchers, {launcher_s:.2f} s of gcc each (triton {triton.__version__} compiles them at "
           f"first launch)" if launchers else f"no C launchers to compile (triton {triton.__version__})"))
    update_json(out, compile={
        "triton": triton.__version__, "arch": 90, "dims": dims, "variants": len(variants), "compiled": compiled,
        "unsupported": len(unsupported), "failed": len(errors), "wall_s": wall, "jobs": jobs,
        "per_variant_s": per_variant, "timed_serially": sample, "launchers": launchers, "launcher_s": launcher_s,
        "smoke_variants": len(smoke_variants), "bench_variants": len(bench_variants),
        "errors": [f"{v.kernel} {v.dtype} {v.label}: {r['error'][:200]}" for v, r in errors]})
    return 1 if errors else 0


# --- estimate (dry run) -----------------------------------------------------------------------

def _units() -> list[str]:
    """The build's translation units, from CMakeLists.txt's source lists."""
    text = (ROOT / "CMakeLists.txt").read_text()
    return sorted(set(re.findall(r"\b(csrc/[\w/]+\.(?:cpp|cu))\b", text)))


def _makespan(seconds: list[float], workers: int) -> float:
    """Longest-first onto the least loaded worker: ninja's schedule, near enough."""
    load = [0.0] * max(1, workers)
    for s in sorted(seconds, reverse=True):
        load[load.index(min(load))] += s
    return max(load)


def build_seconds() -> tuple[float, str]:
    units = _units()
    slowest = max(TU_S.values())
    times = [TU_S.get(u, TU_S["csrc/cuda/*.cu"] if u.endswith(".cu") else slowest) for u in units]
    # The triton phase's pytest holds one core meanwhile.
    compile_s = _makespan(times, CORES - 1)
    total = CONFIGURE_S + compile_s + LINK_S + PIP_S
    return total, (f"{len(units)} units on {CORES - 1} cores: {compile_s:.0f} s, + configure {CONFIGURE_S:.0f}, link "
                   f"{LINK_S:.0f}, pip {PIP_S:.0f}")


def estimate(out: str, env_s: float, limits: list[str], total: int, bench: list[str]) -> int:
    """Each phase's time on the GPU machine against its limit, from what the phases before found."""
    limit = {k: int(v) for k, v in (item.split("=") for item in limits)}
    plan = json.loads(Path(out).read_text()) if Path(out).exists() else {}
    if "tests" not in plan or "compile" not in plan:
        log(f"estimate: FAILED: {out} lacks the collect and compile phases' results")
        return 1
    counts, comp = plan["tests"], plan["compile"]
    per, launch = comp["per_variant_s"], comp["launchers"] * comp["launcher_s"]
    built = comp["variants"] - comp["unsupported"]  # the launchers refuse the others before compiling
    cold = built * per + launch
    b = bench_estimate(bench)
    build_s, build_note = build_seconds()
    phases = {
        "env": (env_s + CUDA_INIT_S, f"measured here {env_s:.0f} s + CUDA init {CUDA_INIT_S:.0f}"),
        "build": (build_s, build_note),
        "triton": (PYTEST_START_S + counts["triton"] * PER_TEST_S + cold,
                   f"{counts['triton']} tests x {PER_TEST_S} s + every variant cold: {built} x {per:.2f} s"
                   + (f" + {comp['launchers']} C launchers x {comp['launcher_s']:.2f} s" if comp["launchers"] else "")
                   + f" + start {PYTEST_START_S:.0f}"),
        "info": (env_s + CUDA_INIT_S, "as env"),
        "smoke": (PYTEST_START_S + counts["smoke"] * PER_TEST_S + comp["smoke_variants"] * per + launch,
                  f"{counts['smoke']} tests; if the triton phase left Triton's cache cold: {comp['smoke_variants']} "
                  f"variants"),
        "bench": (b["seconds"] + comp["bench_variants"] * per + launch,
                  f"{b['rows']} rows by the model: {b['seconds']:.0f} s; + {comp['bench_variants']} variants if cold"),
        "matrix": (PYTEST_START_S + counts["matrix"] * PER_TEST_S,
                   f"{counts['matrix']} tests x {PER_TEST_S} s + start (Triton's cache warm from the triton phase)"),
    }
    rows, rc = {}, 0
    log(f"estimate for a {CORES}-core GPU machine, triton {comp['triton']} (x {SLACK} slack):")
    for name, (seconds, how) in phases.items():
        s = seconds * SLACK
        fits = s <= limit[name]
        rc |= not fits
        rows[name] = {"estimate_s": round(s, 1), "limit_s": limit[name], "fits": fits, "how": how}
        log(f"  {name:<7}{s:6.0f} s of {limit[name]:4d} s  {'ok  ' if fits else 'OVER'}  {how}")
    wall = (rows["env"]["estimate_s"] + max(rows["build"]["estimate_s"], rows["triton"]["estimate_s"])
            + sum(rows[k]["estimate_s"] for k in ("info", "smoke", "bench", "matrix")))
    allowed = limit["env"] + max(limit["build"], limit["triton"]) + sum(limit[k] for k in ("info", "smoke", "bench",
                                                                                           "matrix"))
    log(f"  whole run: about {wall:.0f} s; limits allow {allowed} s of {total} s (build beside triton)")
    rc |= allowed > total
    update_json(out, estimate={"triton": comp["triton"], "cores": CORES, "slack": SLACK, "per_test_s": PER_TEST_S,
                               "phases": rows, "wall_s": round(wall, 1), "limits_s": allowed, "total_s": total,
                               "bench": b})
    log(f"wrote {out}")
    return int(rc)


# --- summary --------------------------------------------------------------------------------

def summary(folder: str, phases: list[str]) -> int:
    folder = Path(folder)
    log(f"=== gpu_check summary (git {os.environ.get('FASTCL_GIT_SHA', '?')}; files in {folder})")
    bench = folder / "bench.json"
    if bench.exists():
        sys.path.insert(0, str(ROOT / "bench"))
        try:
            import gpu

            gpu.table(json.loads(bench.read_text()))
        except Exception as exc:  # noqa: BLE001 - the summary goes on
            log(f"bench.json: unreadable ({type(exc).__name__}: {exc})")
    for xml in sorted(folder.glob("junit-*.xml"), key=lambda p: p.stat().st_mtime):  # in phase order
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as exc:
            log(f"{xml.name}: unreadable ({exc})")
            continue
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        log(f"{xml.name}: {n} tests, {n - f - e - s} passed, {f} failed, {e} errors, {s} skipped, "
            f"{float(suite.get('time', 0)):.0f} s")
        bad = [(c, c.find("failure") if c.find("failure") is not None else c.find("error"))
               for c in suite.iter("testcase")]
        bad = [(c, x) for c, x in bad if x is not None]
        for c, x in bad[:5]:
            log(f"  {x.tag.upper()} {c.get('classname', '').split('.')[-1]}::{c.get('name')}: "
                f"{(x.get('message') or '').splitlines()[0][:140] if x.get('message') else ''}")
        if len(bad) > 5:
            log(f"  ... {len(bad) - 5} more in {xml.name}")
    for line in phases:
        log(f"gpu_check: {line}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("facts")
    f.add_argument("out")
    f.add_argument("shell")
    c = sub.add_parser("collect")
    c.add_argument("out")
    c.add_argument("--triton", nargs="*", default=[])
    c.add_argument("--matrix", nargs="*", default=[])
    c.add_argument("--matrix-mark", default="gpu", help="the matrix phase's pytest -m expression")
    c.add_argument("--smoke", nargs="*", default=[])
    k = sub.add_parser("compile")
    k.add_argument("out")
    k.add_argument("--smoke-cases", nargs="*", default=[])
    k.add_argument("--bench", nargs=argparse.REMAINDER, default=[])
    e = sub.add_parser("estimate")
    e.add_argument("out")
    e.add_argument("--env-s", type=float, required=True, help="the env phase's seconds here")
    e.add_argument("--limits", nargs="+", required=True)
    e.add_argument("--total", type=int, required=True)
    e.add_argument("--bench", nargs=argparse.REMAINDER, default=[])
    s = sub.add_parser("summary")
    s.add_argument("folder")
    s.add_argument("phases", nargs="*")
    a = p.parse_args(argv)
    if a.cmd == "facts":
        return facts(a.out, a.shell)
    if a.cmd == "collect":
        return collect(a.out, a.triton, a.matrix, a.smoke, a.matrix_mark)
    if a.cmd == "compile":
        return compile_variants(a.out, a.bench, a.smoke_cases)
    if a.cmd == "estimate":
        return estimate(a.out, a.env_s, a.limits, a.total, a.bench)
    return summary(a.folder, a.phases)


if __name__ == "__main__":
    sys.exit(main())
