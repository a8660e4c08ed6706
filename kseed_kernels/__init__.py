"""kseed_kernels: Philox-seeded Gaussian and Rademacher perturbations and fused K-seed updates
(docs/SPEC.md)."""
from .ops import (
    apply_seeds,
    apply_seeds_,
    apply_seeds_multi,
    apply_seeds_multi_,
    backends,
    gaussian,
    philox4x32_10,
    project_seeds,
    project_seeds_multi,
    rademacher,
    stream_id,
)
from .model import ModelSeeds

__all__ = [
    "ModelSeeds",
    "apply_seeds",
    "apply_seeds_",
    "apply_seeds_multi",
    "apply_seeds_multi_",
    "backends",
    "gaussian",
    "philox4x32_10",
    "project_seeds",
    "project_seeds_multi",
    "rademacher",
    "stream_id",
]
__version__ = "0.1.0"
