"""kseed's ServerApp and ClientApp, unchanged, on Flower's simulation engine (Ray): FedKSeed with 2
virtual clients on CPU (through `python -m kseed.flower simulation`) ends with the in-process
simulation's accumulators, bitwise; FedMeZO, Ferret and MeZO, submitted together to one SuperLink
running the simulation engine, end with the in-process runs' histories.  Select with
`pytest -k flower`."""
import json

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")  # the kseed[flower-simulation] extra

from flower_cli import run_kseed_flower  # noqa: E402
from kseed import simulation as S  # noqa: E402
from kseed.flower import app_dir  # noqa: E402
from kseed.flower.deploy import Deployment  # noqa: E402
from kseed.flower.runconfig import fed_config  # noqa: E402
from test_flower import MEZO, SMALL, _same_run, _same_server_state  # noqa: E402


def test_flower_simulation_engine_matches_simulation(tmp_path):
    out, sim_out = tmp_path / "flower-sim", tmp_path / "sim"
    rc = dict(SMALL, rounds=2, out=str(out), **{"local-steps": 2, "round-timeout": 300.0})
    res = run_kseed_flower("simulation", tmp_path / "w",
                           ["--cpus-per-client", "1", *(f"{k}={v}" for k, v in rc.items())], timeout=420)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "2 virtual SuperNodes, 1 CPUs and 0 GPUs per client" in res.stderr

    S.run(fed_config(rc), str(sim_out), progress=False)
    fl, sim = S.read_checkpoint(str(out))["server"], S.read_checkpoint(str(sim_out))["server"]
    assert fl["round"] == 2
    _same_server_state(fl, sim)

    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert rows == S.read_metrics(str(out))
    sim_rows = S.read_metrics(str(sim_out))
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r, s in zip(rows[1:], sim_rows[1:]):
        assert r["clients"] == s["clients"] == [0, 1] and r["accepted"] == [0, 1] and r["rejected"] == {}
        assert r["train_loss"] == s["train_loss"] and r["eval_loss"] == s["eval_loss"]
        assert r["payload_bytes_down"] == s["bytes_down"] and r["payload_bytes_up"] == s["bytes_up"]


@pytest.mark.slow
def test_flower_simulation_engine_methods_match_simulation(tmp_path):
    """FedMeZO and Ferret on 2 virtual SuperNodes and MeZO on 1, 2 rounds each, submitted together
    to one SuperLink that runs the simulation engine: the in-process runs' histories, losses and
    uploads, bitwise."""
    d = Deployment(tmp_path / "w", simulation=True)
    runs = {}
    try:
        d.start_superlink()
        for method in ("fedmezo", "ferret", "mezo"):
            rc = dict(MEZO, method=method, rounds=2, out=str(tmp_path / method),
                      **{"round-timeout": 300.0})
            if method == "mezo":
                del rc["num-clients"], rc["clients-per-round"]
            fed = {"num-supernodes": 1 if method == "mezo" else 2, "client-resources-num-cpus": 1,
                   "client-resources-num-gpus": 0.0}
            runs[method] = rc, d.start_run(app_dir(), rc, fed)
        for method, (rc, _) in runs.items():  # the in-process runs, while Flower's run
            S.run(fed_config(rc), str(tmp_path / f"{method}-sim"), progress=False)
        for method, (rc, run_id) in runs.items():
            info = d.wait_run(run_id, timeout=600)
            assert info["status"] == "finished:completed", (method, d.run_log(run_id)[-4000:])
    finally:
        d.close()
    assert d.leftover() == [], "processes left behind"
    for method, (rc, _) in runs.items():
        _same_run(tmp_path / method, tmp_path / f"{method}-sim", rounds=2)
