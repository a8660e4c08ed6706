"""python -m kseed.flower: the kseed Flower app from the command line.

  python -m kseed.flower appdir
      print the path of the Flower app dir shipped with kseed (for `flwr run APP_DIR CONNECTION`)
  python -m kseed.flower local [--nodes N] [--tls] [--workdir DIR] [KEY=VALUE ...]
      try the deployment engine on this machine: start a SuperLink and N SuperNodes on 127.0.0.1
      (with --tls: a throw-away CA, TLS and SuperNode authentication), run the app with the given
      run-config values (e.g. rounds=3 num-clients=2 out=/tmp/run), print the run's metrics, and stop
      every process
"""
import argparse
import json
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


def local(argv) -> int:
    from kseed import simulation as S
    from kseed.flower import app_dir
    from kseed.flower.deploy import Deployment, make_certificates, make_node_key

    p = argparse.ArgumentParser(prog="python -m kseed.flower local", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=None,
                   help="SuperNodes to start (default: num-clients from the run config, else 2)")
    p.add_argument("--tls", action="store_true", help="TLS with a throw-away CA and SuperNode authentication")
    p.add_argument("--workdir", default=None, help="where Flower state and logs go (default: a temp dir)")
    p.add_argument("config", nargs="*", metavar="KEY=VALUE", help="run-config values")
    a = p.parse_args(argv)
    rc = {}
    for item in a.config:
        key, sep, val = item.partition("=")
        if not sep or not key:
            p.error(f"run-config values are KEY=VALUE, got {item!r}")
        rc[key] = _value(val)
    nodes = a.nodes or int(rc.get("num-clients", 2))
    if nodes < 1:
        p.error("--nodes must be >= 1")
    rc.setdefault("num-clients", nodes)
    rc.setdefault("clients-per-round", min(2, nodes))
    workdir = a.workdir or tempfile.mkdtemp(prefix="kseed-flower-")
    out = rc.setdefault("out", f"{workdir}/out")
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
            d.start_supernode(pid, int(rc["num-clients"]), private_key=key, max_wait_time=120)
        d.wait_nodes(nodes)
        print(f"SuperLink on {d.address} ({'TLS + node auth' if a.tls else 'insecure'}), {nodes} SuperNodes; "
              f"logs in {d.logs}", file=sys.stderr)
        run_id = d.start_run(app_dir(), rc)
        info = d.wait_run(run_id, timeout=24 * 3600)
        print(f"run {run_id}: {info['status']} after {time.perf_counter() - t0:.1f} s; Flower's traffic "
              f"counter: {json.dumps(info.get('network-traffic'))}", file=sys.stderr)
        for row in S.read_metrics(out):
            print(json.dumps(row))
        if info["status"] != "finished:completed":
            print(d.run_log(run_id)[-4000:], file=sys.stderr)
            return 1
        return 0
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
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
