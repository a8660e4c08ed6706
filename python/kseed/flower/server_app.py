"""The kseed ServerApp: the FedKSeed server (kseed.server.FedKSeedServer) driven by Flower.

Round r:  the server samples its clients from the run seed (partition ids, not Flower node ids),
makes each one's DownMessage, Flower carries them to the nodes holding those partitions, the replies
that arrive within round-timeout go to server.aggregate (which rejects malformed uploads and needs at
least min-replies valid ones), the global model is evaluated as in the in-process simulation, and a
metrics.jsonl row and the checkpoint are written to `out`.  With the same config the accumulators end
bitwise equal to the simulation's.

metrics.jsonl has the simulation's keys; here bytes_down / bytes_up count what crosses the wire
(Flower's serialized messages), payload_bytes_down / payload_bytes_up the driver's own messages inside
them (the simulation's bytes_down / bytes_up), and rebuild_seconds the clients' fused rebuild time.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import List

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()
log = logging.getLogger("kseed.flower")


def _nan_none(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def _append(path: str, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _log_to_stderr() -> None:
    """kseed's log lines (round summaries, rejected uploads) on stderr, which Flower streams to
    `flwr run --stream` / `flwr log`."""
    lg = logging.getLogger("kseed")
    if not lg.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, context.run_config)


def run_federation(grid, run_config) -> dict:
    """The whole run on `grid`; returns the summary (also written to out/summary.json)."""
    from kseed import simulation as S
    from kseed.server import FedKSeedServer, NotEnoughReplies

    from .common import BASE_HASH_KEY
    from .exchange import discover_partitions, exchange
    from .runconfig import extra, fed_config

    _log_to_stderr()
    cfg = fed_config(run_config)
    device = extra(run_config, "device")
    out = extra(run_config, "out") or None
    round_timeout = extra(run_config, "round-timeout")
    node_wait = extra(run_config, "node-wait-timeout")
    max_up = extra(run_config, "max-upload-bytes")
    metrics = None
    if out is not None:
        os.makedirs(out, exist_ok=True)
        if os.path.exists(os.path.join(out, S.CHECKPOINT)):
            raise S.CheckpointError(f"{out} already holds a checkpoint: choose another out")
        metrics = os.path.join(out, S.METRICS)

    t_start = time.perf_counter()
    _, eval_ex, held = S.build_data(cfg)
    ws = S.load_workspace(cfg, device, cache=False)
    server = FedKSeedServer(cfg, base_identity=ws.identity)
    evaluate_global = S.global_evaluator(cfg, ws, server, eval_ex)

    t0 = time.perf_counter()
    node_of = discover_partitions(grid, cfg.num_clients, node_wait)
    log.info("partitions held by nodes: %s", {p: node_of[p] for p in sorted(node_of)})
    absent = [p for p in range(cfg.num_clients) if p not in node_of]
    if absent:
        log.warning("no node holds partitions %s: their rounds count them as no reply", absent)
    discover_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    loss0, _ = evaluate_global(False)
    rows: List[dict] = [{"round": 0, "train_loss": None, "eval_loss": loss0, "bytes_down": 0,
                         "bytes_up": 0, "seconds": round(time.perf_counter() - t0, 3),
                         "nodes": {str(p): str(n) for p, n in sorted(node_of.items())},
                         "discover_seconds": round(discover_s, 3)}]
    if metrics:
        with open(metrics, "w", encoding="utf-8") as f:
            f.write(json.dumps(rows[0]) + "\n")
        S.save_checkpoint(out, server)

    fields = {BASE_HASH_KEY: str(ws.identity.get("hash", ""))[:16]}
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        ids = server.sample_clients(rnd)
        downs = {c: server.make_down(rnd, c) for c in ids}
        res = exchange(grid, downs, node_of, rnd, timeout=round_timeout, max_upload_bytes=max_up,
                       fields=fields)
        try:
            stats = server.aggregate(rnd, res.uploads)
        except NotEnoughReplies as exc:
            log.error("%s; Flower-side drops: %s", exc, res.failed)
            raise
        do_eval = (cfg.eval_every and rnd % cfg.eval_every == 0) or rnd == cfg.rounds
        do_rouge = bool(cfg.rouge_every) and rnd % cfg.rouge_every == 0
        ev, rl = evaluate_global(do_rouge) if do_eval or do_rouge else (None, None)
        rejected = {str(k): v for k, v in res.failed.items()}
        rejected.update({str(k): v for k, v in stats["rejected"].items()})
        rebuild = {str(c): t["rebuild-s"] for c, t in res.timings.items() if "rebuild-s" in t}
        row = {"round": rnd, "train_loss": _nan_none(stats["train_loss"]),
               "eval_loss": ev if do_eval else None,
               "bytes_down": res.wire_down, "bytes_up": res.wire_up,
               "payload_bytes_down": res.payload_down, "payload_bytes_up": res.payload_up,
               "bytes_down_per_client": {str(c): len(downs[c]) for c in res.sent},
               "bytes_up_per_client": {str(c): len(u) for c, u in sorted(res.uploads.items())},
               "clients": ids, "accepted": stats["accepted"], "rejected": rejected,
               "steps": stats["steps"],
               "rebuild_seconds": (round(sum(rebuild.values()) / len(rebuild), 4) if rebuild else None),
               "rebuild_seconds_per_client": {c: round(v, 4) for c, v in rebuild.items()},
               "client_seconds": {str(c): {k: round(v, 4) for k, v in t.items()}
                                  for c, t in sorted(res.timings.items())},
               "exchange_seconds": round(res.seconds, 3)}
        if do_rouge:
            row["rouge_l"] = rl
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        if metrics:
            _append(metrics, row)
            S.save_checkpoint(out, server)
        log.info("round %d: train %s, held-out %s, clients %s, rejected %s, wire down %d up %d bytes, "
                 "rebuild %s s", rnd, row["train_loss"], row["eval_loss"], stats["accepted"],
                 sorted(rejected), res.wire_down, res.wire_up, row["rebuild_seconds"])

    summary = {"engine": "flower",
               **S.run_summary(cfg, ws, server, rows, held, eval_ex, evaluate_global, t_start),
               "payload_bytes_down_total": int(sum(r.get("payload_bytes_down", 0) for r in rows)),
               "payload_bytes_up_total": int(sum(r.get("payload_bytes_up", 0) for r in rows)),
               "device": str(ws.device)}
    if out is not None:
        S.atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
        try:
            S.write_plots(out, rows)
        except ImportError as exc:  # matplotlib missing: the numbers are in metrics.jsonl
            log.warning("no plots: %s", exc)
    return summary
