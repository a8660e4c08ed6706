"""FedMeZO and MeZO (kseed.methods.fedmezo, kseed.methods.mezo): the wire format (exact sizes, hostile
bytes), the aggregation (pairs, order, coefficients, weights) and the threat model's bounds on the new
upload, FedAvg equivalence against plain torch MeZO clients whose state dicts are averaged, every
client rebuilding bitwise the server's model, catch-up from a client's model cache bitwise equal to a
rebuild, the history in the run directory (resume bitwise, a torn record named), and MeZO's one
client."""
import json
import math
import os

import numpy as np
import pytest
import torch

from bitwise import bits
from kseed import methods
from kseed import modeling as M
from kseed import protocol as P
from kseed import simulation as S
from kseed.config import FedConfig
from kseed.history import GENESIS, decode_rounds
from kseed.methods import fedmezo as F
from kseed.methods.base import bound_uploads
from kseed.task import build_data, load_workspace
from kseed_kernels import gaussian, stream_id

SMALL = dict(num_clients=3, clients_per_round=2, local_steps=4, lr=2e-4, eps=1e-3, batch_size=2,
             embedded_examples=180, min_per_client=5, eval_size=8, rouge_size=0, seed=13)


def _cfg(method="fedmezo", **kw):
    return FedConfig(**methods.get(method).configure({**SMALL, **kw})).validate()


def _up(rnd, cid, g, n=10, loss=1.0, cached=0):
    return F.encode_up(F.MeZOUp(round=rnd, client_id=cid, num_examples=n,
                                grads=np.asarray(g, np.float32), train_loss=loss, cached=cached))


# ------------------------------------------------------------------------------- wire format
def test_wire_sizes_and_round_trip(gen):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    cfg = _cfg(num_clients=3, clients_per_round=3, local_steps=6)
    s = F.FedMeZOServer(cfg)
    assert len(s.make_down(1, 0)) == 128 + 16  # nothing to carry before round 1
    ups = {c: _up(1, c, rng.standard_normal(6)) for c in range(3)}
    assert all(len(u) == 32 + 4 * 6 == F.up_size(6) for u in ups.values())
    s.aggregate(1, ups)
    down = s.make_down(2, 1)
    assert len(down) == 128 + 16 + 12 + 12 * 18  # one round of 3 x 6 pairs
    m = F.decode_down(down, expected_fingerprint=F.run_fingerprint(cfg.seed))
    assert (m.round, m.client_id, m.start, m.local_steps, m.batch_size) == (2, 1, 1, 6, cfg.batch_size)
    assert m.digest_before == GENESIS.hex() and m.digest_model == s.history.digest(1)
    assert m.lr == cfg.lr and m.eps == cfg.eps and m.client_seed == P.client_rng_seed(cfg.seed, 2, 1)
    assert F.encode_down(m) == down
    (r, seeds, coefs), = decode_rounds(m.span)
    assert r == 1 and np.array_equal(seeds[:6], F.step_seeds(cfg.seed, 1, 0, 6))
    u = F.decode_up(ups[2], expected_round=1, expected_client=2, max_steps=6)
    assert u.tau == 6 and F.encode_up(u) == ups[2]
    # the paper's Dolly setting: tau 200 -> 832 bytes up; a round of 10 x 200 pairs is 24,012 bytes
    assert F.up_size(200) == 832


