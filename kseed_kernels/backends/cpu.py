"""Backend "cpu": the compiled C++ kernels (csrc/), reached through the torch.ops.kseed dispatcher ops."""
from __future__ import annotations

import torch

NAME = "cpu"
_ROUNDING = {"nearest": 0, "stochastic": 1}


def _ops():
    from .. import _C  # noqa: F401  (registers torch.ops.kseed)

    return torch.ops.kseed


def available() -> bool:
    try:
        _ops()
    except ImportError:
        return False
    return True


def serves(device: torch.device) -> bool:
    return device.type == "cpu"


def _signed64(x: int) -> int:
    return x - (1 << 64) if x >= (1 << 63) else x


def gaussian(seed, numel, stream, offset, device):
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        _ops().gaussian_(out, _signed64(seed), stream, offset)
    return out


def apply_seeds_(tensor, seeds, coefs, stream, rounding, sr_key):
    _ops().apply_seeds_(tensor, seeds, coefs, stream, _ROUNDING[rounding], _signed64(sr_key))


def apply_seeds_multi_(tensors, streams, seeds, coefs, rounding, sr_key):
    _ops().apply_seeds_multi_(list(tensors), list(streams), seeds, coefs, _ROUNDING[rounding],
                              _signed64(sr_key))
