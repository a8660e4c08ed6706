"""kseed on Flower: the ServerApp logic over an in-process grid (the ClientApp's own functions answer
its messages; no processes), and Flower's deployment engine with real SuperLink / SuperNode processes
on 127.0.0.1.

One module-scoped deployment (SuperLink + 3 SuperNodes: partitions 0 and 1 of a 2-client run, the
one partition of a 1-client run) serves the FedKSeed deployment test, the FedMeZO / Ferret / MeZO runs
(submitted together, overlapping the FedKSeed runs) and, last, the fault test (which kills one of its
SuperNodes); the TLS + authentication test brings up its own.  Every
process runs in its own session and is stopped by process group; the fixtures assert nothing is left.
Select with `pytest -k flower`.
"""
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from kseed import simulation as S  # noqa: E402
from kseed.config import FedConfig  # noqa: E402
from kseed.flower import app_dir  # noqa: E402
from kseed.flower.deploy import (Deployment, group_processes, make_certificates,  # noqa: E402
                                 make_node_key)
from kseed.flower.runconfig import default_run_config, fed_config  # noqa: E402

# Small settings on the embedded default model: a few seconds of client work per round.
SMALL = {"num-clients": 2, "clients-per-round": 2, "local-steps": 4, "num-seeds": 64, "eval-size": 16,
         "embedded-examples": 200, "rouge-size": 0, "seed": 7}
# The seed-history methods (FedMeZO, MeZO, Ferret): fewer steps and a smaller evaluation.
MEZO = dict(SMALL, **{"local-steps": 2, "eval-size": 8})


def _metrics(out):
    return S.read_metrics(str(out))


def _checkpoint_server(out):
    return S.read_checkpoint(str(out))["server"]


@contextlib.contextmanager
def _task_identity():
    """Messages made outside a Flower task need a run/node/task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _sent(m):
    """What Grid.push_messages does to a message it sends: give it its id."""
    m.metadata.__dict__["_message_id"] = m.object_id
    return m


def _from(reply, node):
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


class Stopped(Exception):
    """The in-process grid's stand-in for a ServerApp that was stopped."""


class InProcessGrid:
    """A Flower Grid whose nodes live in this process: node 100 + p holds partition p, and every
    message goes straight to the kseed ClientApp's query / train function with that node's context.
    ``stop_at``: a train message of that round raises Stopped (the run stops mid-round).
    ``train_for``: partition id -> function answering that partition's train messages in place of
    the ClientApp's train (same signature: (message, context) -> reply)."""

    def __init__(self, run_config, num_partitions, stop_at=None, *, train_for=None):
        self.run_config = dict(run_config)
        self.num_partitions = num_partitions
        self.stop_at = stop_at
        self.train_for = dict(train_for or {})
        self.pending = {}

    def get_node_ids(self):
        return [100 + p for p in range(self.num_partitions)]

    def _answer(self, m):
        from flwr.app import Context, RecordDict

        from kseed.flower import client_app

        node = m.metadata.dst_node_id
        ctx = Context(run_id=1, node_id=node, node_config={"partition-id": node - 100,
                                                          "num-partitions": self.num_partitions},
                      state=RecordDict(), run_config=self.run_config)
        if m.metadata.message_type == "query":
            return _from(client_app.query(m, ctx), node)
        if self.stop_at is not None and m.metadata.group_id == str(self.stop_at):
            raise Stopped(f"stopped in round {self.stop_at}")
        train = self.train_for.get(node - 100, client_app.train)
        return _from(train(m, ctx), node)

    def push_messages(self, msgs):
        ids = []
        for m in map(_sent, msgs):
            self.pending[m.metadata.message_id] = self._answer(m)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        return [self.pending.pop(i) for i in ids if i in self.pending]

    def send_and_receive(self, msgs, *, timeout=None):
        return [self._answer(_sent(m)) for m in msgs]


