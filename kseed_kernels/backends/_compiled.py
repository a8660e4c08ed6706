"""Calls into the compiled dispatcher ops torch.ops.kseed, shared by the "cpu" and "cuda" backends.

The dispatcher routes each call to the CPU or the CUDA implementation by the tensors' device, so the two
backend modules differ only in which devices they serve and when they are available.
"""
from __future__ import annotations

import torch

_ROUNDING = {"nearest": 0, "stochastic": 1}


def ops():
    """torch.ops.kseed, after loading the extension that registers it (ImportError if not built)."""
    from .. import _C  # noqa: F401  (registers torch.ops.kseed)

    return torch.ops.kseed


def signed64(x: int) -> int:
    """A uint64 as the int64 with the same bits (how the schemas take 64-bit seeds and keys)."""
    return x - (1 << 64) if x >= (1 << 63) else x


def gaussian(seed, numel, stream, offset, device):
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        ops().gaussian_(out, signed64(seed), stream, offset)
    return out


def apply_seeds_(tensor, seeds, coefs, stream, rounding, sr_key):
    ops().apply_seeds_(tensor, seeds, coefs, stream, _ROUNDING[rounding], signed64(sr_key))


def apply_seeds_multi_(tensors, streams, seeds, coefs, rounding, sr_key):
    ops().apply_seeds_multi_(list(tensors), list(streams), seeds, coefs, _ROUNDING[rounding],
                             signed64(sr_key))
