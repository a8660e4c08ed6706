"""Backend "reference": the pure-PyTorch oracle (kseed_kernels.torch_reference) on any device."""
from __future__ import annotations

import torch

from ... import torch_reference as _ref
from ..._spec import MASK64

NAME = "reference"


def available() -> bool:
    return True


def serves(device: torch.device) -> bool:
    return device.type != "meta"  # any device with data


def gaussian(seed, numel, stream, offset, device):
    return _ref.gaussian(seed, numel, stream, offset, device)


def rademacher(seed, numel, stream, offset, device):
    return _ref.rademacher(seed, numel, stream, offset, device)


def apply(outs, streams, upd, bases=None):
    seeds = [s & MASK64 for s in upd.seeds.tolist()]
    for i, (out, st) in enumerate(zip(outs, streams)):
        _ref.apply_seeds_(out, seeds, upd.coefs, st, upd.rounding, upd.sr_key,
                          base=None if bases is None else bases[i], noise=upd.noise)


def project(tensors, streams, seeds, noise):
    return _ref.project_seeds_multi(tensors, streams, [s & MASK64 for s in seeds.tolist()], noise)
