"""kseed on Flower: a ServerApp and a ClientApp that drive the same server and client objects as the
in-process simulation (kseed.server.FedKSeedServer, kseed.client.FedKSeedClient), unchanged on Flower's
deployment engine (SuperLink and SuperNodes, across machines) and on its simulation engine (virtual
SuperNodes on Ray, many clients in parallel on one machine; the kseed[flower-simulation] extra).

The app dir shipped with the package (see app_dir()) holds only a pyproject.toml whose components point
into this package, so a pip-installed kseed[flower] can serve it on every machine.
"""
from pathlib import Path

try:
    from kseed import __version__
except ImportError:  # kseed/__init__.py without a version
    __version__ = "0.1.0"


def app_dir() -> Path:
    """The Flower app dir shipped with kseed (pass it to `flwr run`)."""
    return Path(__file__).resolve().parent / "app"


__all__ = ["app_dir", "__version__"]
