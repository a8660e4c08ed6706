"""`python -m kseed.flower local` from a virtual environment that is not activated, and the ClientApp's
thread budget.  Select with `pytest -k flower`."""
import json
import os

import pytest
import torch

pytest.importorskip("flwr")

from flower_cli import run_kseed_flower  # noqa: E402
from kseed.flower import __main__ as cli  # noqa: E402
from kseed.flower.client_app import THREAD_ENV, apply_threads, thread_budget  # noqa: E402
from kseed.flower.deploy import _import_roots, flower_bin_dirs  # noqa: E402
from test_flower import SMALL  # noqa: E402


def test_flower_local_without_activated_venv(tmp_path):
    """PATH without this interpreter's bin dir (as `/path/to/venv/bin/python -m kseed.flower local`
    runs from a shell that never activated the venv): Flower's programs, including the
    flower-superexec the SuperLink starts by name, still come from this environment.  The default
    thread budget (the cores divided among the SuperNodes) reaches the ClientApp."""
    import shutil

    path = os.defpath
    if any(shutil.which(p, path=path) for p in ("flower-superexec", "flower-superlink", "flwr")):
        pytest.skip(f"Flower's programs are on {path} too: the test would not show anything")
    assert not set(flower_bin_dirs()) & set(path.split(os.pathsep))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PATH", "PYTHONPATH")}
    env.update(PATH=path, PYTHONPATH=os.pathsep.join(_import_roots()))

    out = tmp_path / "out"
    rc = dict(SMALL, rounds=1, **{"num-clients": 1, "clients-per-round": 1, "local-steps": 2,
                                  "out": str(out)})
    res = run_kseed_flower("local", tmp_path / "w", [f"{k}={v}" for k, v in rc.items()], env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["accepted"] == [0]
    assert "finished:completed" in res.stderr
    log = (tmp_path / "w" / "logs" / "supernode-0.log").read_text()  # 1 SuperNode: every core
    assert f"kseed ClientApp: partition 0, {cli.usable_cores()} threads\n" in log, log[-3000:]


def test_flower_thread_budget():
    assert thread_budget({"partition-id": 0, "num-partitions": 2}) is None  # outside Ray: no budget
    assert thread_budget({"num-threads": 3}) == 3
    assert thread_budget({"num-threads": "2"}) == 2
    for bad in (0, -1, 1.5, "two", True):
        with pytest.raises(ValueError, match="num-threads"):
            thread_budget({"num-threads": bad})
    before = torch.get_num_threads(), {k: os.environ.get(k) for k in THREAD_ENV}
    try:
        apply_threads(1)
        assert torch.get_num_threads() == 1
        assert all(os.environ[k] == "1" for k in THREAD_ENV)
    finally:
        torch.set_num_threads(before[0])
        for k, v in before[1].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_flower_cli_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["simulation", "--supernodes", "3", "num-clients=2"])
    assert e.value.code == 2 and "num-clients=2 must equal --supernodes=3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["local", "--threads-per-node", "-1"])
    assert e.value.code == 2 and "--threads-per-node" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["simulation", "rounds"])
    assert e.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err