def _same_run(out, sim_out, *, rounds):
    """A seed-history method's Flower run in `out` ended where the in-process run in `sim_out` did:
    the same history, client losses and model differences, bitwise, and the same metrics rows."""
    fl = _checkpoint_server(out)
    si = _checkpoint_server(sim_out)
    assert fl["round"] == si["round"] == rounds
    assert fl["history"]["rounds"] == rounds and fl["history"]["pairs"] > 0
    for key in ("history", "client_loss", "client_diff"):
        assert fl[key] == si[key], key
    rows, sim_rows = _metrics(out), _metrics(sim_out)
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    for r, s in zip(rows, sim_rows):
        for key in ("train_loss", "eval_loss", "eval_loss_example_mean", "clients", "steps",
                    "bytes_up_per_client", "rejected"):
            if key in s:
                assert r[key] == s[key], (r["round"], key)
    return rows, sim_rows


def _same_lora_run(out, sim_out, *, rounds):
    """A LoRA method's (FedIT, FedPipe) Flower run in `out` ended where the in-process run in
    `sim_out` did: the same global adapter, bitwise, and the same metrics rows."""
    fl, si = _checkpoint_server(out), _checkpoint_server(sim_out)
    assert fl["round"] == si["round"] == rounds and fl["adapter"] == si["adapter"]
    for r, s in zip(_metrics(out), _metrics(sim_out)):
        for key in ("train_loss", "eval_loss", "clients", "steps", "bytes_up_per_client",
                    "bytes_down_per_client", "rejected"):
            if key in s:
                assert r[key] == s[key], (r["round"], key)


@pytest.fixture(scope="module")
def flower_deployment(tmp_path_factory):
    """SuperLink + SuperNodes for partitions 0 and 1 of 2 (node 0 keeps its model in a node-config
    cache-dir, which FedKSeed does not use; the two give their clients memory budgets of 3 and 0.6
    MiB, which only FedPipe uses) and one SuperNode holding the one partition of a 1-client run
    (MeZO's; also with a cache-dir).  A run uses the nodes whose num-partitions is its num-clients
    (the ServerApp ignores the others)."""
    work = tmp_path_factory.mktemp("flower-plain")
    d = Deployment(work)
    try:
        d.start_superlink()
        d.start_supernode(0, 2, max_wait_time=120,
                          node_config=f'cache-dir="{work / "cache0"}" memory-budget-mib=3')
        d.start_supernode(1, 2, max_wait_time=120, node_config="memory-budget-mib=0.6")
        d.start_supernode(0, 1, name="supernode-single", max_wait_time=120,
                          node_config=f'cache-dir="{work / "cache-single"}"')
        d.wait_nodes(3)
        yield d
    finally:
        d.close()
        assert d.leftover() == [], "processes left behind after teardown"


@pytest.fixture(scope="module")
def method_runs(flower_deployment, tmp_path_factory):
    """FedMeZO (3 rounds), Ferret, MeZO, FedIT and FedPipe (2 rounds each), submitted together to
    the shared deployment: {method: (run config, run id)}.  test_flower_deployment_matches_simulation asks for
    them first, so that they overlap its FedKSeed runs (a SuperNode works through its messages one at
    a time, whichever run they belong to: overlapping runs fill each other's idle polls);
    test_flower_deployment_methods_match_simulation checks them."""
    work = tmp_path_factory.mktemp("flower-methods")
    runs = {}
    for method, rounds in (("fedmezo", 3), ("ferret", 2), ("mezo", 2), ("fedit", 2),
                           ("fedpipe", 2)):
        rc = dict(MEZO, method=method, rounds=rounds, out=str(work / method),
                  **{"round-timeout": 300.0})
        if method == "mezo":
            del rc["num-clients"], rc["clients-per-round"]
        if method in LORA:
            rc.update(LORA[method], **{"num-seeds": default_run_config()["num-seeds"]})
        runs[method] = rc, flower_deployment.start_run(app_dir(), rc)
    return runs


# FedIT and FedPipe on the shared deployment: small adapters, a few steps.  FedPipe's budgets come
# from the SuperNodes' node config (3 and 0.6 MiB: fp32 at rank 4, int8 at rank 2); the in-process
# run gets the same from --client-budgets (SIM_EXTRA).
LORA = {"fedit": {"lora-rank": 2, "lr": 5e-3, "batch-size": 2},
        "fedpipe": {"lora-rank": 4, "lr": 5e-3, "batch-size": 2}}
