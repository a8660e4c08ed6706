"""The server side of the federated methods (kseed.methods): the names every caller of this module
used, re-exported.  ``FedKSeedServer`` is the FedKSeed / FedKSeed-Pro server
(kseed.methods.fedkseed), a plain object over bytes; ``bound_uploads`` the threat model's bounds on a
round's uploads (kseed.methods.base), which every method applies."""
from .methods.base import (FIVE, Bounded, NotEnoughReplies, SeedServer,  # noqa: F401
                           bound_uploads, lower_median)
from .methods.fedkseed import FedKSeedServer  # noqa: F401

__all__ = ["FedKSeedServer", "SeedServer", "NotEnoughReplies", "Bounded", "bound_uploads",
           "lower_median", "FIVE"]
