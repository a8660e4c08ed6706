"""The in-process engine: every sampled client is a client of the run's method (kseed.methods) in this
process, sharing the server's workspace (one rebuild per round serves the evaluation and all clients),
driven by the shared round loop (kseed.rounds) over bytes; plus export.

The run directory (metrics.jsonl, checkpoint.json, summary.json, plots) is kseed.rundir's, the data,
model and evaluation kseed.task's.  The names below are re-exported for the callers of this module.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

from . import methods
from . import modeling as M
from .config import FedConfig
from .rounds import Delivery, Federation
from .rundir import (CHECKPOINT, METRICS, CheckpointError, atomic_write,  # noqa: F401 (re-exported)
                     checkpoint_config, read_checkpoint, read_metrics)
from .task import build_data, load_workspace, model_dir  # noqa: F401 (re-exported)


def run(cfg: FedConfig, out: str, *, resume: bool = False, device: str = "cpu",
        backend: Optional[str] = None, progress: bool = True, rebuild_cache: bool = True) -> dict:
    """Run (or resume) a federation in this process; returns the summary dict (also written to
    summary.json)."""
    with Federation(cfg, out, resume=resume, device=device, backend=backend,
                    rebuild_cache=rebuild_cache, engine="simulation") as fed:
        clients: Dict[int, object] = {}
        fed.server.shares_model = True  # the clients below hold no model of their own

        def deliver(rnd: int, downs: Dict[int, bytes]) -> Delivery:
            ups = {}
            for c, down in downs.items():
                if c not in clients:
                    clients[c] = fed.method.client(cfg, lambda: fed.ws, fed.parts[c], client_id=c,
                                                   shared=fed.server)
                ups[c] = clients[c].fit(down)
            return Delivery(uploads=ups)

        return fed.run(deliver, progress=progress)


def export(out: str, to: str, *, model_path: Optional[str] = None, device: str = "cpu",
           backend: Optional[str] = None) -> dict:
    """Rebuild the global model from DIR's checkpoint and save it as a Hugging Face directory."""
    doc = read_checkpoint(out)
    cfg = FedConfig.from_dict(doc["server"]["config"])
    ws = load_workspace(cfg, device, backend, cache=False, model_path=model_path)
    method = methods.get(cfg.method)
    server = method.server(cfg, base_identity=ws.identity, workdir=out, readonly=True)
    try:
        server.load_state_dict(doc["server"])
        server.load_global(ws)
    except ValueError as exc:
        raise CheckpointError(f"cannot export {out}: {exc}") from None
    finally:
        server.close()
    os.makedirs(to, exist_ok=True)
    with M.quiet_transformers():  # no progress bars or notices: export prints one line
        ws.model.save_pretrained(to, safe_serialization=True)
        ws.tok.save_pretrained(to)
    info = {"from": os.path.abspath(out), "round": server.round, "base_model": ws.identity,
            "method": cfg.method, **server.export_info()}
    with open(os.path.join(to, "kseed_export.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return info
