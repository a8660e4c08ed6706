"""The kseed ClientApp: a stateless FedKSeed client on a SuperNode.

In Flower's deployment engine every message starts a fresh ClientApp process, so each train message
builds a new kseed.client.FedKSeedClient: it loads w0 (the base model), rebuilds the current global model
with one fused pass w0 + sum_k A_k z_k from the accumulators in the DownMessage, runs its local
zeroth-order steps and returns its UpMessage.  The node's data partition comes from the node config
(partition-id, num-partitions, and optionally device, e.g. device="cuda:0" for this node's clients);
the driver's options from the run config.
"""
from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from .common import BASE_HASH_KEY, DOWN_KEY, RECORD, UP_KEY

app = ClientApp()


def _partition(context: Context):
    try:
        pid = int(context.node_config["partition-id"])
        nparts = int(context.node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("this SuperNode needs --node-config 'partition-id=I num-partitions=N'") from None
    return pid, nparts


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Discovery: tell the ServerApp which data partition this node holds."""
    pid, nparts = _partition(context)
    from kseed.flower import __version__

    rec = ConfigRecord({"partition-id": pid, "num-partitions": nparts, "kseed-version": __version__})
    return Message(RecordDict({RECORD: rec}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: DownMessage bytes in, UpMessage bytes out, with the client's timings."""
    t0 = time.perf_counter()
    pid, nparts = _partition(context)
    rec = msg.content[RECORD]
    down = rec[DOWN_KEY]
    if not isinstance(down, bytes):
        raise TypeError("train message: 'down' must be bytes")
    base_hash = rec.get(BASE_HASH_KEY)
    from .driver import run_client

    device = context.node_config.get("device")
    up, timing = run_client(context.run_config, pid, nparts, down,
                            base_hash=base_hash if isinstance(base_hash, str) else None,
                            device=str(device) if device else None)
    timing["total-s"] = time.perf_counter() - t0
    content = RecordDict({RECORD: ConfigRecord({UP_KEY: up, **{k: float(v) for k, v in timing.items()}})})
    return Message(content, reply_to=msg)
