"""Wire format round trips, every malformed-upload case, server aggregation and FedKSeed-Pro."""
import math
import struct

import numpy as np
import pytest

from kseed import protocol as P
from kseed.config import FedConfig
from kseed.server import FedKSeedServer, NotEnoughReplies


def _cfg(**kw):
    base = dict(num_clients=6, clients_per_round=3, num_seeds=32, local_steps=10, lr=0.01,
                eps=1e-3, seed=7)
    base.update(kw)
    return FedConfig(**base).validate()


def test_seed_pool_distinct_and_deterministic():
    a = P.seed_pool(3, 4096)
    assert a.dtype == np.uint64 and len(set(a.tolist())) == 4096
    assert np.array_equal(a, P.seed_pool(3, 4096))
    assert not np.array_equal(a[:16], P.seed_pool(4, 16))
    assert P.fingerprint(a) != P.fingerprint(P.seed_pool(4, 4096))
    with pytest.raises(ValueError):
        P.seed_pool(3, 0)


@pytest.mark.parametrize("with_probs", [False, True])
def test_down_round_trip(with_probs):
    rng = np.random.default_rng(0)
    k = 100
    coefs = rng.standard_normal(k).astype(np.float32)
    probs = rng.random(k).astype(np.float32) if with_probs else None
    m = P.DownMessage(round=5, client_id=3, fingerprint=b"abcdefgh", coefs=coefs, lr=1e-4, eps=1e-3,
                      local_steps=200, batch_size=4, client_seed=2 ** 64 - 1, probs=probs)
    b = P.encode_down(m)
    assert len(b) == P.DOWN_HEADER_SIZE + 4 * k * (2 if with_probs else 1)
    d = P.decode_down(b, expected_round=5, expected_k=k, expected_fingerprint=b"abcdefgh")
    assert np.array_equal(d.coefs.view(np.uint32), coefs.view(np.uint32))
    assert (d.lr, d.eps, d.local_steps, d.batch_size, d.client_seed, d.client_id) == \
        (1e-4, 1e-3, 200, 4, 2 ** 64 - 1, 3)
    if with_probs:
        assert np.array_equal(d.probs, probs)
    else:
        assert d.probs is None
    with pytest.raises(P.ProtocolError, match="round"):
        P.decode_down(b, expected_round=6)
    with pytest.raises(P.ProtocolError, match="fingerprint"):
        P.decode_down(b, expected_fingerprint=b"zzzzzzzz")
    with pytest.raises(P.ProtocolError, match="K ="):
        P.decode_down(b, expected_k=99)
    with pytest.raises(P.ProtocolError, match="expected"):
        P.decode_down(b[:-1])
    with pytest.raises(P.ProtocolError, match="truncated"):
        P.decode_down(b[:10])
    with pytest.raises(P.ProtocolError, match="magic"):
        P.decode_down(b"XXXX" + b[4:])
    with pytest.raises(P.ProtocolError, match="version"):
        P.decode_down(b[:4] + struct.pack("<H", 9) + b[6:])
    bad = bytearray(b)
    bad[P.DOWN_HEADER_SIZE:P.DOWN_HEADER_SIZE + 4] = struct.pack("<f", float("nan"))
    with pytest.raises(P.ProtocolError, match="NaN"):
        P.decode_down(bytes(bad))


@pytest.mark.parametrize("k", [4096, 70000])
def test_up_round_trip_and_sizes(k):
    rng = np.random.default_rng(1)
    tau = 200
    idx = rng.integers(0, k, tau).astype(np.uint32)
    g = rng.standard_normal(tau).astype(np.float32)
    b = P.encode_up(P.UpMessage(round=2, client_id=9, num_examples=17, indices=idx, grads=g,
                                train_loss=1.5), k=k)
    assert len(b) == P.up_size(tau, k) == 32 + tau * (6 if k <= 65536 else 8)
    u = P.decode_up(b, k=k, expected_round=2, expected_client=9, max_steps=tau)
    assert np.array_equal(u.indices, idx) and np.array_equal(u.grads, g)
    assert (u.num_examples, u.train_loss) == (17, 1.5)


def test_paper_budget_k4096_tau200():
    """FedKSeed's headline: under 18 KB per client per round for K = 4096, tau = 200."""
    k, tau = 4096, 200
    down = P.encode_down(P.DownMessage(1, 0, b"\0" * 8, np.zeros(k, np.float32), 1e-7, 5e-4, tau,
                                       1, 0))
    up = P.up_size(tau, k)
    assert len(down) == 16448 and up == 1232
    assert len(down) + up == 17680 < 18 * 1000


