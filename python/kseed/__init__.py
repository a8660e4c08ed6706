"""kseed: the FedKSeed federated driver (server and client objects over bytes, an in-process
simulation, and the kseed-fed command line) on the kernels of kseed_kernels."""
from .client import FedKSeedClient
from .config import FedConfig
from .protocol import DownMessage, ProtocolError, UpMessage, decode_down, decode_up, encode_down, encode_up
from .server import FedKSeedServer, NotEnoughReplies

__all__ = ["FedConfig", "FedKSeedServer", "FedKSeedClient", "NotEnoughReplies", "ProtocolError",
           "DownMessage", "UpMessage", "encode_down", "decode_down", "encode_up", "decode_up"]
__version__ = "0.1.0"
