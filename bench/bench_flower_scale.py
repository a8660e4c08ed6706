"""Flower's simulation engine (Ray) against kseed-fed's in-process simulation at the paper's scale
(issue #21 item 5): 200 clients, 10 sampled a round, the embedded default model.

    python bench/bench_flower_scale.py                          # 3 rounds, tau = 10, both engines
    python bench/bench_flower_scale.py --local-steps 100        # the driver's default tau
    python bench/bench_flower_scale.py --engines inprocess      # one engine only

Each engine runs as its own process tree, one after the other (never both at once):
  inprocess  kseed-fed --num-clients 200 --clients-per-round 10 ... --threads T (clients in turn)
  flower     python -m kseed.flower simulation --cpus-per-client C num-clients=200 ... (Ray runs as
             many virtual clients at once as the cores allow, each with C threads)
with the same run config.  The embedded default holds 2,000 examples: 200 Dirichlet(0.5) clients of
at least 10 examples each need more, so the data is --embedded-examples (default 15,000, Dolly-15K's
size).  Reported per engine: the wall seconds of the whole command (start-up included), the seconds
of each round from metrics.jsonl ("seconds": sampling, the clients' exchange, aggregation and the
held-out evaluation), and the peak memory of the whole process tree, sampled every --interval s:
the sum of RSS (counts pages shared between processes once per process, e.g. torch's libraries in
every Ray worker) and the sum of PSS (shares each shared page among the processes mapping it: the
tree's real footprint).  The Flower tree is every process carrying the run's FLWR_HOME (the SuperLink,
the simulation process, Ray's GCS, raylet and workers), plus the launcher.  Both runs end with the
same accumulators (tests/test_flower_sim.py checks that bitwise at 2 clients); this bench checks the
two metrics files agree on each round's clients and held-out loss.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (os.path.join(ROOT, "python"), ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)


def _tree(root_pid: int, flwr_home=None) -> set:
    """root_pid, its descendants and (Flower) every process marked with FLWR_HOME=flwr_home."""
    import psutil

    pids = set()
    try:
        root = psutil.Process(root_pid)
        pids = {root_pid, *(c.pid for c in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        pass
    if flwr_home is not None:
        from kseed.flower.deploy import marked_processes

        pids.update(marked_processes(flwr_home))
    return pids


def _memory(pids) -> tuple:
    """(sum of RSS, sum of PSS, processes) in bytes over pids that are still alive."""
    import psutil

    rss = pss = n = 0
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss, pss, n = rss + info.rss, pss + info.pss, n + 1
    return rss, pss, n


def run_measured(cmd, env, interval: float, flwr_home=None, log=None) -> dict:
    """Run cmd, sampling the memory of its process tree; wall seconds and peaks."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log or subprocess.DEVNULL,
                            text=True, start_new_session=True)
    peak_rss = peak_pss = peak_n = 0
    while proc.poll() is None:
        rss, pss, n = _memory(_tree(proc.pid, flwr_home))
        peak_rss, peak_pss, peak_n = max(peak_rss, rss), max(peak_pss, pss), max(peak_n, n)
        time.sleep(interval)
    out = proc.stdout.read()
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1), "stdout": out,
            "peak_rss_gib": round(peak_rss / 2**30, 3), "peak_pss_gib": round(peak_pss / 2**30, 3),
            "peak_processes": peak_n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default="inprocess,flower", help="comma list: inprocess, flower")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-clients", type=int, default=200)
    ap.add_argument("--clients-per-round", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=10, help="tau (kseed-fed's default is 100)")
    ap.add_argument("--embedded-examples", type=int, default=15000)
    ap.add_argument("--threads", type=int, default=1, help="in-process: torch threads")
    ap.add_argument("--cpus-per-client", type=int, default=1, help="Flower: Ray CPUs (= threads) per client")
    ap.add_argument("--interval", type=float, default=1.0, help="memory sampling period, seconds")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)

    from kseed import simulation as S

    work = a.workdir or tempfile.mkdtemp(prefix="kseed-flower-scale-")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "python"), env.get("PYTHONPATH", "")])
    rc = {"rounds": a.rounds, "num-clients": a.num_clients, "clients-per-round": a.clients_per_round,
          "local-steps": a.local_steps, "embedded-examples": a.embedded_examples}
    results = {"config": rc, "cores": os.cpu_count(), "engines": {}}
    for engine in [e.strip() for e in a.engines.split(",") if e.strip()]:
        out = os.path.join(work, engine)
        flwr_home = None
        if engine == "inprocess":
            cmd = [sys.executable, "-m", "kseed", *(f"--{k}={v}" for k, v in rc.items()),
                   "--threads", str(a.threads), "--out", out, "--quiet"]
        elif engine == "flower":
            wd = os.path.join(work, "flower-work")
            flwr_home = os.path.join(wd, "flwr-home")
            cmd = [sys.executable, "-m", "kseed.flower", "simulation", "--workdir", wd,
                   "--cpus-per-client", str(a.cpus_per_client), *(f"{k}={v}" for k, v in rc.items()),
                   f"out={out}", f"round-timeout={3600.0}"]
        else:
            ap.error(f"unknown engine {engine!r}")
        with open(os.path.join(work, f"{engine}.log"), "w") as log:
            r = run_measured(cmd, env, a.interval, flwr_home, log)
        rows = S.read_metrics(out) if os.path.exists(os.path.join(out, "metrics.jsonl")) else []
        r.pop("stdout")
        r["round_seconds"] = [row["seconds"] for row in rows if row["round"] > 0]
        r["clients"] = [row.get("clients") for row in rows if row["round"] > 0]
        r["eval_loss"] = [row.get("eval_loss") for row in rows]
        r["log"] = os.path.join(work, f"{engine}.log")
        results["engines"][engine] = r
        print(engine, json.dumps(r), flush=True)
    eng = results["engines"]
    if "inprocess" in eng and "flower" in eng:
        i, f = eng["inprocess"], eng["flower"]
        results["same_clients_and_loss"] = (i["clients"] == f["clients"] and i["eval_loss"] == f["eval_loss"])
        if i["round_seconds"] and f["round_seconds"]:
            mi = sorted(i["round_seconds"])[len(i["round_seconds"]) // 2]
            mf = sorted(f["round_seconds"])[len(f["round_seconds"]) // 2]
            results["median_round_s"] = {"inprocess": mi, "flower": mf, "flower_over_inprocess": round(mf / mi, 2)}
        print("summary", json.dumps({k: v for k, v in results.items() if k != "engines"}), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0 if all(r["rc"] == 0 for r in eng.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
