"""Calls into the compiled dispatcher ops torch.ops.kseed, shared by the "cpu" and "cuda" backends.

The dispatcher routes each call to the CPU or the CUDA implementation by the tensors' device, so the two
backend modules differ only in which devices they serve and when they are available.
"""
from __future__ import annotations

import torch

from .._spec import NOISE_CODES


def ops():
    """torch.ops.kseed, after loading the extension that registers it (ImportError if not built)."""
    from .. import _C  # noqa: F401  (registers torch.ops.kseed)

    return torch.ops.kseed


def signed64(x: int) -> int:
    """A uint64 as the int64 with the same bits (how the schemas take 64-bit seeds and keys)."""
    return x - (1 << 64) if x >= (1 << 63) else x


def _noise(op: str, seed, numel, stream, offset, device):
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        getattr(ops(), op)(out, signed64(seed), stream, offset)
    return out


def gaussian(seed, numel, stream, offset, device):
    return _noise("gaussian_", seed, numel, stream, offset, device)


def rademacher(seed, numel, stream, offset, device):
    return _noise("rademacher_", seed, numel, stream, offset, device)


def apply(outs, streams, upd, bases=None):
    """One op call for the whole list: apply_seeds_[multi_] in place, apply_seeds_[multi_]out from bases."""
    k = ops()
    tail = (upd.seeds, upd.coefs)
    flags = (upd.rounding_code, signed64(upd.sr_key), upd.noise_code)
    if bases is None:
        if len(outs) == 1:
            k.apply_seeds_(outs[0], *tail, streams[0], *flags)
        else:
            k.apply_seeds_multi_(list(outs), list(streams), *tail, *flags)
    elif len(outs) == 1:
        k.apply_seeds_out(bases[0], outs[0], *tail, streams[0], *flags)
    else:
        k.apply_seeds_multi_out(list(bases), list(outs), list(streams), *tail, *flags)


def project(tensors, streams, seeds, noise):
    """One op call for the whole list (docs/SPEC.md section 9): float32 [K] on the tensors' device."""
    return ops().project_seeds(list(tensors), list(streams), seeds, NOISE_CODES[noise])


def noise_floor(n, seeds, coefs, stream, device, noise="gaussian"):
    """Benchmark helper: the generate-and-sum work of an apply of the ``noise`` family over n elements,
    one float per 2048."""
    like = torch.empty(0, device=device)
    return ops()._noise_floor(like, seeds, coefs.to(torch.float32), n, stream, NOISE_CODES[noise])
