"""The backend registry: the one place that knows which backends exist and picks one.

Each backend is a package here (reference/, cpu/, triton/, cuda/) whose module has:
  NAME: str
  available() -> bool                      usable in this process
  serves(device: torch.device) -> bool     can work on tensors of this device
  gaussian(seed, numel, stream, offset, device) -> float32 tensor [numel]
  rademacher(seed, numel, stream, offset, device) -> float32 tensor [numel] of +-1
  apply(outs, streams, upd, bases=None) -> None
      outs[i] = round(bases[i] + sum_k upd.coefs[k] n(upd.seeds[k], streams[i], e)) for every tensor,
      in place on outs when bases is None; n is z or r by upd.noise.
  project(tensors, streams, seeds, noise) -> float32 tensor [K] on the tensors' device
      c_k = the float64 sum, in docs/SPEC.md section 9's order, of the block sums of every tensor for
      seed seeds[k] (an int64 CPU tensor of uint64 bit patterns, K >= 1), rounded to float32; noise is
      "gaussian" or "rademacher".  The tensors are contiguous, non-empty, on one device, only read.
Inputs reaching a backend are already validated by kseed_kernels.ops: tensors contiguous, float32 / bf16
/ fp16, all on one device the backend serves, non-empty, writable; each base the shape and dtype of its
out and no out overlapping a base or another out; streams uint32 ints; ``upd`` an Update with K >= 1.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from .._spec import NOISE_CODES, ROUNDING_CODES


@dataclass(frozen=True)
class Update:
    """What an apply call adds, the same for every tensor of the call.

    seeds: int64 CPU tensor [K] holding the uint64 bit patterns; coefs: finite float32 CPU tensor [K];
    rounding: "nearest" or "stochastic"; sr_key: the call's uint64 stochastic-rounding key (an int);
    noise: the noise family, "gaussian" or "rademacher" (docs/SPEC.md section 8).
    New per-call options of the update become fields here.
    """

    seeds: torch.Tensor
    coefs: torch.Tensor
    rounding: str
    sr_key: int
    noise: str = "gaussian"

    @property
    def K(self) -> int:
        return self.seeds.numel()

    @property
    def rounding_code(self) -> int:
        return ROUNDING_CODES[self.rounding]

    @property
    def noise_code(self) -> int:
        """The noise family as the compiled ops take it (csrc/kseed_types.h: enum Noise)."""
        return NOISE_CODES[self.noise]

# Order of preference per device type, fastest first (issue #3 refines the GPU choice per case).
_PREFERENCE = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}
_MODULES = {
    "reference": "kseed_kernels.backends.reference",
    "cpu": "kseed_kernels.backends.cpu",
    "triton": "kseed_kernels.backends.triton",
    "cuda": "kseed_kernels.backends.cuda",
}
_loaded: dict = {}


def known() -> tuple:
    return tuple(_MODULES)


def get(name: str):
    """The backend module called ``name``; ValueError naming the choices if unknown or unusable."""
    if not isinstance(name, str) or name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(_MODULES)}")
    mod = _loaded.get(name)
    if mod is None:
        try:
            mod = importlib.import_module(_MODULES[name])
        except ImportError as exc:  # a backend whose module is missing is simply not available
            raise ValueError(f"backend {name!r} is not available here: {exc}") from exc
        _loaded[name] = mod
    if not mod.available():
        raise ValueError(f"backend {name!r} is not available here; usable: {', '.join(usable())}")
    return mod


def usable() -> list:
    out = []
    for name, path in _MODULES.items():
        try:
            mod = _loaded.get(name) or importlib.import_module(path)
        except ImportError:
            continue
        _loaded[name] = mod
        if mod.available():
            out.append(name)
    return out


def pick(device: torch.device, name=None):
    """The backend to use for tensors on ``device``: ``name`` if given (checked), else the fastest."""
    device = torch.device(device)
    if name is not None:
        mod = get(name)
        if not mod.serves(device):
            raise ValueError(f"backend {name!r} cannot serve tensors on device {device}")
        return mod
    for cand in _PREFERENCE.get(device.type, ("reference",)):
        try:
            mod = get(cand)
        except ValueError:
            continue
        if mod.serves(device):
            return mod
    raise ValueError(f"no kseed backend can serve tensors on device {device}")
