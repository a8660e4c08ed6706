"""The kseed ClientApp: a stateless client of the run's method (kseed.methods) on a SuperNode.

In Flower's deployment engine every message starts a fresh ClientApp process, so each train message
builds a new client (kseed.flower.driver.run_client): it loads w0 (the base model), rebuilds the current
global model (FedKSeed: one fused pass w0 + sum_k A_k z_k from the accumulators in the DownMessage;
FedMeZO / MeZO: the seed history the DownMessage carries, applied from w0, or from the model the node
keeps in its node-config ``cache-dir`` when it has one), runs its local zeroth-order steps and returns
its UpMessage.  (Flower's simulation engine runs the same handlers in
long-lived Ray actors; nothing here relies on a fresh process.)  The node's data partition comes from
the node config (partition-id, num-partitions, and optionally device, e.g. device="cuda:0" for this
node's clients, and memory-budget-mib, the memory this node gives its client, which FedPipe sizes
the client's rank and frozen base to; the simulation engine gives each virtual SuperNode its
partition-id and num-partitions); the driver's options from the run config.

Threads: a ClientApp process left alone starts torch's and OpenMP's thread pools at the machine's full
size, so N SuperNodes on one machine oversubscribe its cores N times.  Each train message first applies
the client's thread budget (thread_budget): the node config's num-threads (`python -m kseed.flower
local` divides the cores among its SuperNodes), else, on Flower's simulation engine, the CPUs Ray gave
the virtual client (client-resources num-cpus).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Mapping, Optional

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from .common import BASE_HASH_KEY, DOWN_KEY, RECORD, UP_KEY

app = ClientApp()

THREADS_KEY = "num-threads"                           # node config: this node's ClientApp thread budget
CACHE_KEY = "cache-dir"                               # node config: where this node keeps its model
BUDGET_KEY = "memory-budget-mib"                      # node config: the memory this node's client has
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")   # what OpenMP / MKL read when they start


def thread_env(threads: int) -> dict:
    """The environment variables that size OpenMP's and MKL's pools to `threads`."""
    return {k: str(int(threads)) for k in THREAD_ENV}


def _ray_cpus() -> Optional[int]:
    """CPUs Ray assigned to this process (a simulation-engine actor); None outside Ray."""
    ray = sys.modules.get("ray")  # only ever imported here by Flower's Ray backend
    try:
        if ray is None or not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not a Ray worker after all: no budget from Ray
        return None
    return max(1, int(cpus)) if cpus else None


def thread_budget(node_config: Mapping) -> Optional[int]:
    """Threads this client may use: node config num-threads, else the CPUs Ray assigned to this
    virtual client, else None (torch's default)."""
    if THREADS_KEY in node_config:
        raw = node_config[THREADS_KEY]
        if isinstance(raw, str) and raw.strip().isdigit():
            raw = int(raw)
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
            raise ValueError(f"node config {THREADS_KEY}={raw!r}: must be an integer >= 1")
        return raw
    return _ray_cpus()


def apply_threads(threads: Optional[int]) -> None:
    """Size torch's intra-op pool (and OpenMP's / MKL's, for this process and what it starts)."""
    if threads is None:
        return
    os.environ.update(thread_env(threads))
    import torch

    torch.set_num_threads(threads)


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
    threads = thread_budget(context.node_config)
    apply_threads(threads)  # before the driver imports torch and builds the model
    import torch

    print(f"kseed ClientApp: partition {pid}, {torch.get_num_threads()} threads"
          f"{'' if threads else ' (no budget: torch default)'}", file=sys.stderr, flush=True)
    rec = msg.content[RECORD]
    down = rec[DOWN_KEY]
    if not isinstance(down, bytes):
        raise TypeError("train message: 'down' must be bytes")
    base_hash = rec.get(BASE_HASH_KEY)
    from .driver import run_client

    device = context.node_config.get("device")
    cache = context.node_config.get(CACHE_KEY)
    up, timing = run_client(context.run_config, pid, nparts, down,
                            base_hash=base_hash if isinstance(base_hash, str) else None,
                            device=str(device) if device else None,
                            cache_dir=str(cache) if cache else None,
                            memory_budget_mib=context.node_config.get(BUDGET_KEY))
    timing["total-s"] = time.perf_counter() - t0
    content = RecordDict({RECORD: ConfigRecord({UP_KEY: up, **{k: float(v) for k, v in timing.items()}})})
    return Message(content, reply_to=msg)
