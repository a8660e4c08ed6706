"""The baseline every kseed benchmark is measured against: the reference code's perturbation (MeZO's
loop, which FedKSeed's reference implementation follows), per seed torch.manual_seed(seed) then, for
each parameter, z = torch.normal(0, 1) in the parameter's dtype and device and p.add_(z, alpha=scale).
"""
from __future__ import annotations

import torch


def perturb(params, seed: int, scale: float) -> None:
    """p += scale * z(seed) for every p of params, z drawn by torch's generator seeded with seed."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(0.0, 1.0, size=p.shape, dtype=p.dtype, device=p.device)
        p.add_(z, alpha=scale)


def perturb_seeds(params, seeds, coefs) -> None:
    """A rebuild the reference way: one perturb pass per (seed, coefficient)."""
    for s, c in zip(seeds, coefs):
        perturb(params, s, c)


@torch.no_grad()
def mezo_step(params, seed: int, loss_fn, eps: float, lr: float) -> float:
    """The reference code's ZO step, four passes: +eps, L+, -2 eps, L-, +eps, then the update
    -lr g z.  Returns g = (L+ - L-) / (2 eps)."""
    perturb(params, seed, eps)
    lp = float(loss_fn())
    perturb(params, seed, -2 * eps)
    lm = float(loss_fn())
    perturb(params, seed, eps)
    g = (lp - lm) / (2 * eps)
    perturb(params, seed, -lr * g)
    return g
