"""python -m kseed.flower: the kseed Flower app from the command line.

  python -m kseed.flower appdir
      print the path of the Flower app dir shipped with kseed (for `flwr run APP_DIR CONNECTION`)
  python -m kseed.flower local [--nodes N] [--threads-per-node T] [--tls] [--cache-dir DIR] [--workdir DIR]
                              [KEY=VALUE ...]
      try the deployment engine on this machine: start a SuperLink and N SuperNodes on 127.0.0.1
      (with --tls: a throw-away CA, TLS and SuperNode authentication), run the app with the given
      run-config values (e.g. rounds=3 num-clients=2 out=/tmp/run), print the run's metrics, and stop
      every process.  --cache-dir: each SuperNode keeps its client's model in DIR/node<I> (node
      config cache-dir; FedMeZO / MeZO then send it only the rounds it missed).  Each SuperNode's
      ClientApps get T threads (default: this machine's cores
      divided among the SuperNodes; 0: torch's and OpenMP's defaults)
  python -m kseed.flower simulation [--supernodes N] [--cpus-per-client C] [--gpus-per-client G]
                                    [--workdir DIR] [KEY=VALUE ...]
      run the same app on Flower's simulation engine (Ray; needs kseed[flower-simulation]): N virtual
      SuperNodes (default num-clients), each virtual client with C CPUs (= its threads; default the
      cores divided among clients-per-round) and G GPUs (default 0; 1 = one GPU per client, with
      device=cuda in the run config); prints the run's metrics
"""
import argparse
import json
import os
import sys
import tempfile
import time


