"""The NVIDIA driver's CUDA version, and whether it runs a given CUDA runtime: one rule, read by
``fastcl doctor`` (the driver against torch's runtime and fastcl._C's toolkit) and by the ``cuda``
backend's declaration (it refuses to run on a driver too old for its kernels).

Why the ``cuda`` backend needs this: fastcl._C links the CUDA runtime of the nvcc that built it
statically (CMakeLists.txt), so the driver must support that CUDA version, whatever torch's own
runtime is. A torch for CUDA 12 runs under a driver for CUDA 12 (R550-R570), and a fastcl._C built
with CUDA 13 on that machine would fail at its first launch with "CUDA driver version is
insufficient for CUDA runtime version".
"""
from __future__ import annotations

import ctypes
import re

import torch

# The oldest Linux driver of each CUDA major version (CUDA's release notes); within a major, an
# older driver runs newer minor releases' cubins (minor version compatibility).
MIN_LINUX_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}

# What ``supports`` answers.
SUPPORTED, MINOR_COMPATIBLE, TOO_OLD = "supported", "minor-compatible", "too-old"


def version(text) -> tuple[int, int] | None:
    """(major, minor) of "13.0", "2.11.0+cu130" or a CUDA integer such as 12080; None if absent."""
    if isinstance(text, int):
        return (text // 1000, text % 1000 // 10) if text > 0 else None
    match = re.match(r"(\d+)\.(\d+)", str(text or ""))
    return (int(match.group(1)), int(match.group(2))) if match else None


def dotted(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA the installed NVIDIA driver supports (cuDriverGetVersion); None without a
    driver. Asks torch first (CUDA builds have ``torch._C._cuda_getDriverVersion``), then libcuda.
    Neither starts a CUDA context."""
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get is not None:
        try:
            found = version(int(get()))
        except Exception:  # a private API: any failure means "ask libcuda"
            found = None
        if found is not None:
            return found
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            libcuda = ctypes.CDLL(name)
            raw = ctypes.c_int(0)
            if libcuda.cuDriverGetVersion(ctypes.byref(raw)) == 0:
                return version(raw.value)
        except (OSError, AttributeError):
            continue
    return None


def supports(driver: tuple[int, int], runtime: tuple[int, int]) -> str:
    """Whether a driver for CUDA ``driver`` runs code built with the CUDA ``runtime``: SUPPORTED,
    MINOR_COMPATIBLE (same major, older minor: cubins run, newer PTX cannot be compiled) or
    TOO_OLD (an older major: the runtime refuses to start)."""
    if driver >= runtime:
        return SUPPORTED
    return MINOR_COMPATIBLE if driver[0] == runtime[0] else TOO_OLD


def driver_for(major: int) -> str:
    """The driver to install for CUDA ``major``, in words: "R580 or newer (Linux >= 580.65.06)"."""
    minimum = MIN_LINUX_DRIVER.get(major)
    if minimum is None:
        return f"a driver for CUDA {major} or newer"
    return f"R{minimum.split('.')[0]} or newer (Linux >= {minimum})"


def extension_cuda_versions(build_info: dict) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(the driver's CUDA version, the CUDA version fastcl._C's kernels were built with) for a
    build_info; either is None when unknown (no driver; a build without CUDA or not recording it).
    The driver is asked only when the build has CUDA kernels."""
    built = version(build_info.get("cuda_version")) if build_info.get("cuda_archs") else None
    return (driver_cuda_version() if built is not None else None), built


def extension_problem(driver: tuple[int, int] | None, built: tuple[int, int] | None) -> str | None:
    """Why fastcl._C's CUDA kernels cannot run under this driver, or None (they can, or either
    version is unknown: no driver means no GPU, which the backend's device check already says)."""
    if driver is None or built is None or supports(driver, built) != TOO_OLD:
        return None
    return (f"the NVIDIA driver supports CUDA {dotted(driver)}, fastcl._C's CUDA kernels were built with "
            f"CUDA {dotted(built)} (static runtime): update the driver to {driver_for(built[0])}, or rebuild "
            f"fastcl with the CUDA toolkit of your driver (CUDA {driver[0]}.x)")