def _valid_up(rnd, cid, k=32, tau=10, seed=0):
    rng = np.random.default_rng(seed + cid)
    return P.encode_up(P.UpMessage(rnd, cid, 10 + cid, rng.integers(0, k, tau).astype(np.uint32),
                                   rng.standard_normal(tau).astype(np.float32), 2.0), k=k)


def _malformed(rnd, cid, case, k=32, tau=10):
    b = bytearray(_valid_up(rnd, cid, k, tau))
    hs = P.UP_HEADER_SIZE
    if case == "wrong length":
        return bytes(b[:-3])
    if case == "index out of range":
        b[hs:hs + 2] = struct.pack("<H", k)
        return bytes(b)
    if case == "nan":
        b[hs + 2 * tau:hs + 2 * tau + 4] = struct.pack("<f", float("nan"))
        return bytes(b)
    if case == "inf":
        b[hs + 2 * tau + 4:hs + 2 * tau + 8] = struct.pack("<f", float("-inf"))
        return bytes(b)
    if case == "wrong round":
        return _valid_up(rnd + 1, cid, k, tau)
    if case == "oversized":
        return _valid_up(rnd, cid, k, tau + 5)
    if case == "garbage":
        return b"\x00" * 7
    raise AssertionError(case)


CASES = ["wrong length", "index out of range", "nan", "inf", "wrong round", "oversized", "garbage"]
MATCH = {"wrong length": "wrong length", "index out of range": "out of range", "nan": "NaN/inf",
         "inf": "NaN/inf", "wrong round": "wrong round", "oversized": "oversized",
         "garbage": "truncated"}


@pytest.mark.parametrize("case", CASES)
def test_malformed_upload_rejected_round_completes(case, caplog):
    cfg = _cfg()
    s = FedKSeedServer(cfg)
    ids = s.sample_clients(1)
    assert len(ids) == 3 and ids == sorted(ids) and ids == s.sample_clients(1)
    bad_id = ids[1]
    with pytest.raises(P.ProtocolError, match=MATCH[case]):
        P.decode_up(_malformed(1, bad_id, case), k=32, expected_round=1, max_steps=10,
                    max_bytes=P.up_size(10, 32))
    ups = {c: _valid_up(1, c) for c in ids}
    ups[bad_id] = _malformed(1, bad_id, case)
    with caplog.at_level("WARNING", logger="kseed.server"):
        st = s.aggregate(1, ups)
    assert st["accepted"] == [c for c in ids if c != bad_id]
    assert list(st["rejected"]) == [bad_id]
    assert str(bad_id) in caplog.text and "rejected" in caplog.text
    # the same result as aggregating only the good clients
    ref = FedKSeedServer(cfg)
    ref.aggregate(1, {c: ups[c] for c in ids if c != bad_id})
    assert np.array_equal(s.acc, ref.acc) and s.round == 1


def test_aggregate_weights_min_replies_and_unsampled():
    cfg = _cfg(min_replies=2)
    s = FedKSeedServer(cfg)
    ids = s.sample_clients(1)
    other = next(c for c in range(cfg.num_clients) if c not in ids)
    with pytest.raises(NotEnoughReplies):
        s.aggregate(1, {ids[0]: _valid_up(1, ids[0]), ids[1]: b"junk", other: _valid_up(1, other)})
    assert s.round == 0 and not s.acc.any()  # nothing applied
    ups = {c: _valid_up(1, c) for c in ids}
    st = s.aggregate(1, {**ups, other: _valid_up(1, other)})
    assert other in st["rejected"] and "not sampled" in st["rejected"][other]
    # direct computation: A[idx] -= lr * n_c / sum n * g
    want = np.zeros(32)
    n = {c: 10 + c for c in ids}
    for c in ids:
        u = P.decode_up(ups[c], k=32)
        for i, g in zip(u.indices, u.grads):
            want[i] -= cfg.lr * n[c] / sum(n.values()) * float(g)
    assert np.allclose(s.acc, want, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="next round"):
        s.make_down(1, ids[0])
    d = P.decode_down(s.make_down(2, ids[0]), expected_k=32, expected_fingerprint=s.fingerprint)
    assert np.array_equal(d.coefs, s.acc.astype(np.float32))
    # equal weights
    s2 = FedKSeedServer(_cfg(equal_weights=True))
    s2.aggregate(1, ups)
    want2 = np.zeros(32)
    for c in ids:
        u = P.decode_up(ups[c], k=32)
        np.add.at(want2, u.indices.astype(int), -cfg.lr / 3 * u.grads.astype(np.float64))
    assert np.allclose(s2.acc, want2, rtol=1e-12, atol=1e-15)


