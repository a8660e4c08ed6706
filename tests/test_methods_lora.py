"""The LoRA methods (kseed.lora, kseed.methods.fedit): the layout and its error, the peft plumbing
(inject, load, read back, unload leaves the base model as it was, merge equals peft's forward), the
wire format (exact sizes, hostile bytes), the threat model's norm bound, a federation that trains,
resumes bitwise, counts its bytes exactly and exports a plain model, and the CLI's options."""
import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from conftest import run_whole_and_resumed  # noqa: E402
from kseed import lora as L  # noqa: E402
from kseed import methods  # noqa: E402
from kseed import protocol as P  # noqa: E402
from kseed import simulation as S  # noqa: E402
from kseed.config import FedConfig  # noqa: E402
from kseed.methods import fedit as FI  # noqa: E402
from kseed.task import build_data, load_workspace  # noqa: E402

SMALL = dict(num_clients=3, clients_per_round=2, local_steps=2, batch_size=2, lora_rank=4,
             embedded_examples=180, min_per_client=5, eval_size=8, rouge_size=0, seed=13)


def _cfg(method="fedit", **kw):
    return FedConfig(**methods.get(method).configure({**SMALL, **kw})).validate()


@pytest.fixture(scope="module")
def ws():
    return load_workspace(_cfg(), cache=False)


def _ids():
    return torch.tensor([[1, 17, 33, 90, 200, 7, 3], [1, 5, 6, 7, 8, 9, 10]])


# ----------------------------------------------------------------------------------- layout
def test_layout_defaults_and_no_target_error(ws):
    lay = L.find_targets(ws.model, L.parse_targets(L.DEFAULT_TARGETS))
    assert [t.name.rsplit(".", 1)[-1] for t in lay] == ["q_proj", "k_proj", "v_proj", "o_proj"] * 3
    assert L.adapter_size(lay, 8) == 8 * 12 * (96 + 96) == 18432
    assert ws.identity["lora_layout"] == [[t.name, 96, 96] for t in
                                          L.find_targets(ws.model, ["q_proj", "k_proj", "v_proj",
                                                                    "o_proj"])][:len(lay)]
    mlp = L.find_targets(ws.model, ["gate_proj", "model.layers.0.mlp.down_proj"])
    assert [t.name for t in mlp] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj",
                                     "model.layers.1.mlp.gate_proj", "model.layers.2.mlp.gate_proj"]
    with pytest.raises(ValueError, match=r"--lora-targets query,value; its linear modules are "
                                         r"named: down_proj, gate_proj, k_proj, lm_head, o_proj"):
        L.find_targets(ws.model, ["query", "value"])
    with pytest.raises(ValueError, match="--lora-targets query"):  # before the run starts
        load_workspace(_cfg(lora_targets="query"), cache=False)
    for bad in ("", "q_proj,,v_proj", "q proj"):
        with pytest.raises(ValueError, match="--lora-targets"):
            _cfg(lora_targets=bad)
    for kw, flag in (({"lora_rank": 0}, "--lora-rank"), ({"lora_alpha": 0.0}, "--lora-alpha"),
                     ({"lora_dropout": 1.0}, "--lora-dropout")):
        with pytest.raises(ValueError, match=flag):
            _cfg(**kw)


def test_init_is_peft_default_and_seeded():
    lay = [L.Target("a", 16, 8), L.Target("b", 64, 32)]
    v = L.init_adapter(lay, 4, 1)
    parts = L.split(lay, 4, v)
    for t, (a, b) in zip(lay, parts.values()):
        assert a.shape == (4, t.in_features) and b.shape == (t.out_features, 4)
        assert not b.any() and 0 < np.abs(a).max() <= 1 / math.sqrt(t.in_features)
        assert np.abs(a).max() > 0.8 / math.sqrt(t.in_features)  # uniform over the whole range
    assert np.array_equal(v, L.init_adapter(lay, 4, 1)) and not np.array_equal(
        v, L.init_adapter(lay, 4, 2))
    with pytest.raises(ValueError, match="has 480 floats, got 479"):
        L.split(lay, 4, v[:-1])


