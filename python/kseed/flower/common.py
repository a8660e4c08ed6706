"""What the kseed ServerApp and ClientApp agree on: message layout, run config, wire-size accounting.

Messages (Flower Message API):
  query  server -> node   {"kseed": ConfigRecord{"op": "hello"}}
         node -> server   {"kseed": ConfigRecord{"partition-id", "num-partitions", "kseed-version"}}
  train  server -> node   {"kseed": ConfigRecord{"down": <the driver's DownMessage bytes>,
                                              "base-hash": <first 16 hex digits of the server's w0 hash>}}
         node -> server   {"kseed": ConfigRecord{"up": <the driver's UpMessage bytes>,
                                              "data-s", "load-s", "rebuild-s", "train-s", "total-s": float}}

The payloads are the driver's own serialized messages (kseed.protocol), carried as `bytes` values of a
ConfigRecord: Flower passes them through untouched.  What crosses the wire for one message is Flower's
serialized objects (the Message, its RecordDict and records) plus the message header sent with
PushMessages / PullMessages; wire_bytes() counts exactly those bytes (not HTTP headers or TLS framing).
"""
from __future__ import annotations

from typing import Any, Mapping

RECORD = "kseed"
TIMING_KEYS = ("data-s", "load-s", "rebuild-s", "train-s", "total-s")  # client timings, seconds
DOWN_KEY = "down"
UP_KEY = "up"
BASE_HASH_KEY = "base-hash"



def wire_bytes(message) -> int:
    """Bytes Flower sends for `message`: its serialized objects plus its header."""
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    total = sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
    total += message_to_proto(remove_content_from_message(message)).ByteSize()
    return total


def config_value(run_config: Mapping[str, Any], key: str, kind, default=None):
    """A run-config value converted to `kind`, with a ValueError naming the key when it does not fit."""
    if key not in run_config:
        if default is None:
            raise ValueError(f"run config: missing key {key!r}")
        return default
    value = run_config[key]
    try:
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            return str(value)
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes"):
                return True
            if str(value).lower() in ("0", "false", "no"):
                return False
            raise ValueError
    except (TypeError, ValueError):
        pass
    raise ValueError(f"run config: {key}={value!r} is not a valid {kind.__name__}")
