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
               cache_dir: Optional[str] = None) -> Tuple[bytes, Dict[str, float]]:
    """One stateless round of client `partition_id`: (UpMessage bytes, timings in seconds).
    `device` (from the node config) overrides the run config's device on this node; `cache_dir`
    (node config cache-dir) keeps the global model between participations, for the methods that
    use one."""
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

    def loader():
        t = time.perf_counter()
        ws = load_workspace(cfg, device, cache=False)
        timing["load-s"] = time.perf_counter() - t
        mine = str(ws.identity.get("hash", ""))
        if base_hash and not mine.startswith(base_hash):
            raise BaseModelMismatch(f"this node's base model (hash {mine[:16]}) is not the server's "
                                    f"(hash {base_hash}): install the same model on every node")
        return ws

    client = methods.get(cfg.method).client(cfg, loader, parts[partition_id], client_id=partition_id,
                                            cache_dir=cache_dir)
    t = time.perf_counter()
    up = client.fit(down)
    fit = time.perf_counter() - t
    timing["rebuild-s"] = client.workspace.rebuild_seconds
    timing["train-s"] = fit - timing.get("load-s", 0.0) - timing["rebuild-s"]
    return up, timing
