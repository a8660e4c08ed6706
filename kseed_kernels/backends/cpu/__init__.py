"""Backend "cpu": the compiled C++ kernels (csrc/ops_cpu.cpp over csrc/cpu/), reached through the
torch.ops.kseed dispatcher ops.

The kernels pick a SIMD path at run time (AVX-512, AVX2, NEON or portable scalar code); every path writes
bitwise the same results.  ``set_isa("scalar" | "avx2" | "avx512" | "neon" | None)`` forces one for this
process (None: automatic); without it the environment variable KSEED_CPU_ISA (read at every call) may
name one.  The settings are ops too (torch.ops.kseed.cpu_isa, set_cpu_isa, ...).  Shapes for FakeTensor /
torch.compile come from the Meta implementations registered in csrc/registration.cpp.
"""
from __future__ import annotations

import torch

NAME = "cpu"
from .._compiled import apply, gaussian, noise_floor, project, rademacher  # noqa: F401  (the interface)
from .._compiled import ops as _ops


def set_isa(name=None) -> None:
    """Force the SIMD path of the CPU kernels ("scalar", "avx2", "avx512", "neon"), or None for automatic.

    ValueError if the name is unknown or this CPU cannot run that path.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"isa must be a str or None, got {type(name).__name__}")
    _ops().set_cpu_isa(name)


def isa() -> str:
    """The SIMD path the next CPU kernel call will use."""
    return _ops().cpu_isa()


def supported_isas() -> list:
    """The SIMD paths this CPU (and this build) can run, "scalar" always included."""
    return list(_ops().cpu_supported_isas())


def available() -> bool:
    try:
        _ops()
    except ImportError:
        return False
    return True


def serves(device: torch.device) -> bool:
    return device.type == "cpu"
