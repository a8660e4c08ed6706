"""FedMeZO and MeZO on Flower: the ServerApp and ClientApp, unchanged, end bitwise where the in-process
run ends (the same history, losses and uploads), on an in-process grid (no processes), on the
deployment engine (SuperLink + SuperNodes, one of them keeping its model in a node-config cache-dir)
and on the simulation engine (Ray).  The engine tests are slow.  Select with `pytest -k flower`."""
import json

import pytest

pytest.importorskip("flwr")

from kseed import simulation as S  # noqa: E402
from kseed.flower import app_dir  # noqa: E402
from kseed.flower.deploy import Deployment  # noqa: E402
from kseed.flower.runconfig import default_run_config, fed_config  # noqa: E402
from test_flower import SMALL, InProcessGrid, _task_identity  # noqa: E402

MEZO = dict(SMALL, **{"local-steps": 2, "eval-size": 8})


class CachingGrid(InProcessGrid):
    """The in-process grid, with node-config cache-dir on the nodes of ``caches`` {partition: dir}."""

    def __init__(self, run_config, num_partitions, caches):
        super().__init__(run_config, num_partitions)
        self.caches = caches

    def _answer(self, m):
        from flwr.app import Context, RecordDict

        from kseed.flower import client_app

        node = m.metadata.dst_node_id
        conf = {"partition-id": node - 100, "num-partitions": self.num_partitions}
        if node - 100 in self.caches:
            conf["cache-dir"] = self.caches[node - 100]
        ctx = Context(run_id=1, node_id=node, node_config=conf, state=RecordDict(),
                      run_config=self.run_config)
        fn = client_app.query if m.metadata.message_type == "query" else client_app.train
        reply = fn(m, ctx)
        reply.metadata.__dict__["_src_node_id"] = node
        return reply


def _same_run(out, sim_out, *, rounds):
    fl = S.read_checkpoint(str(out))["server"]
    si = S.read_checkpoint(str(sim_out))["server"]
    assert fl["round"] == si["round"] == rounds
    assert fl["history"]["rounds"] == rounds and fl["history"]["pairs"] > 0
    for key in ("history", "client_loss", "client_diff"):
        assert fl[key] == si[key], key
    rows, sim_rows = S.read_metrics(str(out)), S.read_metrics(str(sim_out))
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    for r, s in zip(rows, sim_rows):
        for key in ("train_loss", "eval_loss", "eval_loss_example_mean", "clients", "steps",
                    "bytes_up_per_client", "rejected"):
            if key in s:
                assert r[key] == s[key], (r["round"], key)
    return rows, sim_rows


@pytest.mark.parametrize("method", ["fedmezo", "mezo"])
def test_flower_serverapp_methods_match_simulation(tmp_path, one_thread, method):
    """Over an in-process grid (the ClientApp's own functions answer): FedMeZO with node 0 keeping
    its model in a cache-dir (its down messages carry only the rounds it missed; node 1's the whole
    history), and MeZO on its one node, end with the in-process run's history, bitwise."""
    from kseed.flower.server_app import run_federation

    out = tmp_path / "flower"
    n = 1 if method == "mezo" else 2
    rc = dict(MEZO, method=method, rounds=3, out=str(out), **{"node-wait-timeout": 5.0})
    if method == "mezo":
        del rc["num-clients"], rc["clients-per-round"]
    with _task_identity():
        run_federation(CachingGrid(rc, n, {0: str(tmp_path / "cache0")}), rc)
    sim_out = tmp_path / "sim"
    S.run(fed_config(rc), str(sim_out), progress=False)
    rows, sim_rows = _same_run(out, sim_out, rounds=3)
    # bytes down: in-process nothing to carry (144 bytes); on Flower the rounds each client lacks
    assert all(v == 144 for r in sim_rows[1:] for v in r["bytes_down_per_client"].values())
    assert rows[1]["bytes_down_per_client"]["0"] == 144
    assert rows[2]["bytes_down_per_client"]["0"] == rows[3]["bytes_down_per_client"]["0"] > 144
    if method == "fedmezo":  # node 1 has no cache: the whole history, growing
        assert rows[3]["bytes_down_per_client"]["1"] > rows[3]["bytes_down_per_client"]["0"]