def _value(text: str):
    """A KEY=VALUE value as TOML would read it: bool, int, float, else string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _parser(cmd: str, summary: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m kseed.flower {cmd}", description=summary)
    p.add_argument("--workdir", default=None, help="where Flower state and logs go (default: a temp dir)")
    p.add_argument("config", nargs="*", metavar="KEY=VALUE", help="run-config values")
    return p


def _run_config(p: argparse.ArgumentParser, items) -> dict:
    rc = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            p.error(f"run-config values are KEY=VALUE, got {item!r}")
        rc[key] = _value(val)
    return rc


def _run_and_report(d, rc: dict, t0: float, federation_config=None) -> int:
    """Submit the run, wait for it, print its metrics rows; 0 if it completed."""
    from kseed import simulation as S
    from kseed.flower import app_dir

    run_id = d.start_run(app_dir(), rc, federation_config)
    info = d.wait_run(run_id, timeout=24 * 3600)
    print(f"run {run_id}: {info['status']} after {time.perf_counter() - t0:.1f} s; Flower's traffic "
          f"counter: {json.dumps(info.get('network-traffic'))}", file=sys.stderr)
    for row in S.read_metrics(rc["out"]):
        print(json.dumps(row))
    if info["status"] != "finished:completed":
        print(d.run_log(run_id)[-4000:], file=sys.stderr)
        return 1
    return 0


def local(argv) -> int:
    from kseed.flower.deploy import Deployment, make_certificates, make_node_key

    p = _parser("local", "Run the kseed app on a SuperLink and N SuperNodes on 127.0.0.1.")
    p.add_argument("--nodes", type=int, default=None,
                   help="SuperNodes to start (default: num-clients from the run config, else 2)")
    p.add_argument("--threads-per-node", type=int, default=None,
                   help="threads for each SuperNode's ClientApps (default: the cores divided among the "
                        "SuperNodes, at least 1; 0: torch's and OpenMP's defaults)")
    p.add_argument("--tls", action="store_true", help="TLS with a throw-away CA and SuperNode authentication")
    p.add_argument("--cache-dir", default=None,
                   help="keep each node's model in DIR/node<I> (node config cache-dir; default: none)")
    a = p.parse_args(argv)
    rc = _run_config(p, a.config)
    nodes = a.nodes or int(rc.get("num-clients", 2))
    if nodes < 1:
        p.error("--nodes must be >= 1")
    if a.threads_per_node is not None and a.threads_per_node < 0:
        p.error("--threads-per-node must be >= 0")
    threads = a.threads_per_node if a.threads_per_node is not None else max(1, usable_cores() // nodes)
    rc.setdefault("num-clients", nodes)
    rc.setdefault("clients-per-round", min(2, nodes))
    workdir = a.workdir or tempfile.mkdtemp(prefix="kseed-flower-")
    rc.setdefault("out", f"{workdir}/out")
    tls = make_certificates(f"{workdir}/certs") if a.tls else None
    d = Deployment(workdir, tls=tls, supernode_auth=a.tls)
    t0 = time.perf_counter()
    try:
        d.start_superlink()
        for pid in range(nodes):
            key = None
            if a.tls:
                key, pub = make_node_key(f"{workdir}/keys/node{pid}")
                d.register_node(pub)
            cache = (f'cache-dir="{os.path.abspath(a.cache_dir)}/node{pid}"' if a.cache_dir
                     else "")
            d.start_supernode(pid, int(rc["num-clients"]), private_key=key, max_wait_time=120,
                              threads=threads or None, node_config=cache)
        d.wait_nodes(nodes)
        print(f"SuperLink on {d.address} ({'TLS + node auth' if a.tls else 'insecure'}), {nodes} SuperNodes "
              f"with {threads or 'default'} threads each; logs in {d.logs}", file=sys.stderr)
        return _run_and_report(d, rc, t0)
    finally:
        d.close()


def simulation(argv) -> int:
    from kseed.flower.deploy import Deployment

    p = _parser("simulation", "Run the kseed app on Flower's simulation engine (Ray) on this machine.")
    p.add_argument("--supernodes", type=int, default=None,
                   help="virtual SuperNodes, one per partition (default: num-clients, else 2)")
    p.add_argument("--cpus-per-client", type=int, default=None,
                   help="CPUs (and threads) per virtual client (default: the cores divided among "
                        "clients-per-round, at least 1)")
    p.add_argument("--gpus-per-client", type=float, default=0.0,
                   help="GPUs per virtual client (default 0; 1: one GPU each; 0.5: two clients share one)")
    a = p.parse_args(argv)
    rc = _run_config(p, a.config)
    nodes = a.supernodes or int(rc.get("num-clients", 2))
    if nodes < 1:
        p.error("--supernodes must be >= 1")
    rc.setdefault("num-clients", nodes)
    if int(rc["num-clients"]) != nodes:
        p.error(f"num-clients={rc['num-clients']} must equal --supernodes={nodes} (one partition each)")
    rc.setdefault("clients-per-round", min(2, nodes))
    cpus = a.cpus_per_client or max(1, usable_cores() // max(1, min(int(rc["clients-per-round"]), nodes)))
    if cpus < 1 or a.gpus_per_client < 0:
        p.error("--cpus-per-client must be >= 1 and --gpus-per-client >= 0")
    workdir = a.workdir or tempfile.mkdtemp(prefix="kseed-flower-sim-")
    rc.setdefault("out", f"{workdir}/out")
    fed = {"num-supernodes": nodes, "client-resources-num-cpus": cpus,
           "client-resources-num-gpus": float(a.gpus_per_client)}
    d = Deployment(workdir, simulation=True)
    t0 = time.perf_counter()
    try:
        d.start_superlink()
        print(f"SuperLink on {d.address} with the simulation engine: {nodes} virtual SuperNodes, "
              f"{cpus} CPUs and {a.gpus_per_client:g} GPUs per client; logs in {d.logs}", file=sys.stderr)
        return _run_and_report(d, rc, t0, fed)
    finally:
        d.close()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["appdir"] and len(argv) == 1:
        from kseed.flower import app_dir

        print(app_dir())
        return 0
    if argv[:1] == ["local"]:
        return local(argv[1:])
    if argv[:1] == ["simulation"]:
        return simulation(argv[1:])
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
