"""Backend "cuda": the CUDA kernels of csrc/cuda/, registered as the CUDA implementations of the
torch.ops.kseed dispatcher ops (TORCH_LIBRARY_IMPL(kseed, CUDA)).

Seeds and coefficients are passed as the CPU tensors kseed_kernels.ops prepares; the C++ side packs them
with the tensor table into one pinned buffer and copies it to the device in one asynchronous copy.  One
apply launch per dtype serves a whole parameter list (apply_seeds_multi_), and the K-term sum stays in
float32 registers for any K (no chunking).
"""
from __future__ import annotations

import torch

NAME = "cuda"
_ROUNDING = {"nearest": 0, "stochastic": 1}


def _ops():
    from .. import _C  # noqa: F401  (registers torch.ops.kseed)

    return torch.ops.kseed


def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        _ops()
    except ImportError:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("kseed::apply_seeds_", "CUDA"))
    except RuntimeError:  # the op itself is not registered
        return False


def serves(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


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


def noise_floor(n, seeds, coefs, stream, device):
    """Benchmark helper: the generate-and-sum work of an apply over n elements, one float per CTA."""
    like = torch.empty(0, device=device)
    return _ops()._noise_floor(like, seeds, coefs.to(torch.float32), n, stream)
