"""The in-process engine: every sampled client is a client of the run's method (kseed.methods) in this
process, sharing the server's workspace (one rebuild per round serves the evaluation and all clients),
driven by the shared round loop (kseed.rounds) over bytes; plus export.

The run directory (metrics.jsonl, checkpoint.json, summary.json, plots) is kseed.rundir's, the data,
model and evaluation kseed.task's.  The names below are re-exported for the callers of this module.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import threading
from typing import Dict, List, Optional

from . import methods
from . import modeling as M
from .config import FedConfig
from .rounds import Delivery, Federation
from .rundir import (CHECKPOINT, METRICS, TMP_PREFIX, CheckpointError,  # noqa: F401 (re-exported)
                     atomic_write, checkpoint_config, read_checkpoint, read_metrics)
from .task import build_data, load_workspace, model_dir  # noqa: F401 (re-exported)


def run(cfg: FedConfig, out: str, *, resume: bool = False, device: str = "cpu",
        backend: Optional[str] = None, progress: bool = True, rebuild_cache: bool = True,
        tensorboard: Optional[str] = None) -> dict:
    """Run (or resume) a federation in this process; returns the summary dict (also written to
    summary.json)."""
    with Federation(cfg, out, resume=resume, device=device, backend=backend,
                    rebuild_cache=rebuild_cache, engine="simulation",
                    tensorboard=tensorboard) as fed:
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
    """Rebuild the global model from DIR's checkpoint and save it as a Hugging Face directory.

    All or nothing: the files are written (and fsync'd) into a temp directory ``.tmp-export-*`` beside
    ``to``, which then becomes ``to`` by one rename (a new directory) or whose files are moved into it
    one by one with Ctrl-C held back until they are all in (an existing one).  An error or Ctrl-C
    before that leaves ``to`` as it was, and removes the temp directory and any parent directories
    this call made."""
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
    info = {"from": os.path.abspath(out), "round": server.round, "base_model": ws.identity,
            "method": cfg.method, **server.export_info()}
    to = os.path.abspath(to)
    made: List[str] = []  # parent directories this call creates, deepest first
    p = os.path.dirname(to)
    while not os.path.exists(p):
        made.append(p)
        p = os.path.dirname(p)
    tmp = None
    try:
        for d in reversed(made):
            os.mkdir(d)
        tmp = os.path.join(os.path.dirname(to), f"{TMP_PREFIX}export-{os.path.basename(to)}-"
                                                 f"{secrets.token_hex(6)}")
        os.mkdir(tmp)
        with M.quiet_transformers():  # no progress bars or notices: export prints one line
            ws.model.save_pretrained(tmp, safe_serialization=True)
            ws.tok.save_pretrained(tmp)
        atomic_write(os.path.join(tmp, "kseed_export.json"), json.dumps(info, indent=1))
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        with _sigint_held():
            if not os.path.exists(to):
                os.rename(tmp, to)
            else:
                for name in sorted(os.listdir(tmp)):
                    os.replace(os.path.join(tmp, name), os.path.join(to, name))
                os.rmdir(tmp)
            tmp = None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in made:
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
    return info


@contextlib.contextmanager
def _sigint_held():
    """Ctrl-C inside the block is ignored (in the main thread): export's last moves complete."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
