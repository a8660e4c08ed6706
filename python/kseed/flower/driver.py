"""The kseed driver objects as the Flower apps use them: nothing engine-specific here.

Client side, stateless: every call builds a fresh client of the run's method (kseed.methods; a new
process per message in Flower's deployment engine), loads w0, rebuilds the global model (FedKSeed: one
fused pass; the seed-history methods: the rounds the down message carries, from w0 or from the node's
model cache, node config ``cache-dir``) and trains; the load, rebuild and training times are measured.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Mapping, Optional, Tuple

from kseed import methods
from kseed.task import build_data, load_workspace

from .runconfig import extra, fed_config


class BaseModelMismatch(ValueError):
    """The node's base model w0 is not the server's: its rebuilt model would be wrong."""


def run_client(run_config: Mapping[str, Any], partition_id: int, num_partitions: int, down: bytes,
               base_hash: Optional[str] = None, device: Optional[str] = None,
               cache_dir: Optional[str] = None, memory_budget_mib: Optional[float] = None
               ) -> Tuple[bytes, Dict[str, float]]:
    """One stateless round of client `partition_id`: (UpMessage bytes, timings in seconds).
    `device` (from the node config) overrides the run config's device on this node; `cache_dir`
    (node config cache-dir) keeps the global model between participations, and `memory_budget_mib`
    (node config memory-budget-mib) is the memory this node gives its client, for the methods that
    use them.  The node's base model is checked against the server's (`base_hash`) when the client
    loads it, or, for a client that never loads the full-precision model (FedPipe on a quantized
    base), from the hash its streamed weights gave, before the upload is returned."""
    cfg = fed_config(run_config)
    if num_partitions != cfg.num_clients:
        raise ValueError(f"this node has num-partitions={num_partitions}, the run has num-clients="
                         f"{cfg.num_clients}")
    if not 0 <= partition_id < cfg.num_clients:
        raise ValueError(f"partition-id={partition_id} is outside [0, {cfg.num_clients})")
    device = device or extra(run_config, "device")
    timing: Dict[str, float] = {}
    t0 = time.perf_counter()
    parts, _, _ = build_data(cfg)
    timing["data-s"] = time.perf_counter() - t0

    def check(mine: Optional[str]) -> None:
        mine = str(mine or "")
        if base_hash and not mine.startswith(base_hash):
            raise BaseModelMismatch(f"this node's base model (hash {mine[:16]}) is not the server's "
                                    f"(hash {base_hash}): install the same model on every node")

    def loader():
        t = time.perf_counter()
        ws = load_workspace(cfg, device, cache=False, facts=False)  # the method's facts: server's
        timing["load-s"] = time.perf_counter() - t
        check(ws.identity.get("hash"))
        return ws

    client = methods.get(cfg.method).client(cfg, loader, parts[partition_id], client_id=partition_id,
                                            cache_dir=cache_dir, memory_budget_mib=memory_budget_mib)
    t = time.perf_counter()
    up = client.fit(down)
    fit = time.perf_counter() - t
    check(client.base_model_hash())
    timing["rebuild-s"] = client.rebuild_seconds
    timing["train-s"] = fit - timing.get("load-s", 0.0) - timing["rebuild-s"]
    return up, timing
