"""The in-process engine: every sampled client is a FedKSeedClient in this process, sharing the
server's workspace (one rebuild per round serves the evaluation and all clients), driven by the shared
round loop (kseed.rounds) over bytes; plus export.

The run directory (metrics.jsonl, checkpoint.json, summary.json, plots) is kseed.rundir's, the data,
model and evaluation kseed.task's.  The names below are re-exported for the callers of this module.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np

from . import modeling as M
from .client import FedKSeedClient
from .config import FedConfig
from .rounds import Delivery, Federation
from .rundir import (CHECKPOINT, METRICS, CheckpointError, atomic_write,  # noqa: F401 (re-exported)
                     checkpoint_config, read_checkpoint, read_metrics)
from .server import FedKSeedServer
from .task import build_data, load_workspace, model_dir  # noqa: F401 (re-exported)


def run(cfg: FedConfig, out: str, *, resume: bool = False, device: str = "cpu",
        backend: Optional[str] = None, progress: bool = True, rebuild_cache: bool = True) -> dict:
    """Run (or resume) a federation in this process; returns the summary dict (also written to
    summary.json)."""
    with Federation(cfg, out, resume=resume, device=device, backend=backend,
                    rebuild_cache=rebuild_cache, engine="simulation") as fed:
        clients: Dict[int, FedKSeedClient] = {}

        def deliver(rnd: int, downs: Dict[int, bytes]) -> Delivery:
            ups = {}
            for c, down in downs.items():
                if c not in clients:
                    clients[c] = FedKSeedClient(cfg, lambda: fed.ws, fed.parts[c], client_id=c)
                ups[c] = clients[c].fit(down)
            return Delivery(uploads=ups)

        return fed.run(deliver, progress=progress)


def export(out: str, to: str, *, model_path: Optional[str] = None, device: str = "cpu",
           backend: Optional[str] = None) -> dict:
    """Rebuild the global model from DIR's checkpoint and save it as a Hugging Face directory."""
    doc = read_checkpoint(out)
    cfg = FedConfig.from_dict(doc["server"]["config"])
    ws = load_workspace(cfg, device, backend, cache=False, model_path=model_path)
    server = FedKSeedServer(cfg, base_identity=ws.identity)
    try:
        server.load_state_dict(doc["server"])
    except ValueError as exc:
        raise CheckpointError(f"cannot export {out}: {exc}") from None
    ws.rebuild(server.seeds, server.global_coefs())
    os.makedirs(to, exist_ok=True)
    with M.quiet_transformers():  # no progress bars or notices: export prints one line
        ws.model.save_pretrained(to, safe_serialization=True)
        ws.tok.save_pretrained(to)
    info = {"from": os.path.abspath(out), "round": server.round, "base_model": ws.identity,
            "num_seeds": cfg.num_seeds, "nonzero_coefficients": int(np.count_nonzero(
                server.global_coefs()))}
    with open(os.path.join(to, "kseed_export.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return info
