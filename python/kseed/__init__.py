"""kseed: the FedKSeed federated driver (server and client objects over bytes, an in-process
simulation, and the kseed-fed command line) on the kernels of kseed_kernels.

The names below are imported on first use (PEP 562), so that ``kseed-fed`` starts with no torch
import outside its own error handling: a Ctrl-C while torch loads gives one line, not a traceback."""
import importlib

_EXPORTS = {"FedKSeedClient": "client", "FedConfig": "config", "DownMessage": "protocol",
            "ProtocolError": "protocol", "UpMessage": "protocol", "decode_down": "protocol",
            "decode_up": "protocol", "encode_down": "protocol", "encode_up": "protocol",
            "FedKSeedServer": "server", "NotEnoughReplies": "server"}

__all__ = ["FedConfig", "FedKSeedServer", "FedKSeedClient", "NotEnoughReplies", "ProtocolError",
           "DownMessage", "UpMessage", "encode_down", "decode_down", "encode_up", "decode_up"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
