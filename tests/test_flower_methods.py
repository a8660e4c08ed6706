"""FedMeZO, MeZO and Ferret on Flower: the ServerApp and ClientApp, unchanged, end bitwise where the
in-process run ends (the same history, losses and uploads), on an in-process grid (no processes);
the run config's method defaults.  The same on the deployment engine: test_flower.py
(test_flower_deployment_methods_match_simulation, on its shared deployment); on the simulation
engine: test_flower_sim.py.  Select with `pytest -k flower`."""
import pytest

pytest.importorskip("flwr")

from kseed import simulation as S  # noqa: E402
from kseed.flower.runconfig import default_run_config, fed_config  # noqa: E402
from test_flower import MEZO, InProcessGrid, _same_run, _task_identity  # noqa: E402


class CachingGrid(InProcessGrid):
    """The in-process grid, with node-config cache-dir on the nodes of ``caches`` {partition: dir}
    and the entries of ``node_config`` {partition: {key: value}} in theirs."""

    def __init__(self, run_config, num_partitions, caches, node_config=None):
        super().__init__(run_config, num_partitions)
        self.caches = caches
        self.node_config = node_config or {}

    def _answer(self, m):
        from flwr.app import Context, RecordDict

        from kseed.flower import client_app

        node = m.metadata.dst_node_id
        conf = {"partition-id": node - 100, "num-partitions": self.num_partitions}
        if node - 100 in self.caches:
            conf["cache-dir"] = self.caches[node - 100]
        conf.update(self.node_config.get(node - 100, {}))
        ctx = Context(run_id=1, node_id=node, node_config=conf, state=RecordDict(),
                      run_config=self.run_config)
        fn = client_app.query if m.metadata.message_type == "query" else client_app.train
        reply = fn(m, ctx)
        reply.metadata.__dict__["_src_node_id"] = node
        return reply


@pytest.mark.parametrize("method", ["fedmezo", "mezo", "ferret"])
def test_flower_serverapp_methods_match_simulation(tmp_path, one_thread, method):
    """Over an in-process grid (the ClientApp's own functions answer): FedMeZO and Ferret with node 0
    keeping its model in a cache-dir (its down messages carry only the rounds it missed; node 1's the
    whole history), and MeZO on its one node, end with the in-process run's history, bitwise."""
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
    # bytes down: in-process nothing to carry (the down message's header alone); on Flower the
    # rounds each client lacks
    empty = sim_rows[1]["bytes_down_per_client"]["0"]
    assert all(v == empty for r in sim_rows[1:] for v in r["bytes_down_per_client"].values())
    assert rows[1]["bytes_down_per_client"]["0"] == empty
    assert rows[2]["bytes_down_per_client"]["0"] > empty and rows[3]["bytes_down_per_client"]["0"] > empty
    if method != "ferret":  # one round of tau pairs a client (Ferret's round sizes vary)
        assert rows[2]["bytes_down_per_client"]["0"] == rows[3]["bytes_down_per_client"]["0"]
    if method != "mezo":  # node 1 has no cache: the whole history, growing
        assert rows[3]["bytes_down_per_client"]["1"] > rows[3]["bytes_down_per_client"]["0"]


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


@pytest.mark.parametrize("method", __import__("kseed.methods", fromlist=["NAMES"]).NAMES)
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