@pytest.mark.slow
def test_flower_deployment_fedmezo_with_a_cache_matches_simulation(tmp_path):
    """FedMeZO on SuperLink + 2 SuperNodes (node 0 with cache-dir), 3 rounds: the in-process run's
    history, losses and uploads, bitwise."""
    d = Deployment(tmp_path / "deploy")
    try:
        d.start_superlink()
        for pid in range(2):
            d.start_supernode(pid, 2, max_wait_time=120,
                              node_config=f'cache-dir="{tmp_path / "cache"}"' if pid == 0 else "")
        d.wait_nodes(2)
        rc = dict(MEZO, method="fedmezo", rounds=3, out=str(tmp_path / "flower"),
                  **{"round-timeout": 300.0})
        run_id = d.start_run(app_dir(), rc)
        S.run(fed_config(rc), str(tmp_path / "sim"), progress=False)
        info = d.wait_run(run_id, timeout=600)
        assert info["status"] == "finished:completed", d.run_log(run_id)[-4000:]
    finally:
        d.close()
    assert d.leftover() == []
    rows, _ = _same_run(tmp_path / "flower", tmp_path / "sim", rounds=3)
    assert rows[3]["payload_bytes_down"] < rows[3]["bytes_down"]
    assert all(r["rebuild_seconds"] is not None for r in rows[1:])


@pytest.mark.slow
def test_flower_simulation_engine_mezo_matches_simulation(tmp_path):
    from flower_cli import run_kseed_flower

    out = tmp_path / "flower-sim"
    rc = dict(MEZO, method="mezo", rounds=2, out=str(out), **{"round-timeout": 300.0})
    del rc["num-clients"], rc["clients-per-round"]
    res = run_kseed_flower("simulation", tmp_path / "w",
                           ["--supernodes", "1", "--cpus-per-client", "1",
                            "num-clients=1", *(f"{k}={v}" for k, v in rc.items())], timeout=420)
    assert res.returncode == 0, res.stderr[-4000:]
    S.run(fed_config(rc), str(tmp_path / "sim"), progress=False)
    _same_run(out, tmp_path / "sim", rounds=2)
    assert [json.loads(line) for line in res.stdout.splitlines()] == S.read_metrics(str(out))


def test_flower_run_config_method():
    """The app's run config holds every key at its default: method=mezo takes MeZO's fixed fields
    there, and refuses one set to another value by name."""

    cfg = fed_config(dict(default_run_config(), method="mezo"))
    assert (cfg.method, cfg.num_clients, cfg.clients_per_round, cfg.g_clip) == ("mezo", 1, 1, 0.0)
    assert fed_config(dict(default_run_config(), method="fedmezo")).num_clients == 8
    with pytest.raises(ValueError, match="--method mezo needs --num-clients 1, got 3"):
        fed_config(dict(default_run_config(), method="mezo", **{"num-clients": 3}))
    with pytest.raises(ValueError, match="--method must be fedkseed | fedmezo | mezo"):
        fed_config({"method": "fedprox"})


@pytest.mark.parametrize("method", ["fedkseed", "fedmezo", "mezo", "ferret"])
def test_flower_run_config_takes_method_defaults_as_kseed_fed(method):
    """A method's own defaults (Ferret's lr 0.03 and 10 local steps) apply on Flower as with
    kseed-fed (issue 19): the app's full default run config with method=M is `kseed-fed --method M`'s
    FedConfig, field for field; a key the run config sets still wins."""
    from kseed import cli, methods

    assert method in methods.NAMES
    want = cli.resolve_config(cli._parser().parse_args(["--method", method]))
    assert fed_config(dict(default_run_config(), method=method)) == want
    assert fed_config({"method": method}) == want
    if method == "ferret":
        assert (want.lr, want.local_steps) == (0.03, 10)
        cfg = fed_config(dict(default_run_config(), method=method, lr=0.01, **{"local-steps": 3}))
        assert (cfg.lr, cfg.local_steps) == (0.01, 3)
