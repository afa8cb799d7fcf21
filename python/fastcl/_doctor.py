"""``fastcl doctor``: what to run first on a new machine, a GPU one above all.

Each check returns ``Finding``s (what was looked at, ``ok`` / ``note`` / ``problem``, what was found,
the fix); ``format_text`` prints them, ``--json`` dumps them. The checks, in order:

    versions    fastcl, torch (and the CUDA runtime it was built with), Python
    extension   fastcl._C's build_info, or why it did not load; the torch it was compiled against
    triton      the installed version (read from metadata, Triton is not imported) vs the supported range
    cuda        the GPUs; the driver's CUDA version vs torch's runtime and fastcl._C's toolkit;
                fastcl._C's cubins vs each GPU's compute capability
    backends    per device, each declared backend usable (its dtypes and ops) or why not
                (``backend.not_supported_reasons``)
    probes      per device, each usable backend: CLIP (op ``lse``) and SigLIP (op ``pointwise``), those it
                declares, forward + backward on odd shapes against ``reference`` in float64 on the CPU
                (float32 inputs where a backend takes no float64)

The exit status is 1 when any finding is a problem, else 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from . import _cuda_driver, _ext
from . import backend as backends
from ._cuda_driver import dotted as _dotted
from ._cuda_driver import driver_cuda_version
from ._cuda_driver import version as _version
from ._info import __version__
from .backend.triton import versions as triton_versions
from .losses import clip_loss, siglip_loss

OK, NOTE, PROBLEM = "ok", "note", "problem"


@dataclass
class Finding:
    section: str  # the check it comes from: "versions", "triton", "backends on cuda", ...
    subject: str  # what was looked at: "torch", "driver vs torch", "triton", ...
    status: str   # OK, NOTE (worth knowing, nothing to fix) or PROBLEM
    detail: str   # what was found, in words
    fix: str = ""
    data: dict = field(default_factory=dict)  # the values behind it, for --json and tests


# --- versions and the extension -------------------------------------------------------------------

def version_findings() -> list[Finding]:
    hip = getattr(torch.version, "hip", None)
    runtime = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {hip}" if hip else "CPU build"
    return [
        Finding("versions", "fastcl", OK, __version__, data={"version": __version__}),
        Finding("versions", "torch", OK, f"{torch.__version__} ({runtime})",
                data={"version": torch.__version__, "cuda": torch.version.cuda}),
        Finding("versions", "python", OK, f"{sys.version.split()[0]} on {platform.platform()}",
                data={"version": sys.version.split()[0], "platform": platform.platform()}),
    ]


def _extension_info() -> dict | None:
    """fastcl._C's build_info without the long ATen parallel report; None if it did not load."""
    if _ext._C is None:
        return None
    return {k: v for k, v in _ext._C.build_info().items() if k != "parallel"}


def cuda_archs(info: dict | None) -> list[str]:
    """The architectures fastcl._C has cubins for ("80", "90a"); empty without CUDA kernels."""
    return [a for a in re.split(r"[;, ]+", (info or {}).get("cuda_archs", "")) if a]


def extension_findings() -> list[Finding]:
    info = _extension_info()
    if info is None:
        return [Finding("extension", "fastcl._C", PROBLEM, f"did not load: {_ext.ERROR}",
                        fix="the cpu and cuda backends need it: reinstall fastcl against this torch "
                            "(pip install --no-build-isolation ., README 'Installing against your torch')")]
    archs = cuda_archs(info)
    cuda = f"CUDA kernels for {', '.join('sm_' + a for a in archs)}" if archs else "no CUDA kernels"
    found = [Finding("extension", "fastcl._C", OK,
                     f"built against torch {info['torch_version']}; CPU kernels for {info['cpu_capability']}"
                     f"{' with OpenMP' if info.get('openmp') else ''}; {cuda}", data=info)]
    built, running = _version(info["torch_version"]), _version(torch.__version__)
    if built != running:
        found.append(Finding(
            "extension", "fastcl._C vs torch", PROBLEM,
            f"compiled against torch {info['torch_version']}, running with torch {torch.__version__}: "
            "libtorch's C++ ABI changes between minor releases",
            fix=f"reinstall fastcl against this torch (pip install --no-build-isolation .), "
                f"or install torch=={info['torch_version']}"))
    return found


# --- triton ---------------------------------------------------------------------------------------