# ------------------------------------------------------------------------------------- peft
def test_peft_inject_load_unload_and_merge(ws, gen, one_thread):
    """Inside LoraModel the adapter is the vector loaded; on exit the model is the base model again
    (same tensors, same keys, same logits); merge_into gives peft's forward (to float rounding)."""
    FI.set_base(ws)
    model = ws.model
    lay = L.find_targets(model, L.parse_targets(L.DEFAULT_TARGETS))
    spec = L.LoraSpec(dropout=0.0)
    keys, tensors = list(model.state_dict()), list(model.parameters())
    with torch.no_grad():
        base = model(input_ids=_ids()).logits.clone()
    vec = (torch.randn(L.adapter_size(lay, 4), generator=gen) * 0.05).numpy()
    with L.LoraModel(model, lay, spec, 4) as lm:
        assert len(lm.parameters) == 2 * len(lay)
        assert [p.requires_grad for p in model.parameters()].count(True) == 2 * len(lay)
        lm.load(vec)
        assert np.array_equal(lm.vector(), vec)
        with torch.no_grad():
            lora = lm.peft(input_ids=_ids()).logits.clone()
    assert list(model.state_dict()) == keys and all(a is b for a, b in zip(tensors,
                                                                           model.parameters()))
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids()).logits, base)
        assert (lora - base).abs().max() > 1e-3  # the adapter changes the output
        FI.set_merged(ws, lay, vec, 4, spec.scale(4))
        merged = model(input_ids=_ids()).logits
        FI.set_base(ws)
        assert torch.equal(model(input_ids=_ids()).logits, base)
    torch.testing.assert_close(merged, lora, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------------- wire
def _server(cfg, ws):
    return FI.FedITServer(cfg, base_identity=ws.identity)


def test_wire_sizes_and_hostile_uploads(ws):
    cfg = _cfg(num_clients=4, clients_per_round=4, min_replies=1)
    s = _server(cfg, ws)
    n = L.adapter_size(s.layout, 4)
    assert n == 4 * 12 * 192
    down = s.make_down(1, 2)
    assert len(down) == L.down_size(n) == 56 + 4 * n
    m = L.decode_down(down, FI.DOWN_MAGIC, size_of=lambda r: L.adapter_size(s.layout, r))
    assert (m.round, m.client_id, m.rank, m.local_steps, m.batch_size) == (1, 2, 4, 2, 2)
    assert np.array_equal(m.adapter, s.adapter)

    def up(cid=0, **kw):
        f = dict(round=1, client_id=cid, num_examples=5, steps=2, train_loss=1.5, rank=4,
                 adapter=s.adapter + 0.01)
        f.update(kw)
        return L.encode_up(L.AdapterUp(**f), FI.UP_MAGIC)

    good = up()
    assert len(good) == L.up_size(n) == 36 + 4 * n
    nan = bytearray(good)
    nan[36 + 4 * 7:36 + 4 * 8] = np.float32(np.nan).tobytes()
    hostile = {
        "upload truncated": good[:20],
        "oversized upload": good + b"\0" * 4,
        "wrong length": good[:-4],
        "not a KLU1 upload": b"XXXX" + good[4:],
        "unsupported KLU1 upload version": good[:4] + (9).to_bytes(2, "little") + good[6:],
        "unknown flags": good[:6] + (1).to_bytes(2, "little") + good[8:],
        "NaN/inf in the upload: adapter\\[7\\]": bytes(nan),
        "rank-2 adapter, this client's rank is 4": up(rank=2, adapter=np.zeros(
            L.adapter_size(s.layout, 2), np.float32)),
        "wrong round": up(round=2),
        "upload names client 3": up(cid=3),
        "reports 0 examples": good[:16] + (0).to_bytes(4, "little") + good[20:],
        "reports 3 local steps": up(steps=3),
        "message must be bytes": "not bytes",
    }
    for why, data in hostile.items():
        with pytest.raises(P.ProtocolError, match=why):
            L.decode_up(data, FI.UP_MAGIC, size_of=lambda r: L.adapter_size(s.layout, r),
                        ranks=[4], expected_round=1, expected_client=0, max_steps=2)
    # the server rejects each of them and applies the honest ones
    st = s.aggregate(1, {0: good, 1: up(cid=1), 2: hostile["oversized upload"],
                         3: up(cid=3)[:40] + np.float32(np.inf).tobytes() + good[44:]})
    assert st["accepted"] == [0, 1] and set(st["rejected"]) == {2, 3}
    assert "oversized" in st["rejected"][2] and "NaN" in st["rejected"][3]
    assert np.array_equal(s.adapter, m.adapter + np.float32(0.01))
    with pytest.raises(P.ProtocolError, match="wrong length"):
        L.decode_down(down[:-4], FI.DOWN_MAGIC, size_of=lambda r: L.adapter_size(s.layout, r))
    with pytest.raises(P.ProtocolError, match="rank 0"):
        L.decode_down(down[:48] + (0).to_bytes(4, "little") + down[52:], FI.DOWN_MAGIC,
                      size_of=lambda r: L.adapter_size(s.layout, r))


def test_client_refuses_foreign_down_messages(ws):
    cfg = _cfg()
    s = _server(cfg, ws)
    parts, _, _ = build_data(cfg)
    cl = FI.FedITClient(cfg, lambda: ws, parts[1], client_id=1)
    with pytest.raises(P.ProtocolError, match="for client 0, this is client 1"):
        cl.fit(s.make_down(1, 0))
    for other, field in ((dict(lr=1e-2), "lr"), (dict(local_steps=5), "local_steps"),
                         (dict(lora_rank=8), "rank"), (dict(lora_alpha=8.0), "layout")):
        srv = _server(_cfg(**other), ws)
        with pytest.raises(P.ProtocolError, match=field):
            cl.fit(srv.make_down(1, 1))


# --------------------------------------------------------------------------- threat model
def test_norm_bound_against_the_lower_median(ws, gen):
    """Three honest clients and one that blows its update up 1000x: the liar's update is scaled to
    --norm-bound x the round's lower median norm; an honest round is plain FedAvg, bitwise."""
    cfg = _cfg(num_clients=4, clients_per_round=4)
    s = _server(cfg, ws)
    g0 = s.adapter.copy()
    n = g0.size
    steps = [(torch.randn(n, generator=gen) * 1e-3 * (1 + 0.1 * c)).numpy() for c in range(4)]

    def ups(scale_of_3):
        out = {}
        for c in range(4):
            a = (g0 + steps[c] * (scale_of_3 if c == 3 else 1)).astype(np.float32)
            out[c] = L.encode_up(L.AdapterUp(round=1, client_id=c, num_examples=10 + c,
                                             steps=2, train_loss=1.0, rank=4, adapter=a),
                                 FI.UP_MAGIC)
        return out

    honest = ups(1.0)
    w = np.array([10, 11, 12, 13], np.float64)
    w /= w.sum()
    want = np.zeros(n)
    for c in range(4):
        want += w[c] * np.frombuffer(honest[c][36:], "<f4").astype(np.float64)
    st = s.aggregate(1, honest)
    assert st["clipped"] == {} and np.array_equal(s.adapter, want.astype(np.float32))

    s2 = _server(cfg, ws)
    st = s2.aggregate(1, ups(1000.0))
    norms = [float(np.linalg.norm(np.frombuffer(ups(1000.0)[c][36:], "<f4").astype(np.float64)
                                  - g0)) for c in range(4)]
    bound = 1.5 * sorted(norms)[1]
    assert list(st["clipped"]) == [3] and "update norm" in st["clipped"][3]
    assert st["bounds"]["norm"] == pytest.approx(bound)
    moved = np.linalg.norm(s2.adapter.astype(np.float64) - g0)
    assert moved <= bound * (1 + 1e-6)
    assert moved < 0.01 * np.linalg.norm(steps[3] * 1000.0)  # the attack is cut by > 100x


class _Liar:
    """A FedIT client that trains honestly, then multiplies its update (or sets its adapter) in the
    upload's bytes."""

    def __init__(self, inner, attack):
        self.inner, self.attack = inner, attack

    def fit(self, down):
        sizes = lambda r: L.adapter_size(self.inner.candidates, r)  # noqa: E731
        m = L.decode_down(down, FI.DOWN_MAGIC, size_of=sizes)
        up = L.decode_up(self.inner.fit(down), FI.UP_MAGIC, size_of=sizes, ranks=[m.rank])
        if self.attack == "x1000":
            up.adapter = (m.adapter + 1000 * (up.adapter - m.adapter)).astype(np.float32)
        else:  # "huge"
            up.adapter = np.full_like(up.adapter, 3e38)
        return L.encode_up(up, FI.UP_MAGIC)


def _federate(cfg, ws, parts, items, attack=None, rounds=2):
    from kseed import modeling as M
    srv = FI.FedITServer(cfg, base_identity=ws.identity)
    clients = {c: FI.FedITClient(cfg, lambda: ws, parts[c], client_id=c)
               for c in range(cfg.num_clients)}
    stats = []
    for rnd in range(1, rounds + 1):
        ids = srv.sample_clients(rnd)
        ups = {c: (_Liar(clients[c], attack) if attack and c == ids[0] else clients[c]).fit(
            srv.make_down(rnd, c)) for c in ids}
        stats.append(srv.aggregate(rnd, ups, weights={c: len(parts[c]) for c in ids}))
    srv.load_global(ws)
    return M.eval_loss(ws.model, items, ws.pad_id, ws.device), stats


@pytest.mark.parametrize("attack", ["x1000", "huge"])
def test_one_lying_client_of_four_cannot_wreck_fedit(attack, ws, one_thread):
    """1 of the 4 clients a round blows its adapter update up: with the norm bound the run ends near
    the clean run's held-out loss (within 5 % for its own update x 1000; within 15 % for an adapter of
    3e38 everywhere, whose bounded update still points along a direction no honest client takes: the
    bound caps a liar's size, not its direction), the liar bounded every round; without the bound the
    lie wrecks the run (so the test can fail)."""
    from kseed import modeling as M
    cfg = _cfg(num_clients=6, clients_per_round=4, lr=5e-3, eval_size=12)
    parts, eval_ex, _ = build_data(cfg)
    items = M.tokenize_examples(ws.tok, eval_ex, cfg.max_length, cfg.prompt_template())
    clean, _ = _federate(cfg, ws, parts, items)
    loss, stats = _federate(cfg, ws, parts, items, attack)
    tol = {"x1000": 0.05, "huge": 0.15}[attack]
    assert math.isfinite(loss) and abs(loss - clean) <= tol * clean, (loss, clean)
    for st in stats:
        liar = st["accepted"][0]
        assert "update norm" in st["clipped"][liar] and len(st["clipped"]) == 1
    bad, _ = _federate(FedConfig(**{**cfg.to_dict(), "norm_bound": 0.0}), ws, parts, items, attack,
                       rounds=1)
    assert not math.isfinite(bad) or bad > (1 + 2 * tol) * clean, (bad, clean)


# ------------------------------------------------------------------------------- federation
def test_run_trains_resumes_bitwise_counts_bytes_and_exports(tmp_path, one_thread):
    cfg = _cfg(rounds=3, eval_size=6, lr=5e-3, rouge_size=2, max_new_tokens=6)
    a, b = run_whole_and_resumed(cfg, tmp_path, 2)
    ca = json.loads((a / "checkpoint.json").read_text())["server"]
    cb = json.loads((b / "checkpoint.json").read_text())["server"]
    assert ca["method"] == "fedit" and ca["round"] == 3
    summary = json.loads((a / "summary.json").read_text())
    assert summary["parameters_trained"] == 4 * 12 * 192
    assert 0 <= summary["rouge_l"] <= 1 and summary["rouge_examples"] == 2  # Rouge-L of the merged model
    assert ca["adapter"] == cb["adapter"] and ca["client_loss"] == cb["client_loss"]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in S.read_metrics(str(a))]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in S.read_metrics(str(b))]
    rows = S.read_metrics(str(a))
    assert all(math.isfinite(r["eval_loss"]) for r in rows)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.05  # it learns
    n = L.adapter_size(L.layout_from(ca["base_identity"]["lora_layout"]), 4)
    for r in rows[1:]:
        assert set(r["bytes_down_per_client"].values()) == {56 + 4 * n}
        assert set(r["bytes_up_per_client"].values()) == {36 + 4 * n}
        assert r["bytes_down"] == 2 * (56 + 4 * n) and r["bytes_up"] == 2 * (36 + 4 * n)
        assert r["steps"] == 4 and r["accepted"] == r["clients"]
    # export: the merged model, an ordinary HF directory that plain transformers loads
    info = S.export(str(a), str(tmp_path / "hf"))
    assert info["method"] == "fedit" and info["lora_rank"] == 4 and info["round"] == 3
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert not any("lora" in k for k in plain.state_dict())
    ws = load_workspace(cfg, cache=False)
    srv = FI.FedITServer(cfg, base_identity=ws.identity)
    srv.load_state_dict(ca)
    spec = L.LoraSpec(targets=cfg.lora_targets, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    with torch.no_grad(), L.LoraModel(ws.model, srv.layout, spec, 4) as lm:
        lm.load(srv.adapter)
        want = lm.peft(input_ids=_ids()).logits
        got = plain(input_ids=_ids()).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert (got - ws.model(input_ids=_ids()).logits).abs().max() > 1e-3  # not the base model


def test_cli_options_and_the_extra(tmp_path, capsys, monkeypatch):
    from kseed import cli
    help_ = cli._parser().format_help()
    assert "fedit, fedpipe: LoRA adapters" in help_ and "--lora-rank" in help_
    for args, msg in ((["--method", "fedit", "--eps", "1e-3"], "--method fedit does not use --eps"),
                      (["--method", "fedit", "--g-clip", "5"], "does not use --g-clip"),
                      (["--method", "fedit", "-K", "8"], "does not use --num-seeds"),
                      (["--method", "fedkseed", "--lora-rank", "2"],
                       "--method fedkseed does not use --lora-rank")):
        out = tmp_path / "x"
        assert cli.main([*args, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert msg in err[-1], err
        assert not out.exists()
    cfg = FedConfig(**methods.get("fedit").configure({}))
    assert (cfg.g_clip, cfg.g_clip_abs, cfg.local_steps) == (0.0, 0.0, 10)
    # without peft: a clear error naming the extra, before anything is written
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(L.LoraUnavailable, match=r"pip install 'kseed\[lora\]'"):
        L.require_peft()
    out = tmp_path / "y"
    assert cli.main(["--method", "fedit", "--rounds", "1", "--out", str(out), "--quiet"]) == 2
    assert "kseed[lora]" in capsys.readouterr().err and not out.exists()


def test_plain_kseed_never_imports_peft():
    code = ("import sys, kseed.cli, kseed.rounds, kseed.simulation, kseed.lora, kseed.config;"
            "from kseed import methods; [methods.get(n) for n in methods.NAMES];"
            "kseed.config.FedConfig(**methods.get('fedit').configure({})).validate();"
            "assert not {'peft', 'bitsandbytes'} & set(sys.modules), 'the extra imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("method", ["fedit", "fedpipe"])
def test_flower_grid_matches_simulation(tmp_path, one_thread, method):
    """The ServerApp over an in-process grid (the ClientApp's own functions answer, each message a
    fresh client loading its own base model) ends with the in-process run's adapter, bitwise.
    FedPipe: the budgets come from the SuperNodes' node config (memory-budget-mib 3 and 0.6) on
    Flower and from --client-budgets in process; client 1 trains at a lower rank on an int8 frozen
    model that it streams in without ever loading the full-precision model (its loader is never
    called), and its node still checks its base model's hash."""
    pytest.importorskip("flwr")
    from test_flower import SMALL as FSMALL, _task_identity
    from test_flower_methods import CachingGrid
    from kseed.flower.runconfig import fed_config
    from kseed.flower.server_app import run_federation

    out = tmp_path / "flower"
    from kseed.flower import driver
    from kseed.methods import fedpipe as FPM

    out = tmp_path / "flower"
    rc = {k: v for k, v in FSMALL.items() if k != "num-seeds"}
    nodes, loads = {}, []
    if method == "fedpipe":
        nodes = {0: {"memory-budget-mib": 3}, 1: {"memory-budget-mib": "0.6"}}
        rc["lora-rank"] = 4
    rc.update(method=method, rounds=2, out=str(out), lr=5e-3,
              **{"local-steps": 2, "eval-size": 6, "batch-size": 2, "node-wait-timeout": 5.0})
    rc.setdefault("lora-rank", 2)
    real = driver.load_workspace

    def counted(cfg, *a, **kw):
        loads.append(kw.get("facts"))
        return real(cfg, *a, **kw)
    with _task_identity(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(driver, "load_workspace", counted)
        run_federation(CachingGrid(rc, 2, {}, nodes), rc)
    sim_cfg = fed_config({**rc, "client-budgets": "3,0.6"} if nodes else rc)
    S.run(sim_cfg, str(tmp_path / "sim"), progress=False)
    fl = S.read_checkpoint(str(out))["server"]
    si = S.read_checkpoint(str(tmp_path / "sim"))["server"]
    assert fl["round"] == si["round"] == 2 and fl["adapter"] == si["adapter"]
    rows = S.read_metrics(str(out))
    for r, s in zip(rows, S.read_metrics(str(tmp_path / "sim"))):
        for key in ("train_loss", "eval_loss", "clients", "steps", "bytes_up_per_client",
                    "bytes_down_per_client", "rejected"):
            if key in s:
                assert r[key] == s[key], (r["round"], key)
    # every client loads its workspace without the method's server facts (FedPipe's: a calibration
    # pass); 2 clients a round, 2 rounds; FedPipe's int8 client (node 1) loads none
    assert loads == [False] * (2 if method == "fedpipe" else 4)
    if method == "fedpipe":
        ups = rows[-1]["bytes_up_per_client"]
        assert ups["0"] - 36 == 2 * (ups["1"] - 36)  # ranks 4 and 2
        from kseed.task import model_dir
        q = FPM.quantized_model(model_dir(sim_cfg), "fp32", "cpu", 8)
        down = FPM.FedPipeServer(sim_cfg, base_identity=real(sim_cfg, cache=False).identity
                                 ).make_down(1, 1)
        with pytest.MonkeyPatch.context() as mp:  # a node whose base is another model: refused
            mp.setattr(q, "kseed_base_hash", "0" * 64)
            with pytest.raises(driver.BaseModelMismatch, match="install the same model"):
                driver.run_client(rc, 1, 2, down, base_hash=fl["base_identity"]["hash"][:16],
                                  memory_budget_mib=0.6)
        with pytest.raises(ValueError, match="memory-budget-mib must be finite and > 0"):
            driver.run_client(rc, 1, 2, down, memory_budget_mib="-1")


# ----------------------------------------------------------------------------------- FedPipe
from kseed.methods import fedpipe as FP  # noqa: E402


def test_fedpipe_budgets_plan_precision_and_rank(ws):
    """--client-budgets (MiB, cycled) -> (bits, rank) through fedpipe_parts.budget_to_bits and
    rank_for_budget: more budget never gives less precision or a smaller rank."""
    assert FP.parse_budgets(" ") == [] and FP.parse_budgets("1,2.5") == [1.0, 2.5]
    for bad in ("1,x", "0", "1,-2", "nan"):
        with pytest.raises(ValueError, match="--client-budgets"):
            _cfg("fedpipe", client_budgets=bad)
    lay = L.find_targets(ws.model, ["q_proj", "v_proj"])
    assert FP.budget_of(_cfg("fedpipe"), 5) is None
    assert FP.client_plan(_cfg("fedpipe"), ws.model, lay, None) == (32, 4)  # --lora-rank
    cfg = _cfg("fedpipe", client_budgets="3,0.6,0.45,0.2", lora_rank=8)
    assert FP.budget_of(cfg, 5) == 0.6 * (1 << 20)
    assert FP.budget_of(cfg, 5, node_mib=3.0) == 3 * (1 << 20)  # a node's budget wins
    plans = [FP.client_plan(cfg, ws.model, lay, FP.budget_of(cfg, c)) for c in range(3)]
    assert [b for b, _ in plans] == [32, 8, 4]
    assert plans[0][1] == 8 and 8 >= plans[1][1] >= plans[2][1] >= 1
    with pytest.raises(ValueError, match="4-bit"):
        FP.client_plan(cfg, ws.model, lay, FP.budget_of(cfg, 3))
    # the skeleton (no weights) plans as the loaded model does
    from kseed.task import model_dir
    sk = FP.skeleton(model_dir(cfg), "fp32")
    assert all(p.is_meta for p in sk.parameters())
    assert L.find_targets(sk, ["q_proj", "v_proj"]) == lay
    assert [FP.client_plan(cfg, sk, lay, FP.budget_of(cfg, c)) for c in range(3)] == plans


def _dense(layout, vec, rank, scale=1.0):
    return {n: scale * (b.astype(np.float64) @ a.astype(np.float64))
            for n, (a, b) in L.split(layout, rank, vec).items()}


def test_fedpipe_heterogeneous_rank_aggregation(ws, gen):
    """The server's combine: at scale alpha / R its product is the best rank-R approximation of the
    weighted mean of the clients' products at their scales alpha / r_c (exactly the mean when that
    has rank <= R); a client's view is the top r components at its own scale."""
    cfg = _cfg("fedpipe", num_clients=3, clients_per_round=3, lora_rank=4,
               client_budgets="3,0.6,0.45")
    srv = FP.FedPipeServer(cfg, base_identity=load_workspace(cfg, cache=False).identity)
    lay, sc = srv.layout, srv.spec.scale
    ranks = [FP.client_plan(cfg, ws.model, lay, FP.budget_of(cfg, c))[1] for c in range(3)]
    assert ranks[0] == 4 and len(set(ranks)) > 1
    w = np.array([0.5, 0.3, 0.2])
    ads = [(torch.randn(L.adapter_size(lay, r), generator=gen) * 0.1).numpy() for r in ranks]
    ups = [FI._Upload(client_id=c, num_examples=1, train_loss=1.0, tau=1, adapter=a, rank=r,
                      grads=np.zeros(1)) for c, (a, r) in enumerate(zip(ads, ranks))]
    got = srv.combine(ups, ads, w)
    assert got.size == L.adapter_size(lay, 4)
    want = {t.name: sum(wc * _dense(lay, a, r, sc(r))[t.name] for a, r, wc in zip(ads, ranks, w))
            for t in lay}
    for t in lay:
        u, s, vt = np.linalg.svd(want[t.name])
        best = (u[:, :4] * s[:4]) @ vt[:4]
        np.testing.assert_allclose(_dense(lay, got, 4, sc(4))[t.name], best, atol=1e-5)
    # a client of rank 2 gets the top 2 components at its scale alpha / 2
    srv.adapter = got
    r2 = next(r for r in ranks if r < 4)
    v2 = srv.adapter_at(r2)
    for t in lay:
        u, s, vt = np.linalg.svd(_dense(lay, got, 4, sc(4))[t.name])
        np.testing.assert_allclose(_dense(lay, v2, r2, sc(r2))[t.name],
                                   (u[:, :r2] * s[:r2]) @ vt[:r2], atol=1e-5)
    # the common space of the clients' updates: padding with zero components
    p = FP.pad(lay, v2, r2, 4)
    for a, b in L.split(lay, 4, p).values():
        assert not a[r2:].any() and not b[:, r2:].any() and a[:r2].any()


@pytest.mark.parametrize("bits", [8, 4])
def test_fedpipe_quantized_frozen_model(bits, ws, one_thread):
    pytest.importorskip("bitsandbytes")
    from kseed.modeling import EMBEDDED_DIR
    FI.set_base(ws)  # the fixture's workspace may hold a merged model from an earlier test
    q = FP.quantized_model(EMBEDDED_DIR, "fp32", ws.device, bits)
    assert q is FP.quantized_model(EMBEDDED_DIR, "fp32", ws.device, bits)  # shared in a process
    lin = q.model.layers[0].self_attn.q_proj
    assert type(lin).__name__ in ("Int8WeightOnlyLinear", "Linear4bit")
    with torch.no_grad():
        ref, out = ws.model(input_ids=_ids()).logits, q(input_ids=_ids()).logits
    err = (out - ref).abs().max().item()
    assert 0 < err < (0.5 if bits == 8 else 5.0)  # quantized, and still the same model
    lay = L.find_targets(q, ["q_proj", "v_proj"])
    with L.LoraModel(q, lay, L.LoraSpec(dropout=0.0), 2) as lm:
        lm.load(np.random.default_rng(1).normal(0, 0.1, L.adapter_size(lay, 2)).astype(np.float32))
        lm.peft(input_ids=_ids()).logits.float().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.parameters)
    assert type(q.model.layers[0].self_attn.q_proj) is type(lin)  # peft's layers removed


@pytest.mark.parametrize("bits,dtype", [(8, "fp32"), (4, "fp32"), (8, "bf16")])
def test_fedpipe_streamed_quantized_base_is_the_loaded_one(bits, dtype, one_thread):
    """The quantized base streamed into a skeleton (what a quantized client uses: it never loads
    the full-precision model) is bitwise the model that quantizing a transformers-loaded one gives:
    every parameter, buffer and quantization state, tied weights tied, the logits; and its hash is
    model_hash of the full-precision model.  A checkpoint stream_weights cannot read (other names)
    falls back to that load."""
    pytest.importorskip("bitsandbytes")
    from kseed.modeling import EMBEDDED_DIR, load_model, model_hash
    a = FP._quantized_streamed(EMBEDDED_DIR, dtype, bits)
    b = FP._quantized_loaded(EMBEDDED_DIR, dtype, bits)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        x, y = sa[k], sb[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(x.view(torch.uint8) if x.is_floating_point() else x,
                           y.view(torch.uint8) if y.is_floating_point() else y), k
    assert dict(a.named_buffers()).keys() == dict(b.named_buffers()).keys()
    assert all(torch.equal(t, dict(b.named_buffers())[n]) for n, t in a.named_buffers())
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert type(a.model.layers[1].mlp.up_proj) is type(b.model.layers[1].mlp.up_proj)
    with torch.no_grad():
        assert torch.equal(a(input_ids=_ids()).logits, b(input_ids=_ids()).logits)
    full, _ = load_model(EMBEDDED_DIR, dtype)
    assert a.kseed_base_hash == b.kseed_base_hash == model_hash(full)


def test_fedpipe_quantized_base_of_a_checkpoint_it_cannot_stream(tmp_path, one_thread):
    """A model stored as pytorch_model.bin (not safetensors): stream_weights says so before reading
    anything, and quantized_model falls back to quantizing a transformers load: the same model."""
    pytest.importorskip("bitsandbytes")
    import shutil
    from kseed.modeling import EMBEDDED_DIR, NotStreamable, load_skeleton, stream_weights
    d = tmp_path / "bin-model"
    shutil.copytree(EMBEDDED_DIR, d)
    full = FP._quantized_streamed(EMBEDDED_DIR, "fp32", 8)
    from safetensors.torch import load_file
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(NotStreamable, match="no safetensors"):
        next(stream_weights(str(d), load_skeleton(str(d)), "fp32"))
    q = FP.quantized_model(str(d), "fp32", "cpu", 8)
    with torch.no_grad():
        assert torch.equal(q(input_ids=_ids()).logits, full(input_ids=_ids()).logits)
    assert q.kseed_base_hash == full.kseed_base_hash
    with pytest.raises(ValueError, match="runs on CPU"):
        FP.quantized_model(str(d), "fp32", "meta", 8)


def _file_maps(path: str):
    """[(start, end)] of this process's mappings of the file ``path`` (Linux)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(" " + path):
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_fedpipe_quantized_model_holds_no_full_precision_copy(bits, one_thread):
    """The quantized base keeps in full precision only what quantize_frozen leaves so (embeddings,
    norms), none of it in the weight file's map: the map is released, so a quantized client's memory
    is its quantized weights, not the full-precision file's pages besides (issue #20's measurement)."""
    pytest.importorskip("bitsandbytes")
    import os
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs Linux /proc/self/maps")
    from kseed import fedpipe_parts as FPP
    from kseed.modeling import EMBEDDED_DIR, load_model
    q = FP.quantized_model(EMBEDDED_DIR, "fp32", "cpu", bits)
    full, _ = load_model(EMBEDDED_DIR, "fp32")
    st = os.path.realpath(os.path.join(EMBEDDED_DIR, "model.safetensors"))
    assert _file_maps(st)  # the full model's own map: the check below can see one
    tensors = list(q.parameters()) + list(q.buffers())
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        assert not any(lo <= ptr < hi for lo, hi in _file_maps(st)), t.shape
    quantized = set(FPP.linear_modules(full))
    want = sum(t.numel() * t.element_size() for n, t in
               list(full.named_parameters()) + list(full.named_buffers())
               if t.is_floating_point() and n.rpartition(".")[0] not in quantized)
    assert sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point()) == want
    assert FPP.stored_bytes(q) == FPP.frozen_bytes(full, bits)


def test_fedpipe_run_heterogeneous_ranks_resume_export(tmp_path, one_thread):
    """Budgets give client 0 an fp32 base at rank 4, clients 1 and 2 int8 / int4 bases at rank 2;
    every client gets the rank-4 global adapter, uploads follow the ranks exactly; resume is bitwise;
    export loads without peft."""
    pytest.importorskip("bitsandbytes")
    cfg = _cfg("fedpipe", rounds=2, eval_size=6, num_clients=3, clients_per_round=3, lr=5e-3,
               client_budgets="3,0.6,0.45")
    a, b = run_whole_and_resumed(cfg, tmp_path, 1)
    ca = json.loads((a / "checkpoint.json").read_text())["server"]
    cb = json.loads((b / "checkpoint.json").read_text())["server"]
    assert ca["method"] == "fedpipe" and ca["adapter"] == cb["adapter"]
    ident = ca["base_identity"]
    assert sum(ident["lora_mask"]) == 6 and len(ident["lora_mask"]) == 12
    lay = L.layout_from(ident["lora_layout"])
    ws = load_workspace(cfg, cache=False)
    srv = FP.FedPipeServer(cfg, base_identity=ws.identity)
    assert [FP.client_plan(cfg, ws.model, lay, FP.budget_of(cfg, c)) for c in range(3)] == [
        (32, 4), (8, 2), (4, 2)]
    rows = S.read_metrics(str(a))
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in S.read_metrics(str(b))]
    for r in rows[1:]:
        assert r["bytes_down_per_client"] == {str(c): 56 + 16 * 6 * 192 + 2 for c in range(3)}
        assert r["bytes_up_per_client"] == {"0": 36 + 16 * 6 * 192, "1": 36 + 8 * 6 * 192,
                                            "2": 36 + 8 * 6 * 192}
        assert r["accepted"] == [0, 1, 2] and r["clipped"] == {}  # norms compared per rank
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    info = S.export(str(a), str(tmp_path / "hf"))
    assert info["lora_selected"] == 6 and info["lora_rank"] == 4
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    srv.load_state_dict(ca)
    srv.load_global(ws)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=_ids()).logits, ws.model(input_ids=_ids()).logits)
    # a client refuses a mask that names no candidate or too many, and a global adapter of another
    # rank than the run's
    parts, _, _ = build_data(cfg)
    cl = FP.FedPipeClient(cfg, lambda: ws, parts[1], client_id=1)
    good = srv.make_down(3, 1)
    for tail, why in ((b"\0\0", "selects none"), (b"\xff\xff", "names more")):
        with pytest.raises(P.ProtocolError, match=why):
            cl.fit(good[:-2] + tail)
    m = L.decode_down(good, FP.DOWN_MAGIC, size_of=lambda r: L.adapter_size(lay, r), tail=2)
    low = L.encode_down(dataclasses.replace(m, rank=2, adapter=srv.adapter_at(2)), FP.DOWN_MAGIC, good[-2:])
    with pytest.raises(P.ProtocolError, match="field rank = 2 does not match"):
        cl.fit(low)
    # the server reads each upload's rank: 1..4 are allowed, 5 is refused unread as oversized
    up = L.decode_up(cl.fit(good), FP.UP_MAGIC, size_of=lambda r: L.adapter_size(lay, r),
                     ranks=range(1, 5))
    assert up.rank == 2 and cl.last_stats["rank"] == 2 and cl.last_stats["base_bits"] == 8
    big = L.encode_up(dataclasses.replace(up, rank=5, adapter=np.zeros(L.adapter_size(lay, 5), np.float32)),
                      FP.UP_MAGIC)
    with pytest.raises(P.ProtocolError, match="oversized upload"):
        L.decode_up(big, FP.UP_MAGIC, size_of=lambda r: L.adapter_size(lay, r), ranks=range(1, 5))
    three = L.encode_up(dataclasses.replace(up, rank=3, adapter=np.zeros(L.adapter_size(lay, 3), np.float32)),
                        FP.UP_MAGIC)
    with pytest.raises(P.ProtocolError, match="rank-3 adapter, this client's rank is 4"):
        L.decode_up(three, FP.UP_MAGIC, size_of=lambda r: L.adapter_size(lay, r), ranks=[4])
    assert len(lay) == 6


def test_fedpipe_quantized_client_never_loads_the_full_model(one_thread):
    """A client whose budget gives it a quantized base trains without calling its model loader
    (the full-precision workspace): its layout from the skeleton, its tokenizer alone, its base hash
    from the streamed weights; and its upload is bitwise the one a client holding the workspace
    sends."""
    pytest.importorskip("bitsandbytes")
    cfg = _cfg("fedpipe", num_clients=2, clients_per_round=2, client_budgets="3,0.6")
    ws = load_workspace(cfg, cache=False)
    srv = FP.FedPipeServer(cfg, base_identity=ws.identity)
    parts, _, _ = build_data(cfg)
    down = srv.make_down(1, 1)

    def no_loader():
        raise AssertionError("the quantized client loaded the full-precision model")
    lean = FP.FedPipeClient(cfg, no_loader, parts[1], client_id=1)
    up = lean.fit(down)
    assert lean.plan() == (8, 2) and lean._ws is None and lean.rebuild_seconds == 0.0
    assert lean.base_model_hash() == ws.identity["hash"]
    held = FP.FedPipeClient(cfg, lambda: ws, parts[1], client_id=1)
    held.workspace  # noqa: B018 - a client that holds the workspace anyway
    assert held.fit(down) == up
    # a node's budget overrides --client-budgets: 3 MiB on client 1's node gives it rank 4 on fp32
    node = FP.FedPipeClient(cfg, lambda: ws, parts[1], client_id=1, memory_budget_mib=3)
    assert L.decode_up(node.fit(down), FP.UP_MAGIC, size_of=lambda r: L.adapter_size(srv.layout, r),
                       ranks=[4]).rank == 4 and node.plan() == (32, 4)
    for bad in (0, -1, "x", float("nan"), True):
        with pytest.raises(ValueError, match="memory-budget-mib"):
            FP.FedPipeClient(cfg, lambda: ws, parts[1], client_id=1, memory_budget_mib=bad)
