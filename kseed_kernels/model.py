"""ModelSeeds: seed-based perturbations and updates of a whole model's trainable parameters.

A ``ModelSeeds`` fixes, once, the list of trainable tensors of a model (``requires_grad=True`` only; a
tensor shared by several names, e.g. tied input/output embeddings, is listed once under its first name)
and each tensor's stream id ``stream_id(name)``.  Every operation is then one call of
``apply_seeds_multi_`` over that list:

* ``perturb(seed, scale)``: w <- w + scale * z(seed)  (z: the object's noise family, Gaussian by
  default or Rademacher with ``noise="rademacher"``)
* ``apply(seeds, coefs)``: w <- w + sum_k coefs[k] * z(seeds[k]) in one fused pass (catching up)
* ``apply_from(bases, seeds, coefs)``: w <- bases + sum_k coefs[k] * z(seeds[k]), the bases read-only
  (rebuilding a global model from a pristine w0 that may live on another device, e.g. a host memory
  map while the model is on a GPU)
* ``zo_step(seed, loss_fn, eps=, lr=, next_seed=)``: one two-point zeroth-order (SPSA) step in two passes
  over the weights instead of MeZO's four: +eps (skipped when the previous step already applied it),
  L+, -2 eps, L-, then ONE pass that restores and updates (coefficient eps - lr g) and, when
  ``next_seed`` is given, also applies the next step's +eps perturbation.

The noise of a tensor depends only on (seed, stream id of its name, element index): two processes that
list the same names rebuild bitwise the same weights, on any backend.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from .ops import (_check_noise, _check_no_overlap, _check_rounding, _check_seed, apply_seeds_multi,
                  apply_seeds_multi_, normalize_coefs, normalize_seeds, stream_id)

_F32_MAX = float(np.finfo(np.float32).max)


class ZOStepResult(NamedTuple):
    """Outcome of one zeroth-order step: the projected gradient g, the two losses, and whether the
    update was skipped (g not finite: the weights were only restored)."""

    g: float
    loss_plus: float
    loss_minus: float
    skipped: bool


def _as_float(x, what: str) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{what} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        return float(x.detach().float().item())
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{what} must be a real number or a 1-element tensor, got "
                        f"{type(x).__name__}")
    return float(x)


def _positive_finite(name: str, x) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r}")
    x = float(x)
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {x}")
    return x


def _view_key(t: torch.Tensor):
    """Two tensors with one key are the same weights (tied parameters listed under two names)."""
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


class ModelSeeds:
    """The trainable parameters of a model with their stream ids, and seed-based updates on them.

    Parameters
    ----------
    model_or_named_params:
        a ``torch.nn.Module`` (its parameters with ``requires_grad=True``), or an iterable of
        ``(name, tensor)`` pairs (an ``nn.Parameter`` with ``requires_grad=False`` is skipped; plain
        tensors are taken as given).
    backend:
        a kseed_kernels backend name, or None for the default choice per device.
    rounding:
        "nearest" (default) or "stochastic" (bf16 / fp16 weights).
    noise:
        the direction family of every update this object makes: "gaussian" (default, z ~ N(0, I))
        or "rademacher" (r in {-1, +1}, docs/SPEC.md); fixed for the object's whole life, so a +eps
        applied by one call is removed along the same direction by the next.
    """

    def __init__(self, model_or_named_params, *, backend: Optional[str] = None,
                 rounding: str = "nearest", noise: str = "gaussian"):
        self.rounding = _check_rounding(rounding)
        self.noise = _check_noise(noise)
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
        self.backend = backend
        if isinstance(model_or_named_params, torch.nn.Module):
            pairs = list(model_or_named_params.named_parameters(remove_duplicate=False))
        elif isinstance(model_or_named_params, (str, bytes, torch.Tensor)) or not isinstance(
                model_or_named_params, Iterable):
            raise TypeError("model_or_named_params must be an nn.Module or an iterable of "
                            f"(name, tensor) pairs, got {type(model_or_named_params).__name__}")
        else:
            pairs = list(model_or_named_params)
        names: List[str] = []
        params: List[torch.Tensor] = []
        seen = set()  # view keys of the listed tensors
        by_stream = {}
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"model_or_named_params[{i}] must be a (name, tensor) pair")
            name, t = pair
            if not isinstance(name, str):
                raise TypeError(f"parameter name #{i} must be a str, got {type(name).__name__}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"parameter {name!r} must be a tensor, got {type(t).__name__}")
            if isinstance(t, torch.nn.Parameter) and not t.requires_grad:
                continue  # frozen
            if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"parameter {name!r} must be float32, bfloat16 or float16, got "
                                f"{t.dtype}")
            key = _view_key(t)
            if t.numel() and key in seen:
                continue  # tied: the same weights under a second name
            if any(n == name for n in names):
                raise ValueError(f"parameter name {name!r} is listed twice")
            sid = stream_id(name)
            if sid in by_stream:
                raise ValueError(f"stream id collision: parameters {by_stream[sid]!r} and {name!r} "
                                 f"both map to stream {sid}; rename one of them")
            by_stream[sid] = name
            seen.add(key)
            names.append(name)
            params.append(t)
        if not params:
            raise ValueError("no trainable parameters (requires_grad=True) were found")
        # Views of one storage are fine when no element is shared (a flat parameter buffer); views that
        # overlap otherwise would be updated twice.
        _check_no_overlap(list(zip(names, params)),
                          hint="parameters that are different views of shared memory must not "
                          "overlap; list overlapping tensors once")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"all trainable parameters must be on one device, got "
                             f"{sorted(map(str, devices))}")
        self._names: Tuple[str, ...] = tuple(names)
        self._params: Tuple[torch.Tensor, ...] = tuple(params)
        self._streams: Tuple[int, ...] = tuple(stream_id(n) for n in names)
        self._pending: Optional[Tuple[int, float]] = None  # (seed, eps) of an applied +eps

    # ------------------------------------------------------------------------------- properties
    @property
    def params(self) -> Tuple[torch.Tensor, ...]:
        return self._params

    @property
    def names(self) -> Tuple[str, ...]:
        return self._names

    @property
    def streams(self) -> Tuple[int, ...]:
        return self._streams

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self._params)

    @property
    def pending(self) -> Optional[Tuple[int, float]]:
        """(seed, eps) of a +eps perturbation applied by zo_step(next_seed=...) and not yet used."""
        return self._pending

    # -------------------------------------------------------------------------------------- ops
    def _apply(self, seeds, coefs) -> None:
        apply_seeds_multi_(list(self._params), list(self._streams), seeds, coefs,
                           backend=self.backend, rounding=self.rounding, noise=self.noise)

    def perturb(self, seed, scale) -> None:
        """w <- w + scale * z(seed) on every parameter (one fused pass)."""
        seed = _check_seed(seed)
        self._apply([seed], [_as_float(scale, "scale")])

    def apply(self, seeds, coefs) -> None:
        """w <- w + sum_k coefs[k] * z(seeds[k]) on every parameter, in one fused pass."""
        self._apply(normalize_seeds(seeds), coefs)

    def apply_from(self, bases, seeds, coefs, *, staged: Optional[bool] = None) -> None:
        """w <- bases[i] + sum_k coefs[k] * z(seeds[k]) on every parameter i (bases: one tensor per
        parameter, same shape and dtype, on any device; never written).

        One pass with the out-of-place op where it exists and the bases are on the parameters' device;
        otherwise (or with ``staged=True``) each base is first copied into its parameter, then one
        in-place pass: bitwise the same weights either way.  Any pending +eps is forgotten (the weights
        are overwritten)."""
        if isinstance(bases, torch.Tensor) or not isinstance(bases, Iterable):
            raise TypeError("bases must be a sequence of tensors, one per parameter")
        bases = list(bases)
        if len(bases) != len(self._params):
            raise ValueError(f"bases must hold one tensor per parameter ({len(self._params)}), got "
                             f"{len(bases)}")
        for i, (b, p) in enumerate(zip(bases, self._params)):
            if not isinstance(b, torch.Tensor):
                raise TypeError(f"bases[{i}] must be a tensor, got {type(b).__name__}")
            if b.dtype != p.dtype or b.shape != p.shape:
                raise ValueError(f"bases[{i}] is {b.dtype} {tuple(b.shape)} but parameter "
                                 f"{self._names[i]!r} is {p.dtype} {tuple(p.shape)}")
        _check_no_overlap(list(zip(self._names, self._params)),
                          [(f"bases[{i}]", b) for i, b in enumerate(bases)],
                          hint="a base that shares its storage with the parameters must not share "
                          "any element with them")
        seeds = normalize_seeds(seeds)
        coefs = normalize_coefs(coefs, seeds.numel())
        self._pending = None
        if not staged and seeds.numel() and all(b.device == p.device
                                                for b, p in zip(bases, self._params)):
            apply_seeds_multi(bases, list(self._streams), seeds, coefs, outs=list(self._params),
                              backend=self.backend, rounding=self.rounding, noise=self.noise)
            return
        with torch.no_grad():
            for p, b in zip(self._params, bases):
                p.copy_(b)
        if seeds.numel():
            self._apply(seeds, coefs)

    def discard_pending(self) -> None:
        """Forget a pending +eps perturbation without undoing it: for when the weights have just been
        overwritten (e.g. rebuilt from w0), so it is no longer in them."""
        self._pending = None

    def restore_pending(self) -> None:
        """Remove a pending +eps perturbation left by zo_step(..., next_seed=...). No-op if none."""
        if self._pending is not None:
            seed, eps = self._pending
            self._apply([seed], [-eps])
            self._pending = None

    def zo_step(self, seed, loss_fn: Callable[[], object], *, eps, lr,
                next_seed=None) -> ZOStepResult:
        """One two-point zeroth-order step along z(seed): g = (L(w + eps z) - L(w - eps z)) / (2 eps),
        w <- w - lr g z.

        ``loss_fn()`` evaluates the loss at the current weights (a float or a 1-element tensor).  If the
        previous step was called with ``next_seed == seed`` (and the same eps), its +eps perturbation is
        already in place and is not applied again.  The final pass restores and updates with the
        coefficient (eps - lr g); with ``next_seed`` it also applies +eps along z(next_seed) (seeds
        [seed, next_seed], coefs [eps - lr g, eps]), which the next call then uses.  A g that is not
        finite (or does not fit a float32), or a non-finite update coefficient, skips the update: the
        weights are only restored (coefficient eps) and ``skipped`` is True.
        """
        seed = _check_seed(seed)
        eps = _positive_finite("eps", eps)
        if isinstance(lr, (bool, np.bool_)) or not isinstance(lr, numbers.Real) or \
                not math.isfinite(float(lr)):
            raise ValueError(f"lr must be a finite real number, got {lr!r}")
        lr = float(lr)
        if next_seed is not None:
            next_seed = _check_seed(next_seed)
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable")
        if self._pending is not None:
            if self._pending != (seed, eps):
                raise RuntimeError(
                    f"a +eps perturbation along seed {self._pending[0]} (eps {self._pending[1]}) is "
                    f"pending but this step is for seed {seed} (eps {eps}); call "
                    "restore_pending() first or pass the same seed as the previous next_seed")
        else:
            self._apply([seed], [eps])
            self._pending = (seed, eps)
        # Weights are at w + eps z.
        try:
            loss_plus = _as_float(loss_fn(), "loss_fn()")
        except BaseException:
            self.restore_pending()
            raise
        self._apply([seed], [-2.0 * eps])
        self._pending = None
        try:
            loss_minus = _as_float(loss_fn(), "loss_fn()")
        except BaseException:
            self._apply([seed], [eps])
            raise
        g = (loss_plus - loss_minus) / (2.0 * eps)
        coef = eps - lr * g if math.isfinite(g) else math.nan
        skipped = not (math.isfinite(g) and abs(g) <= _F32_MAX and math.isfinite(coef)
                       and abs(coef) <= _F32_MAX)
        if skipped:
            coef = eps
        if next_seed is None:
            self._apply([seed], [coef])
        else:
            self._apply([seed, next_seed], [coef, eps])
            self._pending = (next_seed, eps)
        return ZOStepResult(g, loss_plus, loss_minus, skipped)

    def __repr__(self) -> str:
        return (f"ModelSeeds({len(self._params)} tensors, {self.numel} elements, "
                f"backend={self.backend!r}, rounding={self.rounding!r}, noise={self.noise!r})")


__all__ = ["ModelSeeds", "ZOStepResult"]