def triton_findings() -> list[Finding]:
    version = triton_versions.installed()
    data = {"version": version, "supported": triton_versions.supported_range()}
    if version is None:
        return [Finding("triton", "triton", NOTE, "not installed: the triton backend cannot run",
                        fix="pip install triton (torch's CUDA wheels install the Triton they were built with)",
                        data=data)]
    problems = triton_versions.problems(version)
    if problems:
        return [Finding("triton", "triton", PROBLEM, "; ".join(problems), data=data)]
    untested = triton_versions.untested(version)
    if untested:
        return [Finding("triton", "triton", NOTE, untested, data=data)]
    return [Finding("triton", "triton", OK, f"{version}, in the supported range ({data['supported']})", data=data)]


# --- cuda: GPUs, driver, architectures ------------------------------------------------------------

def driver_findings(driver: tuple[int, int] | None, needs: dict[str, tuple[int, int]]) -> list[Finding]:
    """The driver's CUDA version against each CUDA runtime that must run on it (label -> version)."""
    if driver is None:
        return [Finding("cuda", "driver", NOTE, "no NVIDIA driver found (libcuda does not load): no GPU use",
                        fix="install the NVIDIA driver if this machine has a GPU")]
    found = []
    for label, need in needs.items():
        data = {"driver_cuda": _dotted(driver), "needs": _dotted(need)}
        verdict = _cuda_driver.supports(driver, need)
        if verdict == _cuda_driver.SUPPORTED:
            found.append(Finding("cuda", f"driver vs {label}", OK,
                                 f"the driver supports CUDA {_dotted(driver)}, {label} needs >= {_dotted(need)}",
                                 data=data))
        elif verdict == _cuda_driver.MINOR_COMPATIBLE:
            found.append(Finding(
                "cuda", f"driver vs {label}", NOTE,
                f"the driver supports CUDA {_dotted(driver)}, {label} is {_dotted(need)}: runs under CUDA's "
                "minor version compatibility (cubins only, no JIT of newer PTX)",
                fix=f"if a probe below fails, update the driver to one for CUDA >= {_dotted(need)}", data=data))
        else:
            other = ("or install a torch built for CUDA {}.x (its cuXYZ index on pytorch.org), then reinstall fastcl"
                     if label == "torch" else "or rebuild fastcl with the nvcc of CUDA {}.x")
            found.append(Finding(
                "cuda", f"driver vs {label}", PROBLEM,
                f"the driver supports CUDA {_dotted(driver)}, {label} needs >= {_dotted(need)}",
                fix=f"update the NVIDIA driver to {_cuda_driver.driver_for(need[0])}, " + other.format(driver[0]),
                data=data))
    return found


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether a cubin for ``arch`` ("80", "90a", "120-real") runs on a GPU of ``capability``: fastcl
    embeds cubins only, which run within their major version on equal or newer minors; the
    architecture-specific ones ("90a") only on their own."""
    match = re.match(r"(\d+)([af]?)", arch)
    if match is None:
        return False
    number, suffix = int(match.group(1)), match.group(2)
    built = (number // 10, number % 10)
    if suffix == "a":
        return built == capability
    return built[0] == capability[0] and built[1] <= capability[1]


def arch_findings(gpu: str, capability: tuple[int, int], archs: list[str]) -> list[Finding]:
    """fastcl._C's cubins against one GPU (nothing to say without CUDA kernels)."""
    if not archs:
        return []
    sm = f"sm_{capability[0]}{capability[1]}"
    listed = ", ".join("sm_" + a for a in archs)
    if any(arch_runs_on(a, capability) for a in archs):
        return [Finding("cuda", f"fastcl._C on {gpu}", OK, f"{sm} runs the cubins for {listed}")]
    return [Finding("cuda", f"fastcl._C on {gpu}", PROBLEM,
                    f"fastcl._C has cubins for {listed} only, none runs on {sm}: the cuda backend fails here",
                    fix=f'rebuild with FASTCL_CUDA_ARCHS including "{capability[0]}{capability[1]}" '
                        "(README 'Building with CUDA'), or use backend='triton'")]


def _cuda_available() -> bool:
    with warnings.catch_warnings():  # a too-old driver warns here; driver_findings says it better
        warnings.simplefilter("ignore")
        return torch.cuda.is_available()