def test_pro_probabilities_match_direct_computation():
    cfg = _cfg(sampling="pro", pro_clip=1.5)
    s = FedKSeedServer(cfg)
    hist = {j: [0.0] for j in range(32)}
    for rnd in range(1, 4):
        ids = s.sample_clients(rnd)
        down = P.decode_down(s.make_down(rnd, ids[0]))
        psi = np.array([np.mean(hist[j]) for j in range(32)])
        t = (psi - psi.min()) / (psi.max() - psi.min() + 1e-10)
        p = np.exp(t) / np.exp(t).sum()
        assert np.allclose(down.probs, p, rtol=1e-6)
        assert down.probs.max() / down.probs.min() <= math.e * (1 + 1e-5)
        ups = {c: _valid_up(rnd, c, seed=rnd * 100) for c in ids}
        for c in ids:
            u = P.decode_up(ups[c], k=32)
            for i, g in zip(u.indices, u.grads):
                hist[int(i)].append(min(abs(float(g)), 1.5))
        s.aggregate(rnd, ups)


def test_state_dict_round_trip_and_mismatch():
    cfg = _cfg(clientwise_lr=True)
    s = FedKSeedServer(cfg, base_identity={"hash": "aa"})
    for rnd in (1, 2):
        s.aggregate(rnd, {c: _valid_up(rnd, c, seed=rnd) for c in s.sample_clients(rnd)})
    st = s.state_dict()
    t = FedKSeedServer(cfg, base_identity={"hash": "aa"})
    t.load_state_dict(st)
    assert np.array_equal(t.acc, s.acc) and t.round == 2 and t.client_loss == s.client_loss
    assert t.make_down(3, 0) == s.make_down(3, 0)
    with pytest.raises(ValueError, match="another base model"):
        FedKSeedServer(cfg, base_identity={"hash": "bb"}).load_state_dict(st)
    with pytest.raises(ValueError, match="seed pool"):
        FedKSeedServer(_cfg(seed=8)).load_state_dict(st)
    with pytest.raises(ValueError, match="corrupt"):
        FedKSeedServer(cfg).load_state_dict(dict(st, acc="zz"))


# ------------------------------------------------------------------ bounds (issue #13 section 1)
def _up(rnd, cid, idx, g, n=10, loss=1.0):
    return P.encode_up(P.UpMessage(round=rnd, client_id=cid, num_examples=n,
                                   indices=np.asarray(idx, dtype=np.uint32),
                                   grads=np.asarray(g, dtype=np.float32), train_loss=loss), k=32)


def test_lower_median():
    from kseed.server import lower_median
    assert lower_median([3.0]) == 3.0 and lower_median([1.0, 9.0]) == 1.0
    assert lower_median([5.0, 1.0, 1e30, 2.0]) == 2.0 and lower_median([4, 1, 3]) == 3.0


