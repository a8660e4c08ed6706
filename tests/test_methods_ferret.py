"""Ferret (kseed.methods.ferret): the grouping and seeds-per-group rules, the projection against plain
torch, unbiasedness, the wire format (exact sizes, hostile bytes), a federation whose clients rebuild
bitwise the server's model, bitwise resume and export, the Flower grid, and the CLI's options."""
import json
import math

import numpy as np
import pytest
import torch

from bitwise import bits
from conftest import run_whole_and_resumed
from kseed import methods
from kseed import protocol as P
from kseed import simulation as S
from kseed.config import FedConfig
from kseed.history import HistoryError
from kseed.methods import ferret as FR
from kseed.task import build_data, load_workspace
from kseed_kernels import gaussian, rademacher

SMALL = dict(num_clients=3, clients_per_round=2, local_steps=2, lr=0.05, batch_size=2, num_seeds=64,
             embedded_examples=180, min_per_client=5, eval_size=8, rouge_size=0, seed=13)


def _cfg(**kw):
    return FedConfig(**methods.get("ferret").configure({**SMALL, **kw})).validate()


# ------------------------------------------------------------------------------------ rules
def test_grouping_rule():
    # median 65 -> target int(58.5) = 58: consecutive tensors packed until the next would pass it
    assert FR.ferret_groups([50, 30, 20, 100, 100, 5, 80, 200]) == [
        (0, 1), (1, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8)]
    assert FR.ferret_groups([10, 10, 10, 40, 10]) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert FR.ferret_groups([2, 2, 2, 10, 10, 10, 10, 10, 10, 4, 5]) == [
        (0, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 11)]  # median 10: target 9
    assert FR.ferret_groups([10]) == [(0, 1)]
    assert FR.ferret_groups([]) == []
    sizes = list(np.random.default_rng(3).integers(1, 1000, 40))
    gs = FR.ferret_groups(sizes)
    target = int(0.9 * np.median(sizes))
    assert gs[0][0] == 0 and gs[-1][1] == 40 and all(a[1] == b[0] for a, b in zip(gs, gs[1:]))
    for i, (a, b) in enumerate(gs):
        assert b - a == 1 or sum(sizes[a:b]) <= target  # a group over target is one tensor
        if i + 1 < len(gs):
            assert sum(sizes[a:b + 1]) > target  # the next tensor would pass it


def test_seeds_per_group_rule():
    k = 100
    n = FR.seeds_per_group([1.0, 0.5, 0.001, 0.0, float("nan"), 0.999], k)
    assert n.tolist() == [100, 50, 2, 2, 2, 99]
    assert FR.seeds_per_group([0.0, 0.0], 1).tolist() == [1, 1]  # never more than K
    idx = FR.group_indices(5, 3, 1, 2, 20, k)
    assert idx.dtype == np.uint32 and len(set(idx.tolist())) == 20 and idx.max() < k
    assert np.array_equal(idx, np.sort(idx)) and np.array_equal(idx, FR.group_indices(5, 3, 1, 2, 20, k))
    assert not np.array_equal(idx, FR.group_indices(5, 3, 1, 3, 20, k))


# ------------------------------------------------------------------------------- projection
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_projection_against_plain_torch(noise, gen, one_thread):
    """The client's coefficients are <delta_g, z_k> / n_g with z from kseed_kernels.gaussian /
    rademacher per tensor's stream id, for the group's derived seeds."""
    cfg = _cfg(noise=noise, num_seeds=32)
    parts, _, _ = build_data(cfg)
    cl = FR.FerretClient(cfg, lambda: load_workspace(cfg, cache=False), parts[0], client_id=0)
    ms = cl.workspace.ms
    delta = [torch.randn(p.shape, generator=gen) * (1 + i % 3) for i, p in enumerate(ms.params)]
    counts, coefs = cl.project(delta, 4, 0)
    assert counts.size == len(cl.groups) > 1 and coefs.size == counts.sum()
    fn = gaussian if noise == "gaussian" else rademacher
    off = 0
    for g, ((a, b), n) in enumerate(zip(cl.groups, counts)):
        idx = FR.group_indices(cfg.seed, 4, 0, g, int(n), cfg.num_seeds)
        for j, k in enumerate(idx):
            s = int(cl.pool[k])
            terms = [delta[i].double().flatten() *
                     fn(s, delta[i].numel(), stream=ms.streams[i]).double() for i in range(a, b)]
            want = sum(float(t.sum()) for t in terms) / int(n)
            scale = sum(float(t.abs().sum()) for t in terms) / int(n)  # float32 sums' error
            assert abs(coefs[off + j] - want) <= 1e-6 * scale, (g, j)
        off += int(n)


