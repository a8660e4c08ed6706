"""kseed's ServerApp and ClientApp, unchanged, on Flower's simulation engine (Ray): 2 virtual clients on
CPU end with the in-process simulation's accumulators, bitwise.  Select with `pytest -k flower`."""
import json

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")  # the kseed[flower-simulation] extra

from flower_cli import run_kseed_flower  # noqa: E402
from kseed import simulation as S  # noqa: E402
from kseed.flower.runconfig import fed_config  # noqa: E402
from test_flower import SMALL, _same_server_state  # noqa: E402


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