def test_decoders_refuse_bad_bytes():
    cfg = _cfg(clients_per_round=3)
    s = F.FedMeZOServer(cfg)
    down = s.make_down(1, 0)
    up = _up(1, 0, [0.5, -1.0, 2.0])

    def bad_down(data, msg, **kw):
        with pytest.raises(P.ProtocolError, match=msg):
            F.decode_down(data, **kw)

    bad_down(down[:100], "truncated")
    bad_down(b"XXXX" + down[4:], "magic")
    bad_down(down[:4] + b"\x02\x00" + down[6:], "version")
    bad_down(down[:6] + b"\x04\x00" + down[8:], "flags")
    bad_down(down[:60] + b"\x01\x00\x00\x00" + down[64:], "reserved")
    bad_down(down[:56] + b"\x05\x00\x00\x00" + down[60:], "rounds 5..0")
    bad_down(down, "fingerprint", expected_fingerprint=b"\0" * 8)
    bad_down(down[:40] + np.float64(np.nan).tobytes() + down[48:], "eps")
    bad_down("text", "bytes")

    def bad_up(data, msg, **kw):
        with pytest.raises(P.ProtocolError, match=msg):
            F.decode_up(data, **kw)

    bad_up(up[:20], "truncated")
    bad_up(up[:-1], "wrong length")
    bad_up(up + b"\0\0\0\0", "wrong length")
    bad_up(b"KSU1" + up[4:], "magic")
    bad_up(up[:6] + b"\x01\x00" + up[8:], "flags")
    bad_up(up, "oversized", max_steps=2)
    bad_up(up, "wrong round", expected_round=2)
    bad_up(up, "names client 0", expected_client=1)
    bad_up(up[:16] + b"\0\0\0\0" + up[20:], "0 examples")
    bad_up(up[:32] + np.float32(np.inf).tobytes() + up[36:], "NaN/inf")
    bad_up(_up(3, 0, [1.0], cached=2)[:28] + b"\x01\x00\x00\x00" + _up(3, 0, [1.0])[32:],
           "keeps round 1")
    with pytest.raises(P.ProtocolError, match="not finite"):
        _up(1, 0, [np.nan])
    with pytest.raises(P.ProtocolError, match="cached round"):
        _up(2, 0, [1.0], cached=2)
    # the server rejects them and goes on with the rest
    stats = s.aggregate(1, {0: up[:-1], 1: _up(1, 1, [1.0, 2.0]), 2: b"junk"})
    assert "wrong length" in stats["rejected"][0] and stats["accepted"] == [1]


