"""IEEE subnormals whatever the process's flush-to-zero mode (docs/SPEC.md: subnormals are kept).

``torch.set_flush_denormal(True)`` puts the calling thread in flush-to-zero and denormals-are-zero mode
(x86 MXCSR.FTZ | DAZ; aarch64 FPCR.FZ): float32 results below 2^-126 become zero and such inputs read as
zero, in torch's CPU ops, numpy and Python's float -> float32 conversions alike.  The Python code that
computes the spec's floats on the CPU (the reference, the Triton interpreter, the rounding of the
coefficients to float32) runs inside ``ieee_subnormals()``.  The compiled CPU kernels clear the mode
themselves, in every thread that computes (csrc/cpu/kseed_cpu.h: IeeeSubnormals); GPUs do not read the
host's mode (the CUDA and Triton kernels are compiled without flush-to-zero).

torch has no getter for the mode, so it is read off the arithmetic of the calling thread: a product whose
exact result is subnormal (zero under FTZ) and a product of a subnormal input (zero under DAZ).
"""
from __future__ import annotations

import contextlib
import functools

import torch

_PROBE = None


def flushes_subnormals() -> bool:
    """Whether the calling thread flushes float32 subnormal results or inputs to zero."""
    global _PROBE
    if _PROBE is None:
        # [2^-126, 2^-140] * [2^-1, 2^20]: 2^-127 (a subnormal result) and 2^-120 (from a subnormal
        # input); the operands are made from their bits, which no mode changes.
        _PROBE = (torch.tensor([0x00800000, 1 << 9], dtype=torch.int32).view(torch.float32),
                  torch.tensor([0.5, 2.0 ** 20], dtype=torch.float32))
    r = _PROBE[0] * _PROBE[1]
    return not bool((r != 0).all())


@contextlib.contextmanager
def ieee_subnormals():
    """Run the block with subnormals kept on this thread, then put the thread's mode back.

    torch can only set flush-to-zero and denormals-are-zero together, so a thread that had only one of
    them gets both back."""
    flushing = flushes_subnormals()
    if flushing:
        torch.set_flush_denormal(False)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(True)


def ieee(fn):
    """Decorator: ``fn`` runs inside ieee_subnormals()."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with ieee_subnormals():
            return fn(*args, **kwargs)

    return wrapper
