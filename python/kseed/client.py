"""The client side of the federated methods (kseed.methods): the names every caller of this module
used, re-exported.  ``FedKSeedClient`` is the FedKSeed / FedKSeed-Pro client
(kseed.methods.fedkseed), a plain object over bytes: ``fit(down_bytes) -> up_bytes``."""
from .methods.base import SeedClient, lr_range  # noqa: F401
from .methods.fedkseed import FedKSeedClient, check_down  # noqa: F401

__all__ = ["FedKSeedClient", "SeedClient", "check_down", "lr_range"]