def test_reconstruction_is_unbiased():
    """Many seeds: sum_k (<delta, z_k> / n) z_k approaches delta (correlation near 1; ~ sqrt(n/d)
    for n << d as the estimator predicts)."""
    d, n = 4000, 2000
    delta = torch.randn(d, dtype=torch.float64)
    seeds = np.arange(1, n + 1, dtype=np.uint64)
    import kseed_kernels as K
    c = K.project_seeds(delta.float(), torch.tensor(seeds.view(np.int64)), stream=7).double() / n
    z = torch.stack([gaussian(int(s), d, stream=7).double() for s in seeds])
    rec = (c[:, None] * z).sum(0)
    corr = float(torch.nn.functional.cosine_similarity(rec, delta, dim=0))
    assert 0.45 < corr < 0.8, corr  # E ~ sqrt(n / (n + d)) = 0.58
    # scale: the projection of rec on delta is delta itself (unbiased), within noise
    ratio = float(rec @ delta / (delta @ delta))
    assert abs(ratio - 1) < 0.1, ratio


# ---------------------------------------------------------------------------------- wire format
def _up(rnd=1, cid=0, counts=(2, 3), n=10, loss=1.0, cached=0):
    counts = np.asarray(counts, np.uint32)
    return FR.encode_up(FR.FerretUp(round=rnd, client_id=cid, num_examples=n, counts=counts,
                                    coefs=np.arange(1, counts.sum() + 1, dtype=np.float32) / 7,
                                    train_loss=loss, cached=cached))


def test_wire_sizes_and_hostile_uploads():
    up = _up()
    assert len(up) == 36 + 4 * 2 + 4 * 5 == FR.up_size([2, 3])
    m = FR.decode_up(up, groups=2, k=8, expected_round=1, expected_client=0)
    assert m.counts.tolist() == [2, 3] and FR.encode_up(m) == up

    def bad(data, msg, **kw):
        with pytest.raises(P.ProtocolError, match=msg):
            FR.decode_up(data, **{"groups": 2, "k": 8, **kw})
    bad(up[:20], "truncated")
    bad(b"XXXX" + up[4:], "not a Ferret upload")
    bad(up[:4] + b"\x02\x00" + up[6:], "version 2")
    bad(up[:6] + b"\x01\x00" + up[8:], "flags")
    bad(up, "upload has 2 groups, the model has 3", groups=3)
    bad(up, "round 1, expected 2", expected_round=2)
    bad(up, "client 0, expected 1", expected_client=1)
    bad(up + b"\0" * 4, "wrong length")
    bad(up, "oversized", k=1)
    bad(_up(counts=(1, 4)), r"n_g = 1 seeds, not in \[2, K = 8\]")
    bad(_up(counts=(2, 9)), r"group 1 has n_g = 9")
    hdr = bytearray(up)
    hdr[24:28] = (4).to_bytes(4, "little")  # N says 4, the counts sum to 5
    bad(bytes(hdr[:-4]), "sum to 5")
    nan = bytearray(up)
    nan[-4:] = np.float32("nan").tobytes()
    bad(bytes(nan), "NaN/inf coefficient")
    zero = bytearray(up)
    zero[16:20] = bytes(4)
    bad(bytes(zero), "0 examples")
    bad(_up(rnd=3, cached=1), "keeps round 1", expected_round=3)
    bad("text", "must be bytes")


