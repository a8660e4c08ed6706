"""The federated methods kseed runs, behind one interface (kseed.methods.base).

Adding a method: one module of this package that defines ``METHOD = base.Method(...)``, plus one line
below.  The round loop (kseed.rounds), the run directory, both engines, the metrics, the plots and the
summary take the method from here by ``FedConfig.method``; kseed-fed's ``--method`` and the Flower
run-config key ``method`` choose it.
"""
from __future__ import annotations

import importlib

# name -> module (imported when first asked for)
REGISTRY = {
    "fedkseed": "kseed.methods.fedkseed",
    "fedmezo": "kseed.methods.fedmezo",
    "mezo": "kseed.methods.mezo",
    "ferret": "kseed.methods.ferret",
    "fedit": "kseed.methods.fedit",
    "fedpipe": "kseed.methods.fedpipe",
}
NAMES = tuple(REGISTRY)
# other names kseed-fed's --method accepts: name -> (method, the FedConfig fields it sets)
ALIASES = {"fedkseed-pro": ("fedkseed", {"sampling": "pro"})}


def get(name: str):
    """The ``base.Method`` registered as ``name`` (ValueError naming the known ones)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(NAMES)}")
    return importlib.import_module(REGISTRY[name]).METHOD


__all__ = ["REGISTRY", "NAMES", "ALIASES", "get"]