# ------------------------------------------------------------------------------- aggregation
def test_round_pairs_order_and_coefficients(gen):
    """The round's update: clients in id order, steps in order, seed derived from (run seed, round,
    client, step), coef = -(w_c lr_c g) with w_c the clients' known example counts, normalised; zero
    coefficients (skipped steps) left out; the client-wise lr (FedMeZO's rule) enters as lr_c."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    cfg = _cfg(num_clients=4, clients_per_round=3, local_steps=5, clientwise_lr=True,
               lr_rule="fedmezo", lr_signal="round-wise")
    s = F.FedMeZOServer(cfg)
    for rnd in (1, 2, 3):
        ids = s.sample_clients(rnd)
        g = {c: rng.standard_normal(5).astype(np.float32) for c in ids}
        g[ids[0]][2] = 0.0  # a skipped step
        n = {c: int(rng.integers(5, 50)) for c in ids}
        lrs = s.round_lrs(rnd)
        assert {c: F.decode_down(s.make_down(rnd, c)).lr for c in ids} == lrs
        s.aggregate(rnd, {c: _up(rnd, c, g[c], n=99, loss=float(rng.uniform(1, 3))) for c in ids},
                    weights=n)
        tot = sum(n.values())
        want_s, want_c = [], []
        for c in sorted(ids):
            coef = (-((n[c] / tot) * lrs[c] * g[c].astype(np.float64))).astype(np.float32)
            keep = coef != 0
            want_s.append(F.step_seeds(cfg.seed, rnd, c, 5)[keep])
            want_c.append(coef[keep])
        (r, got_s, got_c), = s.history.read(rnd, rnd)
        assert r == rnd and np.array_equal(got_s, np.concatenate(want_s))
        np.testing.assert_allclose(got_c, np.concatenate(want_c), rtol=1e-6)
        assert len(got_s) == 3 * 5 - 1
    assert len(set(lrs.values())) > 1  # the rule gave the clients different lrs


def test_bounds_apply_to_the_fedmezo_upload():
    """The threat model's bounds on the new upload: one absurd g is clipped, a scaled-up update is
    scaled back to the norm bound, a claimed example count is capped, a reported loss clipped; an
    honest round is untouched (bitwise)."""
    cfg = _cfg(num_clients=4, clients_per_round=4, local_steps=200)
    rng = np.random.default_rng(3)
    honest = {c: rng.standard_normal(200).astype(np.float32) for c in range(4)}
    ups = [F.decode_up(_up(1, c, honest[c])) for c in range(4)]
    b = bound_uploads(cfg, ups)
    assert b.clipped == {} and all(np.array_equal(x, u.grads.astype(np.float64))
                                   for x, u in zip(b.grads, ups))
    lie = dict(honest)
    lie[1] = honest[1].copy()
    lie[1][0] = 1e4  # one absurd pair
    lie[2] = 30 * honest[2]  # every pair scaled up
    ups = [F.decode_up(_up(1, c, lie[c], n=10 if c != 3 else 10**6, loss=1e30 if c == 0 else 1.0))
           for c in range(4)]
    b = bound_uploads(cfg, ups)
    assert "|g| clipped" in b.clipped[1] and abs(b.grads[1][0]) <= b.limits["g"] < 1e4
    assert "update norm" in b.clipped[2]
    assert np.linalg.norm(b.grads[2]) == pytest.approx(b.limits["norm"])
    assert "capped" in b.clipped[3] and b.weights[3] == b.limits["examples"]
    assert "loss" in b.clipped[0] and b.losses[0] == b.limits["loss"]
    # ... and the server's round uses the bounded values
    s = F.FedMeZOServer(cfg)
    st = s.aggregate(1, {c: _up(1, c, lie[c], n=10 if c != 3 else 10**6) for c in range(4)})
    assert set(st["clipped"]) == {1, 2, 3}
    (_, _, coefs), = s.history.read(1, 1)
    assert np.abs(coefs).max() < 1e4 * cfg.lr / 4


# --------------------------------------------------------------------- FedAvg of MeZO clients
def _torch_mezo_round(model, items, pad_id, cfg, rnd, cid, lr, global_sd):
    """One MeZO client in plain torch from ``global_sd``: per step a fresh seed, z per named
    parameter from kseed_kernels.gaussian with the parameter's stream id, w + eps z, L+, w - 2 eps z,
    L-, back to w, w - lr g z.  Returns the client's full state dict."""
    model.load_state_dict(global_sd)
    named = list(model.named_parameters())
    rng = np.random.Generator(np.random.PCG64(P.client_rng_seed(cfg.seed, rnd, cid)))
    bs = min(cfg.batch_size, len(items))
    order = [rng.choice(len(items), size=bs, replace=False) for _ in range(cfg.local_steps)]
    with torch.no_grad():
        for t, seed in enumerate(F.step_seeds(cfg.seed, rnd, cid, cfg.local_steps)):
            z = [gaussian(int(seed), p.numel(), stream=stream_id(n)).view_as(p) for n, p in named]
            batch = M.collate([items[i] for i in order[t]], pad_id, "cpu")
            for (_, p), zi in zip(named, z):
                p.add_(cfg.eps * zi)
            lp = M.batch_loss(model, batch)
            for (_, p), zi in zip(named, z):
                p.sub_(2 * cfg.eps * zi)
            lm = M.batch_loss(model, batch)
            for (_, p), zi in zip(named, z):
                p.add_(cfg.eps * zi)
            g = (lp - lm) / (2 * cfg.eps)
            for (_, p), zi in zip(named, z):
                p.sub_(lr * g * zi)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fedavg_of_mezo_clients_in_plain_torch(one_thread):
    """Three rounds of FedMeZO through the server and client objects (each client with its own
    model, rebuilt from the history the down message carries) against the same clients trained with
    plain torch MeZO and their full state dicts averaged by example count: they agree within float
    tolerance; and every client rebuilds bitwise the server's model.  (The aggregation bounds are
    off: FedAvg does not have them; with 2 clients the norm bound binds now and then.)"""
    cfg = _cfg(rounds=3, g_clip=0.0, norm_bound=0.0)
    parts, _, _ = build_data(cfg)
    server_ws = load_workspace(cfg, cache=False)
    server = F.FedMeZOServer(cfg, base_identity=server_ws.identity)
    clients = {c: F.FedMeZOClient(cfg, (lambda: load_workspace(cfg, cache=False)), parts[c],
                                  client_id=c) for c in range(cfg.num_clients)}
    ref, tok = M.load_model(M.EMBEDDED_DIR)
    items = {c: M.tokenize_examples(tok, parts[c], cfg.max_length, cfg.prompt_template())
             for c in range(cfg.num_clients)}
    global_sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    w0 = {k: v.clone() for k, v in global_sd.items()}
    for rnd in (1, 2, 3):
        ids = server.sample_clients(rnd)
        server.aggregate(rnd, {c: clients[c].fit(server.make_down(rnd, c)) for c in ids},
                         weights={c: len(parts[c]) for c in ids})
        tot = sum(len(parts[c]) for c in ids)
        sds = {c: _torch_mezo_round(ref, items[c], int(tok.pad_token_id), cfg, rnd, c, cfg.lr,
                                    global_sd) for c in ids}
        global_sd = {k: sum((len(parts[c]) / tot) * sds[c][k] for c in ids) for k in global_sd}
    server.load_global(server_ws)
    moved = max(float((global_sd[n] - w0[n]).abs().max()) for n in server_ws.ms.names)
    assert moved > 1e-4  # the clients trained
    for n, p in zip(server_ws.ms.names, server_ws.ms.params):
        err = float((p.detach() - global_sd[n]).abs().max())
        assert err <= 1e-3 * moved + 1e-6, (n, err, moved)
    # every client rebuilds bitwise the server's model_3 from w0 and the history
    want = [bits(p.detach().clone()) for p in server_ws.ms.params]
    for c, cl in clients.items():
        cl.evaluate(server.make_down(server.round + 1, c), examples=parts[c][:1])
        for a, b in zip(cl.workspace.ms.params, want):
            assert torch.equal(bits(a.detach()), b), c