def gpu_findings(archs: list[str]) -> list[Finding]:
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        capability = (props.major, props.minor)
        gib = props.total_memory / 2**30
        found.append(Finding("cuda", f"cuda:{index}", OK, f"{props.name}, sm_{props.major}{props.minor}, {gib:.0f} GiB",
                             data={"name": props.name, "capability": list(capability), "memory_gib": round(gib, 1)}))
        found += arch_findings(f"cuda:{index}", capability, archs)
    return found


def cuda_findings() -> list[Finding]:
    runtime = _version(torch.version.cuda)
    driver = driver_cuda_version()
    if runtime is None:
        if driver is not None:
            return [Finding("cuda", "torch", NOTE,
                            f"an NVIDIA driver (CUDA {_dotted(driver)}) is installed but torch {torch.__version__} "
                            "has no CUDA: fastcl runs on the CPU only",
                            fix="install a CUDA build of torch (pytorch.org), then reinstall fastcl against it")]
        return [Finding("cuda", "torch", NOTE, f"torch {torch.__version__} has no CUDA and no NVIDIA driver was "
                        "found: CPU backends only")]
    info = _extension_info()
    archs = cuda_archs(info)
    needs = {"torch": runtime}
    toolkit = _version((info or {}).get("cuda_version"))  # absent from builds that do not record it
    if archs and toolkit is not None:
        needs["fastcl._C"] = toolkit
    found = driver_findings(driver, needs)
    if archs and toolkit is None:
        found.append(Finding("cuda", "driver vs fastcl._C", NOTE,
                             "fastcl._C links cudart statically and does not record its CUDA version: the driver "
                             "must support the CUDA of the nvcc that built it (a failing cuda probe says it does not)"))
    if driver is None:
        return found
    if not _cuda_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        hint += ": the driver above is why" if problems(found) else ""
        return found + [Finding("cuda", "gpu", NOTE, f"torch has CUDA {torch.version.cuda} but sees no GPU{hint}")]
    return found + gpu_findings(archs)


# --- backends and probes --------------------------------------------------------------------------

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def devices() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if _cuda_available() else [])


def backend_findings(device: torch.device) -> list[Finding]:
    found = []
    for name in backends.names():
        usable = [d for d in DTYPES if not backends.not_supported_reasons(name, device, d)]
        if usable:
            dtypes = ", ".join(str(d).removeprefix("torch.") for d in usable)
            ops = ", ".join(backends.registry.spec(name).ops)
            found.append(Finding(f"backends on {device.type}", name, OK, f"usable ({dtypes}); ops {ops}"))
        else:
            why = backends.not_supported_reasons(name, device, torch.float32)
            found.append(Finding(f"backends on {device.type}", name, NOTE, "not usable: " + "; ".join(why),
                                 data={"reasons": why}))
    return found


PROBE_ROWS, PROBE_DIM = 37, 24  # odd sizes: ragged tiles in every backend
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}  # relative error in norm vs float64
PROBE_LOSSES = {  # loss -> (the op it runs on, the call)
    "clip": ("lse", lambda x, y, scale, bias, backend: clip_loss(x, y, scale, backend=backend)),
    "siglip": ("pointwise", lambda x, y, scale, bias, backend: siglip_loss(x, y, scale, bias, backend=backend)),
}


def _probe_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    """x, y (unit rows), logit scale and bias, rounded to ``dtype``, on the CPU."""
    gen = torch.Generator().manual_seed(20)
    x, y = (torch.nn.functional.normalize(torch.randn(PROBE_ROWS, PROBE_DIM, generator=gen, dtype=torch.float64), dim=1)
            for _ in range(2))
    return [t.to(dtype) for t in (x, y, torch.tensor(10.0), torch.tensor(-5.0))]


def _loss_and_grads(loss: str, inputs: list[torch.Tensor], backend: str, device: torch.device,
                    dtype: torch.dtype) -> list[torch.Tensor | None]:
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in inputs]
    out = PROBE_LOSSES[loss][1](*leaves, backend)
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return [t if t is None else t.detach().double().cpu() for t in (out, *grads)]