def test_history_pairs_are_checked(one_thread):
    cfg = _cfg()
    ws = load_workspace(cfg, cache=False)
    groups = FR.ferret_groups([p.numel() for p in ws.ms.params])
    pool = P.seed_pool(cfg.seed, cfg.num_seeds)
    big = np.uint64(len(groups)) << np.uint64(32)
    for seeds, msg in (([big], "names group"), ([np.uint64(cfg.num_seeds)], "pool seed"),
                       ([np.uint64(3), np.uint64(2)], "ascending")):
        with pytest.raises(HistoryError, match=msg):
            FR.apply_grouped(ws.ms, [(1, np.array(seeds, np.uint64),
                                      np.ones(len(seeds), np.float32))], groups, pool)


# ---------------------------------------------------------------------------------- federation
def test_two_rounds_every_client_rebuilds_the_server_model(one_thread):
    """Two rounds through the server and client objects (each client with its own model, rebuilt
    from w0 and the history its down message carries): every client ends bitwise at the server's
    model; the round's pairs are the weighted means of the clients' coefficients, scaled by
    -server_lr; the group of a pair is the only one that moved."""
    cfg = _cfg(server_lr=2.0, norm_bound=0.0, g_clip=0.0)
    parts, _, _ = build_data(cfg)
    server_ws = load_workspace(cfg, cache=False)
    server = FR.FerretServer(cfg, base_identity=server_ws.identity)
    clients = {c: FR.FerretClient(cfg, (lambda: load_workspace(cfg, cache=False)), parts[c],
                                  client_id=c) for c in range(cfg.num_clients)}
    for rnd in (1, 2):
        ids = server.sample_clients(rnd)
        ups = {c: clients[c].fit(server.make_down(rnd, c)) for c in ids}
        stats = server.aggregate(rnd, ups, weights={c: len(parts[c]) for c in ids})
        assert stats["steps"] == 2 * cfg.local_steps and stats["pairs"] > 0
        assert all(math.isfinite(clients[c].last_stats["train_loss"]) for c in ids)
        # the pairs: -slr x the weighted mean per (group, seed)
        (r, seeds, coefs), = server.history.read(rnd, rnd)
        tot = sum(len(parts[c]) for c in ids)
        want = {}
        for c in ids:
            m = FR.decode_up(ups[c], groups=len(server.groups), k=cfg.num_seeds)
            off = 0
            for g, n in enumerate(m.counts):
                for k in FR.group_indices(cfg.seed, rnd, c, g, int(n), cfg.num_seeds):
                    key = (g << 32) | int(k)
                    want[key] = want.get(key, 0.0) + len(parts[c]) / tot * float(m.coefs[off])
                    off += 1
        keys = sorted(k for k, v in want.items() if v != 0)
        assert seeds.tolist() == keys
        np.testing.assert_allclose(coefs, [-2.0 * want[k] for k in keys], rtol=1e-5)
    server.load_global(server_ws)
    want = [bits(p.detach().clone()) for p in server_ws.ms.params]
    w0 = server_ws.w0
    assert any(not torch.equal(p.detach(), b) for p, b in zip(server_ws.ms.params, w0))
    for c, cl in clients.items():
        cl.evaluate(server.make_down(server.round + 1, c), examples=parts[c][:1])
        for a, b in zip(cl.workspace.ms.params, want):
            assert torch.equal(bits(a.detach()), b), c
    # a client refuses a down message with another server step size
    other = FR.FerretClient(_cfg(server_lr=1.0, norm_bound=0.0, g_clip=0.0),
                            (lambda: load_workspace(cfg, cache=False)), parts[0], client_id=0)
    with pytest.raises(P.ProtocolError, match="server_lr"):
        other.fit(server.make_down(3, 0))