# ----------------------------------------------------------------------------------- catch-up
def test_catch_up_from_the_model_cache_is_a_rebuild(tmp_path, one_thread):
    """A client with a cache-dir gets only the rounds it missed and ends bitwise where a client
    without one (the whole history from w0) ends; a stale cache is refused by name and the server
    then sends the whole history again."""
    cfg = _cfg(num_clients=2, clients_per_round=2, local_steps=3)
    parts, _, _ = build_data(cfg)
    server = F.FedMeZOServer(cfg)
    cached = F.FedMeZOClient(cfg, (lambda: load_workspace(cfg, cache=False)), parts[0], client_id=0,
                             cache_dir=str(tmp_path / "cache"))
    plain = F.FedMeZOClient(cfg, (lambda: load_workspace(cfg, cache=False)), parts[1], client_id=1)
    cl = {0: cached, 1: plain}
    sizes = []
    for rnd in (1, 2, 3):
        downs = {c: server.make_down(rnd, c) for c in (0, 1)}
        sizes.append({c: len(d) for c, d in downs.items()})
        server.aggregate(rnd, {c: cl[c].fit(downs[c]) for c in (0, 1)})
    # round 1: nothing to carry; round 2: both get round 1; round 3: the cached client only round 2
    assert sizes[0] == {0: 144, 1: 144}
    assert sizes[1][0] == sizes[1][1] and sizes[2][0] < sizes[2][1]
    assert cached.last_catch_up["rounds"] == 1 and plain.last_catch_up["rounds"] == 2
    assert server.client_cached == {0: 2}
    d0, d1 = server.make_down(4, 0), server.make_down(4, 1)
    assert F.decode_down(d0).start == 3 and F.decode_down(d1).start == 1
    cached.load(d0)
    plain.load(d1)
    for a, b in zip(cached.workspace.ms.params, plain.workspace.ms.params):
        assert torch.equal(bits(a.detach()), bits(b.detach()))
    # a stale cache (another round's model) is refused by name
    server2 = server
    server2.client_cached = {0: 1}  # the server believes the client keeps round 1
    with pytest.raises(P.ProtocolError, match="hold the global model of round 1"):
        cached.fit(server2.make_down(4, 0))
    server2.aggregate(4, {1: plain.fit(server2.make_down(4, 1))})  # client 0 failed this round
    assert server2.client_cached == {} and F.decode_down(server2.make_down(5, 0)).start == 1