def test_bounds_one_pair_repeated_index_claims_and_loss():
    """Each bound against a direct computation; the honest clients' pairs are untouched."""
    cfg = _cfg(num_clients=4, clients_per_round=4, g_clip=10.0, norm_bound=1.5, weight_cap=2.0,
               loss_cap=3.0)
    s = FedKSeedServer(cfg)
    rng = np.random.default_rng(3)
    honest = {c: (rng.integers(0, 32, 10), rng.standard_normal(10)) for c in (0, 1, 2)}
    ups = {c: _up(1, c, i, g, n=20 + c, loss=2.0 + 0.1 * c) for c, (i, g) in honest.items()}
    ups[3] = _up(1, 3, [7] * 10, [1e6] * 10, n=2 ** 32 - 1, loss=1e30)  # repeated index, lies
    st = s.aggregate(1, ups)
    assert set(st["clipped"]) == {3}
    why = st["clipped"][3]
    assert "10 of 10 |g| clipped" in why and "seed indices" in why
    assert "examples, capped" in why and "loss 1e+30 clipped" in why
    med = sorted(np.median(np.abs(np.float32(g).astype(np.float64))) for _, g in honest.values())[1]
    lim = 10 * med
    assert st["bounds"]["g"] == pytest.approx(lim, rel=1e-12)
    norms = sorted(np.linalg.norm(np.bincount(i, np.float32(g).astype(np.float64), minlength=32))
                   for i, g in honest.values())
    bound = 1.5 * norms[1]  # the liar's norm (lim on one index) is the largest
    assert st["bounds"]["norm"] == pytest.approx(bound, rel=1e-9)
    assert st["bounds"]["examples"] == 2 * 21 and st["bounds"]["loss"] == pytest.approx(3 * 2.1)
    # direct computation: the liar is one pair's worth on index 7, scaled to the norm bound
    w = np.array([20, 21, 22, 42], dtype=np.float64)
    w /= w.sum()
    want = np.zeros(32)
    for c, (i, g) in honest.items():
        np.add.at(want, i, -cfg.lr * w[c] * np.float32(g).astype(np.float64))
    want[7] -= cfg.lr * w[3] * min(lim, bound)
    assert np.allclose(s.acc, want, rtol=1e-9, atol=0)
    assert s.client_loss[3] == pytest.approx(3 * 2.1)
    # the true sizes, when the engine knows them, replace the claims
    t = FedKSeedServer(cfg)
    st = t.aggregate(1, ups, weights={0: 20, 1: 21, 2: 22, 3: 5})
    assert "weighted by the known 5" in st["clipped"][3]


def test_bounds_off_is_the_plain_aggregate():
    off = dict(g_clip=0.0, norm_bound=0.0, weight_cap=0.0, loss_cap=0.0)
    cfg = _cfg(num_clients=2, clients_per_round=2, **off)
    s = FedKSeedServer(cfg)
    st = s.aggregate(1, {0: _up(1, 0, [1, 2], [1.0, 2.0], n=1), 1: _up(1, 1, [3], [1e30], n=3)})
    assert st["clipped"] == {} and st["bounds"] == {"g": None, "norm": None, "examples": None,
                                                    "loss": None}
    assert s.acc[3] == pytest.approx(-cfg.lr * 0.75 * 1e30)


def test_client_refuses_down_messages_its_config_does_not_allow():
    from kseed.client import FedKSeedClient
    cfg = _cfg(clientwise_lr=True)
    s = FedKSeedServer(cfg)
    cl = FedKSeedClient(cfg, lambda: None, [{"instruction": "a", "input": "", "output": "b"}],
                        client_id=0)
    good = P.decode_down(s.make_down(1, 0))
    cl._decode(P.encode_down(good))  # accepted
    lo, hi = cfg.lr * (1 - cfg.lr_delta), cfg.lr * (1 + cfg.lr_delta)
    import dataclasses
    for field, value in (("local_steps", 2 ** 32 - 1), ("batch_size", 2 ** 32 - 1), ("lr", 1e300),
                         ("lr", hi * 1.01), ("lr", lo * 0.99), ("eps", 0.5),
                         ("client_seed", 12345), ("round", 0),
                         ("probs", np.full(32, 1 / 32, dtype=np.float32))):
        bad = dataclasses.replace(good, **{field: value})
        with pytest.raises(P.ProtocolError, match=f"field {field} "):
            cl.fit(P.encode_down(bad))
    with pytest.raises(P.ProtocolError, match="lr must be > 0"):  # the wire format refuses it
        P.encode_down(dataclasses.replace(good, lr=-1.0))
    raw = bytearray(P.encode_down(good))
    raw[40:48] = np.float64(-1.0).tobytes()
    with pytest.raises(P.ProtocolError, match="lr -1.0"):
        cl.fit(bytes(raw))
    pro = FedKSeedClient(_cfg(sampling="pro"), lambda: None, cl.partition, client_id=0)
    with pytest.raises(P.ProtocolError, match="field probs"):
        pro._decode(s.make_down(1, 0))