def test_seed_clip_binds():
    """With a tiny --seed-clip each stored |coef| is server_lr x seed_clip / sqrt(d_g)."""
    cfg = _cfg(seed_clip=1e-6, num_clients=2, clients_per_round=2)
    ws = load_workspace(cfg, cache=False)
    s = FR.FerretServer(cfg, base_identity=ws.identity)
    ups = {}
    for c in (0, 1):
        counts = np.full(len(s.groups), 2, np.uint32)
        ups[c] = FR.encode_up(FR.FerretUp(round=1, client_id=c, num_examples=5, counts=counts,
                                          coefs=np.ones(int(counts.sum()), np.float32)))
    st = s.aggregate(1, ups)
    (_, seeds, coefs), = s.history.read(1, 1)
    g = (seeds >> np.uint64(32)).astype(int)
    np.testing.assert_allclose(np.abs(coefs), 1e-6 / np.sqrt(s.group_sizes[g]), rtol=1e-6)
    assert st["seed_clipped"] == len(seeds) > 0 and (coefs < 0).all()


def test_run_resume_bitwise_and_export(tmp_path, one_thread):
    cfg = _cfg(rounds=3, eval_size=4)
    a, b = run_whole_and_resumed(cfg, tmp_path, 2)
    assert (a / "history.bin").read_bytes() == (b / "history.bin").read_bytes()
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in S.read_metrics(str(a))]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in S.read_metrics(str(b))]
    ck = json.loads((a / "checkpoint.json").read_text())["server"]
    assert ck["method"] == "ferret" and ck["history"]["rounds"] == 3
    rows = S.read_metrics(str(a))
    assert all(math.isfinite(r["eval_loss"]) for r in rows)
    info = S.export(str(a), str(tmp_path / "hf"))
    assert info["method"] == "ferret" and info["history_rounds"] == 3 and info["history_pairs"] > 0


def test_flower_grid_matches_simulation(tmp_path, one_thread):
    pytest.importorskip("flwr")
    from test_flower import SMALL as FSMALL, _task_identity
    from test_flower_methods import CachingGrid, _same_run
    from kseed.flower.runconfig import fed_config
    from kseed.flower.server_app import run_federation

    out = tmp_path / "flower"
    rc = dict(FSMALL, method="ferret", rounds=2, out=str(out), lr=0.05, eps=1e-3,
              **{"local-steps": 2, "eval-size": 8, "node-wait-timeout": 5.0})
    with _task_identity():
        run_federation(CachingGrid(rc, 2, {0: str(tmp_path / "cache0")}), rc)
    S.run(fed_config(rc), str(tmp_path / "sim"), progress=False)
    rows, _ = _same_run(out, tmp_path / "sim", rounds=2)
    assert set(rows[1]["bytes_down_per_client"].values()) == {144}  # nothing to carry yet
    assert min(rows[2]["bytes_down_per_client"].values()) > 144  # round 1 from w0


def test_cli_options(tmp_path, capsys):
    from kseed import cli
    help_ = cli._parser().format_help()
    assert "ferret: first-order local steps" in help_ and "--server-lr" in help_
    for args, msg in ((["--method", "ferret", "--eps", "1e-3"], "--method ferret does not use --eps"),
                      (["--method", "ferret", "--sampling", "pro"], "does not use --sampling"),
                      (["--method", "ferret", "--clientwise-lr"], "does not use --clientwise-lr"),
                      (["--method", "fedkseed", "--server-lr", "2"],
                       "--method fedkseed does not use --server-lr"),
                      (["--method", "fedmezo", "--grad-checkpointing"], "does not use")):
        out = tmp_path / "x"
        assert cli.main([*args, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert msg in err[-1], err
        assert not out.exists()
    cfg = FedConfig(**methods.get("ferret").configure({}))
    assert (cfg.lr, cfg.local_steps) == (methods.get("ferret").defaults["lr"], 10)
    with pytest.raises(ValueError, match="--n-accum"):
        _cfg(n_accum=0)
    with pytest.raises(ValueError, match="--server-lr"):
        _cfg(server_lr=0.0)