# ------------------------------------------------------------------------ run directory, MeZO
def test_history_in_the_run_directory_resume_and_torn_record(tmp_path, one_thread):
    cfg = _cfg(rounds=3, local_steps=2, eval_size=4)
    a, b = tmp_path / "a", tmp_path / "b"
    S.run(cfg, str(a), progress=False)
    S.run(FedConfig(**{**cfg.to_dict(), "rounds": 2}), str(b), progress=False)
    ck = json.loads((b / "checkpoint.json").read_text())["server"]
    assert ck["history"]["rounds"] == 2 and ck["history"]["file"] == "history.bin"
    good = (b / "history.bin").read_bytes()
    ck_text, metrics_text = (b / "checkpoint.json").read_text(), (b / "metrics.jsonl").read_text()
    # a round appended after the checkpoint (a crash before it) is dropped on resume
    full = (a / "history.bin").read_bytes()
    assert full.startswith(good) and len(full) > len(good)
    (b / "history.bin").write_bytes(full)
    S.run(cfg, str(b), resume=True, progress=False)
    assert (a / "history.bin").read_bytes() == (b / "history.bin").read_bytes()
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in S.read_metrics(str(a))]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in S.read_metrics(str(b))]
    ca = json.loads((a / "checkpoint.json").read_text())["server"]
    cb = json.loads((b / "checkpoint.json").read_text())["server"]
    assert ca["history"] == cb["history"] and ca["client_loss"] == cb["client_loss"]
    # a torn record after the checkpoint (a kill in the middle of an append) is dropped on resume
    (b / "checkpoint.json").write_text(ck_text)
    (b / "metrics.jsonl").write_text(metrics_text)
    (b / "history.bin").write_bytes(full[:-7])
    S.run(cfg, str(b), resume=True, progress=False)
    assert (a / "history.bin").read_bytes() == (b / "history.bin").read_bytes()
    # a torn last record the checkpoint needs is detected and named
    (b / "history.bin").write_bytes(full[:-7])
    with pytest.raises(ValueError, match=r"history.bin: round 3 \(record at byte offset \d+\) is torn"):
        S.run(FedConfig(**{**cfg.to_dict(), "rounds": 4}), str(b), resume=True, progress=False)
    # export rebuilds the final model from the history
    (b / "history.bin").write_bytes(full)
    info = S.export(str(a), str(tmp_path / "hf"))
    assert info["method"] == "fedmezo" and info["history_rounds"] == 3 and info["history_pairs"] > 0


def test_mezo_is_one_client_with_all_the_data(tmp_path, one_thread):
    cfg = _cfg("mezo", rounds=2, local_steps=2, eval_size=4)
    assert cfg.num_clients == cfg.clients_per_round == 1 and cfg.g_clip == 0
    parts, _, _ = build_data(cfg)
    fed = _cfg(rounds=2, local_steps=2, eval_size=4)
    fparts, _, _ = build_data(fed)
    assert len(parts) == 1 and sorted(map(json.dumps, parts[0])) == sorted(
        json.dumps(e) for p in fparts for e in p)
    summary = S.run(cfg, str(tmp_path / "m"), progress=False)
    rows = S.read_metrics(str(tmp_path / "m"))
    assert summary["rounds"] == 2 and [r["clients"] for r in rows[1:]] == [[0], [0]]
    assert all(r["bytes_up"] == 32 + 4 * 2 for r in rows[1:])
    assert math.isfinite(summary["eval_loss_last"])
    with pytest.raises(ValueError, match="--method mezo needs --num-clients 1"):
        FedConfig(method="mezo").validate()
    ni = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "ni")
    tasks, _, _ = build_data(FedConfig(dataset="ni", data=ni, num_clients=3, clients_per_round=2,
                                       seed=SMALL["seed"]))
    one, _, _ = build_data(_cfg("mezo", dataset="ni", data=ni))
    assert len(one) == 1 and one[0] == [e for t in tasks for e in t]


def test_kseed_fed_method_options(tmp_path, capsys):
    from kseed import cli
    help_ = cli._parser().format_help()
    for title in ("federation:", "zeroth-order local training", "fedkseed: the K-seed pool:", "data:",
                  "evaluation:", "robustness", "output and runtime:"):
        assert title in help_, title
    for args, msg in ((["--method", "fedmezo", "-K", "8"], "--method fedmezo does not use --num-seeds"),
                      (["--method", "mezo", "--clientwise-lr"], "--method mezo does not use --clientwise-lr"),
                      (["--method", "mezo", "--norm-bound", "2"], "--method mezo does not use --norm-bound"),
                      (["--method", "fedkseed-pro", "--sampling", "uniform"], "fedkseed-pro")):
        out = tmp_path / "x"
        assert cli.main([*args, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
        assert not out.exists()