def test_fedmezo_clientwise_lr_against_the_formula():
    """lr_i = lr0 + delta (s_i - mean s) / max_j |s_j - mean s| over the round's clients with a
    signal; each signal kind; kseed's ratio rule as an option; the state survives a checkpoint."""
    rng = np.random.default_rng(11)
    for signal in ("round-wise", "five-round", "model-diff"):
        cfg = _cfg(num_clients=5, clients_per_round=4, clientwise_lr=True, lr_signal=signal,
                   lr_delta=0.5, g_clip=0.0, norm_bound=0.0, loss_cap=0.0)
        s = FedKSeedServer(cfg)
        hist, diffs = {}, {}
        for rnd in range(1, 8):
            ids = s.sample_clients(rnd)
            sig = {}
            for c in ids:
                if signal == "model-diff" and c in diffs:
                    sig[c] = diffs[c]
                elif signal != "model-diff" and c in hist:
                    sig[c] = hist[c][-1] if signal == "round-wise" else np.mean(hist[c][-5:])
            lrs = {c: P.decode_down(s.make_down(rnd, c)).lr for c in ids}
            if sig:
                v = np.array([sig[c] for c in sorted(sig)])
                dev = v - v.mean()
                for c, d in zip(sorted(sig), dev):
                    assert lrs[c] == pytest.approx(cfg.lr + 0.5 * cfg.lr * d / np.abs(dev).max(),
                                                   rel=1e-12)
            assert all(cfg.lr * 0.5 <= x <= cfg.lr * 1.5 * (1 + 1e-12) for x in lrs.values())
            assert sum(1 for c in ids if c not in sig and lrs[c] == cfg.lr) == len(ids) - len(sig)
            ups = {c: _up(rnd, c, rng.integers(0, 32, 10), rng.standard_normal(10),
                          loss=float(rng.uniform(1, 3))) for c in ids}
            deltas = {}
            for c in ids:
                u = P.decode_up(ups[c], k=32)
                hist.setdefault(c, []).append(u.train_loss)
                deltas[c] = -lrs[c] * np.bincount(u.indices, u.grads.astype(np.float64),
                                                  minlength=32)
            w = np.array([10.0] * len(ids)) / (10.0 * len(ids))
            mean = sum(wc * deltas[c] for wc, c in zip(w, ids))
            for c in ids:
                diffs[c] = np.linalg.norm(deltas[c] - mean)
            s.aggregate(rnd, ups)
            if rnd == 4:  # a checkpoint in the middle changes nothing
                t = FedKSeedServer(cfg)
                t.load_state_dict(s.state_dict())
                assert t.make_down(5, s.sample_clients(5)[0]) == s.make_down(5, s.sample_clients(5)[0])
                s = t
        # per client: pytest.approx does not take a dict of lists (pytest >= 9 raises TypeError)
        assert sorted(s.client_loss_hist) == sorted(hist)
        for c, h in hist.items():
            assert s.client_loss_hist[c] == pytest.approx(h[-5:])
    # kseed's ratio rule: lr x loss / mean loss, clipped to [0.5, 2]
    cfg = _cfg(num_clients=3, clients_per_round=3, clientwise_lr=True, lr_rule="ratio")
    s = FedKSeedServer(cfg)
    s.aggregate(1, {c: _up(1, c, [c], [1.0], loss=l) for c, l in zip(range(3), (1.0, 2.0, 9.0))})
    mean = np.mean([1.0, 2.0, min(9.0, 4 * 2.0)])
    assert [P.decode_down(s.make_down(2, c)).lr for c in range(3)] == pytest.approx(
        [cfg.lr * max(0.5, 1 / mean), cfg.lr * 2 / mean, cfg.lr * 2.0])


def test_older_checkpoint_config_and_state_load():
    """A checkpoint written before the bounds / the FedMeZO rule / the reference prompt: its config
    keeps what that run did, and its server state (client_loss only) loads."""
    from kseed.config import LEGACY
    old = {k: v for k, v in _cfg(clientwise_lr=True).to_dict().items() if k not in LEGACY
           and k not in ("lr_signal", "lr_delta")}
    cfg = FedConfig.from_dict(old).validate()
    assert cfg.lr_rule == "ratio" and cfg.prompt == "alpaca" and cfg.norm_bound == 0.0
    s = FedKSeedServer(cfg)
    s.aggregate(1, {c: _valid_up(1, c) for c in s.sample_clients(1)})
    st = s.state_dict()
    del st["client_loss_hist"], st["client_diff"]
    t = FedKSeedServer(cfg)
    t.load_state_dict(st)
    assert t.client_loss == s.client_loss and t.make_down(2, 0) == s.make_down(2, 0)
    with pytest.raises(ValueError, match="client_loss"):
        t.load_state_dict(dict(st, client_loss=[1.0]))
    with pytest.raises(ValueError, match="client_loss"):
        t.load_state_dict(dict(st, client_loss={"0": float("nan")}))