SIM_EXTRA = {"fedpipe": {"client-budgets": "3,0.6"}}


# ------------------------------------------------------------------------------------------ no processes

def test_flower_app_dir_config_matches_driver():
    """The shipped app's [tool.flwr.app.config] has every driver option with the driver's default."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11: flwr depends on tomli
        import tomli as tomllib

    pyproject = app_dir() / "pyproject.toml"
    doc = tomllib.loads(pyproject.read_text())
    assert "_" not in app_dir().name  # flwr build rejects app dir names with underscores
    assert "federations" not in doc["tool"]["flwr"]
    comps = doc["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "kseed.flower.server_app:app", "clientapp": "kseed.flower.client_app:app"}
    # after adding a FedConfig field: python -m kseed.flower.runconfig
    assert doc["tool"]["flwr"]["app"]["config"] == default_run_config()
    from kseed.task import resolve_dtype  # dtype / rounding auto: the model's own (issue 21)
    assert fed_config(doc["tool"]["flwr"]["app"]["config"]) == resolve_dtype(FedConfig())


def test_flower_run_config_errors():
    with pytest.raises(ValueError, match="local-steps"):
        fed_config({"local-steps": "many"})
    with pytest.raises(ValueError, match="rounds"):
        fed_config({"rounds": 2.5})
    with pytest.raises(ValueError, match="clients-per-round"):
        fed_config({"num-clients": 2, "clients-per-round": 3})
    cfg = fed_config({"model": "", "lr": 1, "rounds": 3})
    assert cfg.model is None and cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.rounds == 3


def test_flower_exchange_drops_bad_replies():
    """Error replies, replies without bytes, oversized ones and missing ones are dropped; the driver
    then rejects a malformed upload and aggregates the rest (no processes: a fake Grid)."""
    from flwr.app import ConfigRecord, Error, Message, RecordDict

    from kseed.flower.exchange import exchange
    from kseed.protocol import UpMessage, encode_up
    from kseed.server import FedKSeedServer

    cfg = FedConfig(num_clients=7, clients_per_round=7, num_seeds=16, local_steps=3, min_replies=1)
    server = FedKSeedServer(cfg)
    rng = np.random.default_rng(5)
    good = encode_up(UpMessage(round=1, client_id=0, num_examples=10, indices=rng.integers(0, 16, 3),
                               grads=rng.standard_normal(3).astype(np.float32)), k=16)
    malformed = good[:-3]  # wrong length: only the driver can tell

    class FakeGrid:
        def __init__(self):
            self.timeout = None

        def send_and_receive(self, msgs, *, timeout=None):
            self.timeout = timeout
            replies = []
            for m in msgs:
                cid = _sent(m).metadata.dst_node_id - 100
                if cid == 0:
                    body = RecordDict({"kseed": ConfigRecord({"up": good})})
                elif cid == 1:
                    body = RecordDict({"kseed": ConfigRecord({"up": "not bytes"})})
                elif cid == 2:
                    body = RecordDict({"kseed": ConfigRecord({"up": b"\0" * 5000})})
                elif cid == 3:
                    # made by the SuperLink
                    replies.append(_from(Message(Error(code=1, reason="node unavailable"), reply_to=m), 0))
                    continue
                elif cid == 4:
                    continue  # never answers
                elif cid == 6:  # claims to come from a node the message did not go to
                    replies.append(_from(Message(RecordDict({"kseed": ConfigRecord({"up": good})}),
                                                 reply_to=m), 999))
                    continue
                else:
                    body = RecordDict({"kseed": ConfigRecord({"up": malformed})})
                replies.append(_from(Message(body, reply_to=m), m.metadata.dst_node_id))
            return replies

    with _task_identity():
        grid = FakeGrid()
        ids = server.sample_clients(1)
        downs = {c: server.make_down(1, c) for c in ids}
        res = exchange(grid, downs, {c: 100 + c for c in ids}, 1, timeout=7.0, max_upload_bytes=4096)
    assert grid.timeout == 7.0
    assert sorted(res.uploads) == [0, 5]
    assert "not bytes" in res.failed[1] and "max-upload-bytes" in res.failed[2]
    assert "node unavailable" in res.failed[3] and "no reply" in res.failed[4]
    assert "reply from node 999" in res.failed[6]
    assert res.sent == ids and sum(len(b) for b in downs.values()) < res.wire_down
    stats = server.aggregate(1, res.uploads)
    assert stats["accepted"] == [0] and "wrong length" in stats["rejected"][5]


def _same_server_state(a, b):
    assert a["round"] == b["round"]
    for key in ("acc", "pro_sum", "pro_count", "seeds", "client_loss"):
        assert a[key] == b[key], key  # hex of the float64 bytes: bitwise
    assert np.any(np.frombuffer(bytes.fromhex(a["acc"]), dtype="<f8") != 0)


def test_flower_serverapp_stopped_and_resumed_matches_simulation(tmp_path, one_thread):
    """The ServerApp over an in-process grid (the ClientApp's own functions answer): stopped in round
    3, then resumed with resume=true, it ends with the uninterrupted simulation's accumulators and
    metrics, bitwise; a resumed run with another config, or a fresh run on the checkpoint, is refused."""
    from kseed.flower.server_app import run_federation

    out = tmp_path / "flower"
    rc = dict(SMALL, rounds=4, out=str(out), sampling="pro", **{"node-wait-timeout": 5.0})
    with _task_identity():
        with pytest.raises(Stopped):
            run_federation(InProcessGrid(rc, 2, stop_at=3), rc)
        assert _checkpoint_server(out)["round"] == 2
        assert [r["round"] for r in _metrics(out)] == [0, 1, 2]
        for bad, msg in ((dict(rc, resume=True, lr=0.5), r"lr=0\.5 \(checkpoint: 5e-05\)"),
                         (dict(rc, resume=True, seed=8), "seed=8"),
                         (rc, "already holds a checkpoint: pass resume=true"),
                         (dict(rc, resume=True, out=""), "needs a run directory")):
            with pytest.raises(ValueError, match=msg):
                run_federation(InProcessGrid(bad, 2), bad)
        assert _checkpoint_server(out)["round"] == 2
        resumed = dict(rc, resume=True)
        summary = run_federation(InProcessGrid(resumed, 2), resumed)
    assert summary["engine"] == "flower" and summary["rounds"] == 4
    sim_out = tmp_path / "sim"
    S.run(fed_config(rc), str(sim_out), progress=False)
    _same_server_state(_checkpoint_server(out), _checkpoint_server(sim_out))
    rows, sim_rows = _metrics(out), _metrics(sim_out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    for r, s in zip(rows, sim_rows):
        assert r["eval_loss"] == s["eval_loss"] and r["eval_loss_example_mean"] == s["eval_loss_example_mean"]
        if r["round"]:
            for key in ("train_loss", "clients", "accepted", "steps", "bytes_down_per_client",
                        "bytes_up_per_client", "payload_bytes_down", "payload_bytes_up", "rejected"):
                assert r[key] == s[key], (r["round"], key)
            assert r["bytes_down"] > r["payload_bytes_down"] == s["bytes_down"]
            assert set(r["rebuild_seconds_per_client"]) == {str(c) for c in r["clients"]}


# ------------------------------------------------------------------------------------------ deployment

def test_flower_deployment_matches_simulation(flower_deployment, method_runs, tmp_path):
    """2 rounds on SuperLink + 2 SuperNodes, then a second run with resume=true to round 3, end with the
    uninterrupted in-process simulation's accumulators, bitwise; the payloads are the driver's messages;
    wire bytes and rebuild times are in metrics.jsonl.  (The other methods' runs, method_runs, work on
    the same nodes meanwhile.)"""
    d = flower_deployment
    rc = dict(SMALL, rounds=2, out=str(tmp_path / "flower"), **{"round-timeout": 300.0})
    run_id = d.start_run(app_dir(), rc)

    # The in-process simulation of the same config, while the deployment runs.
    sim_out = tmp_path / "sim"
    S.run(fed_config(dict(rc, rounds=3)), str(sim_out), progress=False)

    info = d.wait_run(run_id, timeout=600)
    assert info["status"] == "finished:completed", d.run_log(run_id)[-4000:]
    assert _checkpoint_server(tmp_path / "flower")["round"] == 2
    run_id = d.start_run(app_dir(), dict(rc, rounds=3, resume=True))
    info = d.wait_run(run_id, timeout=600)
    assert info["status"] == "finished:completed", d.run_log(run_id)[-4000:]
    _same_server_state(_checkpoint_server(tmp_path / "flower"), _checkpoint_server(sim_out))

    rows, sim_rows = _metrics(tmp_path / "flower"), _metrics(sim_out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r, s in zip(rows, sim_rows):
        for key in ("train_loss", "eval_loss", "eval_loss_example_mean", "clients", "steps",
                    "bytes_down_per_client", "bytes_up_per_client"):
            if key in s:
                assert r[key] == s[key], (r["round"], key)
        if r["round"] == 0:
            continue
        assert r["payload_bytes_down"] == s["bytes_down"] and r["payload_bytes_up"] == s["bytes_up"]
        n = len(r["clients"])
        # what crossed the wire: the driver's bytes plus Flower's framing (well under 2 KiB a message)
        assert s["bytes_down"] < r["bytes_down"] < s["bytes_down"] + 2048 * n
        assert s["bytes_up"] < r["bytes_up"] < s["bytes_up"] + 2048 * n
        assert r["rejected"] == {}
        assert set(r["rebuild_seconds_per_client"]) == {str(c) for c in r["clients"]}
        assert all(0 < v < 60 for v in r["rebuild_seconds_per_client"].values())
        assert r["rebuild_seconds"] > 0
    log = d.run_log(run_id)  # the ServerApp's log reaches `flwr log`
    assert "resuming" in log and "after round 2" in log and "kseed.flower: round 3:" in log
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["rounds"] == 3
    assert info["network-traffic"]["total-bytes"] > 0


def test_flower_deployment_methods_match_simulation(flower_deployment, method_runs):
    """FedMeZO, Ferret and MeZO on the shared deployment (method_runs) end with the in-process runs'
    histories, losses and uploads, bitwise; FedIT and FedPipe with their adapters and metrics
    (FedPipe's ranks and frozen bases from the SuperNodes' memory budgets).  The nodes with a
    cache-dir keep their model: from round 2 on they report it (the checkpoint's client_cached), and in
    FedMeZO's round 3 node 0 is sent only round 2 and rebuilds from its cache (hash checked) while
    node 1, without one, is sent the whole history."""
    d, runs = flower_deployment, method_runs
    out = {m: Path(rc["out"]) for m, (rc, _) in runs.items()}
    for method, (rc, _) in runs.items():  # the in-process runs, while the deployment works
        S.run(fed_config({**rc, **SIM_EXTRA.get(method, {})}), str(out[method]) + "-sim",
              progress=False)
    for method, (rc, run_id) in runs.items():
        info = d.wait_run(run_id, timeout=600)
        assert info["status"] == "finished:completed", (method, d.run_log(run_id)[-4000:])
    for method, (rc, _) in runs.items():
        if method in LORA:
            continue
        rows, _ = _same_run(out[method], str(out[method]) + "-sim", rounds=rc["rounds"])
        assert all(r["rebuild_seconds"] is not None for r in rows[1:]), method
        assert _checkpoint_server(out[method])["client_cached"] == {"0": rc["rounds"] - 1}, method
    last = _metrics(out["fedmezo"])[3]
    assert last["bytes_down_per_client"]["0"] < last["bytes_down_per_client"]["1"]  # round 2 / 1 and 2
    assert last["payload_bytes_down"] < last["bytes_down"]
    # FedIT and FedPipe: the in-process run's adapter and metrics, bitwise; FedPipe's node budgets
    # gave node 1 (0.6 MiB) a rank-2 adapter on an int8 base, node 0 (3 MiB) rank 4 on fp32
    for method in LORA:
        _same_lora_run(out[method], str(out[method]) + "-sim", rounds=2)
    ups = _metrics(out["fedpipe"])[2]["bytes_up_per_client"]
    assert ups["0"] - 36 == 2 * (ups["1"] - 36)


def test_flower_tls_and_node_auth(tmp_path):
    """TLS with a CA made here; SuperNode authentication: the registered node takes part, the
    unregistered one is refused."""
    certs = make_certificates(tmp_path / "certs")
    good_key, good_pub = make_node_key(tmp_path / "keys" / "registered")
    bad_key, _ = make_node_key(tmp_path / "keys" / "unregistered")
    d = Deployment(tmp_path / "deploy", tls=certs, supernode_auth=True)
    try:
        d.start_superlink()
        assert "registered successfully" in d.flwr("supernode", "register", str(good_pub), d.connection).stdout
        d.start_supernode(0, 1, private_key=good_key, max_wait_time=120)
        bad = d.start_supernode(0, 1, name="unregistered", private_key=bad_key, max_wait_time=10,
                                may_exit=True)
        assert len(d.wait_nodes(1)) == 1
        rc = dict(SMALL, rounds=1, **{"num-clients": 1, "clients-per-round": 1, "local-steps": 2,
                                      "out": str(tmp_path / "out"), "round-timeout": 300.0})
        run_id = d.start_run(app_dir(), rc)
        # meanwhile the unregistered node gives up: the SuperLink refused to activate it
        bad.popen.wait(timeout=120)
        assert bad.popen.returncode != 0
        assert "No SuperNode found with the given public key" in (d.logs / "superlink.log").read_text()
        assert len(d.online_nodes()) == 1
        info = d.wait_run(run_id, timeout=600)
        assert info["status"] == "finished:completed", d.run_log(run_id)[-4000:]
        rows = _metrics(tmp_path / "out")
        assert rows[-1]["round"] == 1 and rows[-1]["accepted"] == [0]
    finally:
        d.close()
    assert d.leftover() == []


def test_flower_fault_supernode_killed_mid_round(flower_deployment, tmp_path):
    """Kill one SuperNode while its ClientApp is working on round 2: the round goes on with the other
    reply (Flower reports the dead node unavailable, or round-timeout passes), and the run completes.
    Runs last: it takes a node of the shared deployment down."""
    d = flower_deployment
    out = tmp_path / "out"
    rc = dict(SMALL, rounds=2, out=str(out), **{"min-replies": 1, "round-timeout": 60.0})
    run_id = d.start_run(app_dir(), rc)
    victim = d.supernodes["supernode-1"]
    seen = set()  # the victim's ClientApp processes up to round 1
    end, polls = time.monotonic() + 300, 0
    while time.monotonic() < end and len(_metrics(out)) < 2:  # round 0 and round 1 written
        seen.update(group_processes(victim.pgid, "flwr-clientapp"))
        polls += 1
        if polls % 20 == 0:  # a run that failed early would never write round 1
            assert d.run_status(run_id)["status"].startswith(("pending", "starting", "running")), \
                d.run_log(run_id)[-4000:]
        time.sleep(0.2)
    assert len(_metrics(out)) >= 2, "round 1 never finished"
    end = time.monotonic() + 60  # catch its ClientApp process at work on round 2
    while time.monotonic() < end and not set(group_processes(victim.pgid, "flwr-clientapp")) - seen:
        time.sleep(0.1)
    killed_during_client = bool(set(group_processes(victim.pgid, "flwr-clientapp")) - seen)
    d.stop(victim)
    info = d.wait_run(run_id, timeout=600)
    assert info["status"] == "finished:completed", d.run_log(run_id)[-4000:]
    rows = _metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["accepted"] == [0, 1]
    assert rows[2]["accepted"] == [0] and "1" in rows[2]["rejected"], rows[2]
    assert killed_during_client, "the SuperNode was killed before its ClientApp started"
