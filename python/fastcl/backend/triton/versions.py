"""Which Triton releases fastcl's kernels support, read without importing Triton.

Users run the Triton that their torch CUDA wheel pins, so the range is stated as torch releases:
the oldest is the Triton of torch 2.8, the newest the Triton of the newest torch CI installs. CI
compiles every launched kernel variant ahead of time for sm_80 and sm_90 and runs the interpreter
tests under the oldest, the newest and the GPU machine's Triton (``tools/check_triton.sh``); every
release of the range was compiled once (``bench/results/2026-12-04-triton-versions.txt``).

Why 3.4 is the oldest: Triton 3.3 and older start the GPU driver when ``@triton.autotune`` decorates
a kernel, so without a GPU their kernels cannot even be imported, let alone compiled ahead of time:
CI could not prove them. A Triton newer than the newest tested is allowed (``fastcl doctor`` says it
is untested).
"""
from __future__ import annotations

import functools
import importlib.metadata
import re

# torch minor -> the Triton its CUDA wheels pin (torch's setup / Requires-Dist of each release).
TORCH_PINS = {
    (2, 4): (3, 0), (2, 5): (3, 1), (2, 6): (3, 2), (2, 7): (3, 3), (2, 8): (3, 4), (2, 9): (3, 5),
    (2, 10): (3, 6), (2, 11): (3, 6), (2, 12): (3, 7), (2, 13): (3, 8), (2, 14): (3, 9),
}
OLDEST = (3, 4)  # torch 2.8's
NEWEST_TESTED = (3, 9)  # torch 2.14's
# The Triton of the GPU machine our checks run on (torch 2.11.0+cu130): tested in CI as well.
GPU_MACHINE = (3, 6)


def parse(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``3.6.0``, ``3.4.0+git1234`` or ``3.5.0rc1``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"not a Triton version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def _text(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def torch_for(triton: tuple[int, int]) -> str:
    """The torch releases that pin a Triton minor, for messages: ``torch 2.10/2.11``."""
    minors = [f"{t[0]}.{t[1]}" for t, tr in TORCH_PINS.items() if tr == triton]
    return "torch " + "/".join(minors) if minors else "no torch release"


@functools.cache
def installed() -> str | None:
    """The installed Triton's version string (``triton`` or the nightly ``pytorch-triton``), or None."""
    for dist in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def problems(version: str | None = None) -> list[str]:
    """Why the kernels cannot run with this Triton (default: the installed one); empty if they can."""
    version = installed() if version is None else version
    if version is None:
        return []  # "not installed" is the backend's own reason
    if parse(version) < OLDEST:
        return [f"Triton {version} is older than the oldest fastcl supports ({_text(OLDEST)}, which "
                f"{torch_for(OLDEST)} ships): upgrade torch, or pip install 'triton>={_text(OLDEST)}'"]
    return []


def untested(version: str | None = None) -> str | None:
    """A note if this Triton is newer than the newest CI tests (allowed, but unproven)."""
    version = installed() if version is None else version
    if version is not None and parse(version) > NEWEST_TESTED:
        return (f"Triton {version} is newer than the newest fastcl is tested with ({_text(NEWEST_TESTED)}): "
                "it should work; run `fastcl doctor` and report what fails")
    return None


def supported_range() -> str:
    return f"triton {_text(OLDEST)} ({torch_for(OLDEST)}) to {_text(NEWEST_TESTED)} ({torch_for(NEWEST_TESTED)})"



# What a supported Triton older than the newest cannot build, found by compiling every variant ahead
# of time under each release (python -m fastcl.backend.triton.aot) and by the interpreter tests. Each entry:
# the kernels it concerns (None: all), the dtype, the first Triton that can, whether the interpreter
# fails too (a language limit) or only the GPU code generator, and why. The launchers refuse such
# calls with the reason (``backend="auto"`` then picks another backend); aot.py reports them.
_LIMITS = [
    (None, "float64", (3, 5), True, "float64 tl.dot arrived in Triton 3.5 (3.4: 'Unsupported lhs dtype fp64')"),
    (("maxsim_dd",), "float64", (3, 9), False,
     "Triton < 3.9 cannot generate GPU code for the float64 MaxSim document-gradient scatter (a float64 dot "
     "with a register operand: 'fp64 don't support largeK MMA', or a failed pass)"),
]


class TritonLimit(str):
    """A reason that is a declared limit of the installed Triton (``_LIMITS``), not a fault: the
    tests skip a call refused for one, naming it."""


def triton_limits(kernel: str, dtype, *, compiled: bool = True, version: str | None = None) -> str | None:
    """Why ``kernel`` (an ``aot.KERNELS`` name; ``"engine"`` for what every kernel shares) cannot run
    on ``dtype`` (a torch dtype or its name) with this Triton (default: the installed one), compiled
    for a GPU or (``compiled=False``) under the interpreter; None if it can."""
    version = installed() if version is None else version
    if version is None:
        return None
    name = str(dtype).removeprefix("torch.")
    for kernels, limited, since, language, why in _LIMITS:
        if ((kernels is None or kernel in kernels) and name == limited and parse(version) < since
                and (compiled or language)):
            return TritonLimit(f"{why}; Triton {version} is installed: use Triton >= {_text(since)} or another "
                               "backend")
    return None
