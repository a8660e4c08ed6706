"""The kseed ServerApp: the server of the run's method (kseed.methods, run-config key ``method``: FedKSeed's
kseed.server.FedKSeedServer, FedMeZO's, MeZO's) driven by Flower.

The round loop, the run directory and the evaluation are the in-process simulation's (kseed.rounds,
kseed.rundir, kseed.task); Flower only carries the messages.  Round r: the server samples its clients
from the run seed (partition ids, not Flower node ids), makes each one's DownMessage, Flower carries
them to the nodes holding those partitions (kseed.flower.exchange), the replies that arrive within
round-timeout go to server.aggregate (which rejects malformed uploads and needs at least min-replies
valid ones), the global model is evaluated, and a metrics.jsonl row and the checkpoint are written to
`out`.  With the same config the server state (FedKSeed's accumulators, FedMeZO's seed history) ends
bitwise equal to the simulation's.

Resume: with resume=true, a run continues from the checkpoint in `out` (the run config must match the
checkpoint's, except rounds and the evaluation cadence), bitwise as if it had not stopped.

metrics.jsonl has the simulation's keys; here bytes_down / bytes_up count what crosses the wire
(Flower's serialized messages), payload_bytes_down / payload_bytes_up the driver's own messages inside
them (the simulation's bytes_down / bytes_up), and rebuild_seconds the clients' fused rebuild time.
"""
from __future__ import annotations

import logging
import sys
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()
log = logging.getLogger("kseed.flower")


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
    _log_to_stderr()  # this process is the ServerApp's own: its stderr is what Flower streams
    run_federation(grid, context.run_config)


def run_federation(grid, run_config) -> dict:
    """The whole run on `grid`; returns the summary (also written to out/summary.json)."""
    from kseed.rounds import Federation

    from .common import BASE_HASH_KEY
    from .exchange import discover_partitions, exchange
    from .runconfig import extra, fed_config

    cfg = fed_config(run_config)
    out = extra(run_config, "out") or None
    round_timeout = extra(run_config, "round-timeout")
    max_up = extra(run_config, "max-upload-bytes")
    with Federation(cfg, out, resume=extra(run_config, "resume"), device=extra(run_config, "device"),
                    rebuild_cache=False, engine="flower", hints=("resume=true", "out"),
                    tensorboard=extra(run_config, "tensorboard") or None) as fed:
        t0 = time.perf_counter()
        node_of = discover_partitions(grid, cfg.num_clients, extra(run_config, "node-wait-timeout"))
        log.info("partitions held by nodes: %s", {p: node_of[p] for p in sorted(node_of)})
        absent = [p for p in range(cfg.num_clients) if p not in node_of]
        if absent:
            log.warning("no node holds partitions %s: their rounds count them as no reply", absent)
        start = {"nodes": {str(p): str(n) for p, n in sorted(node_of.items())},
                 "discover_seconds": round(time.perf_counter() - t0, 3)}
        if fed.rows:
            log.info("resuming %s after round %d", out, fed.server.round)
        fields = {BASE_HASH_KEY: str(fed.ws.identity.get("hash", ""))[:16]}

        def deliver(rnd, downs):
            return exchange(grid, downs, node_of, rnd, timeout=round_timeout, max_upload_bytes=max_up,
                            fields=fields)

        return fed.run(deliver, round0_fields=start)