def _relative_error(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    if got is None or want is None:
        return 0.0 if got is want else float("inf")
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return ((got - want).norm() / want.norm().clamp(min=1.0)).item()


def probe(backend: str, device: torch.device) -> Finding:
    """CLIP and SigLIP (those whose op ``backend`` declares), forward + backward, on ``backend`` vs
    ``reference`` in float64 on the CPU: the loss and the gradients of x, y, the scale (and SigLIP's bias)."""
    dtype = torch.float64 if not backends.not_supported_reasons(backend, device, torch.float64) else torch.float32
    tol, dtype_name = TOLERANCE[dtype], str(dtype).removeprefix("torch.")
    section, subject = f"probes on {device.type}", backend
    start = time.perf_counter()
    losses = [loss for loss, (op, _) in PROBE_LOSSES.items() if backends.registry.provides(backend, op)]
    worst, where = 0.0, f"{losses[0]} loss" if losses else "-"
    try:
        for loss in losses:
            inputs = _probe_inputs(dtype)
            got = _loss_and_grads(loss, inputs, backend, device, dtype)
            want = _loss_and_grads(loss, inputs, "reference", torch.device("cpu"), torch.float64)
            for what, g, w in zip(("loss", "dx", "dy", "dscale", "dbias"), got, want):
                err = _relative_error(g, w)
                if err > worst:
                    worst, where = err, f"{loss} {what}"
    except Exception as err:  # whatever a backend raises is the finding
        message = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        return Finding(section, subject, PROBLEM, f"{' + '.join(losses)} in {dtype_name} raised {message}",
                       fix=_PROBE_FIX.format(backend=backend, device=device.type),
                       data={"dtype": dtype_name, "error": message})
    seconds = time.perf_counter() - start
    data = {"dtype": dtype_name, "max_relative_error": worst, "where": where, "tolerance": tol,
            "seconds": round(seconds, 3)}
    detail = (f"{' + '.join(losses)} forward/backward in {dtype_name}: max relative error {worst:.1e} ({where}), "
              f"tolerance {tol:.0e}, {seconds:.2f} s")
    if worst <= tol:
        return Finding(section, subject, OK, detail, data=data)
    return Finding(section, subject, PROBLEM, "WRONG RESULTS: " + detail,
                   fix=_PROBE_FIX.format(backend=backend, device=device.type), data=data)


_PROBE_FIX = ("do not use backend={backend!r} on {device} here; report it with this output "
              "(python -m fastcl doctor --json) at the fastcl issue tracker")


def probe_findings(device: torch.device) -> list[Finding]:
    import torch._dynamo  # noqa: F401  (torch imports it on a custom op's first call: not the first probe's time)

    return [probe(name, device) for name in backends.names()
            if name != "reference" and not backends.not_supported_reasons(name, device, torch.float32)]


# --- all checks, the report, the command ----------------------------------------------------------

def run_checks(probes: bool = True) -> list[Finding]:
    found = version_findings() + extension_findings() + triton_findings() + cuda_findings()
    for device in devices():
        found += backend_findings(device)
    if probes:
        for device in devices():
            found += probe_findings(device)
    return found


def problems(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.status == PROBLEM]


def exit_status(findings: list[Finding]) -> int:
    return 1 if problems(findings) else 0


def format_text(findings: list[Finding]) -> str:
    lines, section = [f"fastcl doctor (fastcl {__version__})"], None
    for f in findings:
        if f.section != section:
            section = f.section
            lines += ["", section]
        head = f"  {f.status.upper() if f.status == PROBLEM else f.status:<8} {f.subject:<20} "
        lines.append(textwrap.fill(f.detail, 110, initial_indent=head, subsequent_indent=" " * len(head)))
        if f.fix:
            lines.append(textwrap.fill(f.fix, 110, initial_indent=" " * (len(head) - 5) + "fix: ",
                                       subsequent_indent=" " * len(head)))
    bad = problems(findings)
    lines.append("")
    if bad:
        lines.append(f"{len(bad)} problem{'s' if len(bad) > 1 else ''} found: "
                     + "; ".join(f"{f.section}: {f.subject}" for f in bad))
    else:
        lines.append("No problems found.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastcl doctor",
        description="Check this installation: versions, Triton, CUDA driver and GPUs, which backends can run "
                    "and a correctness probe of each against reference. Exit status 1 if a problem was found.")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument("--no-probe", action="store_true", help="skip the correctness probes")
    args = parser.parse_args(argv)
    findings = run_checks(probes=not args.no_probe)
    if args.json:
        print(json.dumps({"problems": len(problems(findings)), "findings": [asdict(f) for f in findings]},
                         indent=2, default=str))
    else:
        print(format_text(findings))
    return exit_status(findings)
