"""Backend "cuda": the CUDA kernels of csrc/cuda/, registered as the CUDA implementations of the
torch.ops.kseed dispatcher ops (TORCH_LIBRARY_IMPL(kseed, CUDA)).

Seeds and coefficients are passed as the CPU tensors kseed_kernels.ops prepares; the C++ side packs them
with the tensor table into one pinned buffer and copies it to the device in one asynchronous copy.  One
apply launch per dtype serves a whole parameter list (apply_seeds_multi_, apply_seeds_multi), and the K-term sum stays in
float32 registers for any K (no chunking).
"""
from __future__ import annotations

import torch

NAME = "cuda"
from .._compiled import apply, gaussian, noise_floor, project, rademacher  # noqa: F401  (the interface)
from .._compiled import ops as _ops


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

