"""Backend "reference": the pure-PyTorch oracle (kseed_kernels.reference) on any device."""
from __future__ import annotations

import torch

from .. import reference as _ref
from .._spec import MASK64

NAME = "reference"


def available() -> bool:
    return True


def serves(device: torch.device) -> bool:
    return device.type != "meta"  # any device with data


def _seed_list(seeds: torch.Tensor):
    return [s & MASK64 for s in seeds.tolist()]


def gaussian(seed, numel, stream, offset, device):
    return _ref.gaussian(seed, numel, stream, offset, device)


def apply_seeds_(tensor, seeds, coefs, stream, rounding, sr_key):
    _ref.apply_seeds_(tensor, _seed_list(seeds), coefs, stream, rounding, sr_key)


def apply_seeds_multi_(tensors, streams, seeds, coefs, rounding, sr_key):
    _ref.apply_seeds_multi_(tensors, streams, _seed_list(seeds), coefs, rounding, sr_key)
