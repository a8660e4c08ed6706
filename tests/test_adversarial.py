"""One client cannot wreck the federation (issue #13 section 1): a federation on the embedded default
where 1 of the 4 clients sampled each round lies in its upload.  With the aggregation bounds the run ends
finite and within 5 % of the clean run's held-out loss; without them (the bounds off, the claimed example
counts trusted) the same lie wrecks it, so every case can fail.  An honest run is bitwise the same with
and without the bounds (none binds)."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from kseed import modeling as M
from kseed import protocol as P
from kseed.client import FedKSeedClient
from kseed.config import FedConfig
from kseed.server import FedKSeedServer
from kseed.simulation import build_data, load_workspace

# lr 2e-5 (the embedded default's 1e-4 with tau 10 is so noise-dominated that one extra upload of an
# honest client's size, random signs, already moves the held-out loss by 3-5 %: see README "Threat
# model"); the Alpaca prompt, which the embedded model learns much faster than the reference template
# (about 8 % lower held-out loss in 3 rounds), so that "within 5 % of the clean run" is a constraint.
CFG = FedConfig(rounds=3, num_clients=8, clients_per_round=4, num_seeds=64, local_steps=20,
                batch_size=4, lr=2e-5, eps=1e-3, embedded_examples=400, min_per_client=10,
                eval_size=24, seed=5, clientwise_lr=True, prompt="alpaca").validate()
OFF = dict(g_clip=0.0, norm_bound=0.0, weight_cap=0.0, loss_cap=0.0)
ATTACKS = ("huge-g", "flip-x100", "examples", "repeat-index", "one-pair", "loss")


class LyingClient:
    """A registered client that trains honestly, then rewrites its upload's bytes."""

    def __init__(self, inner: FedKSeedClient, attack: str):
        self.inner, self.attack = inner, attack

    def fit(self, down: bytes) -> bytes:
        k = self.inner.config.num_seeds
        up = P.decode_up(self.inner.fit(down), k=k)
        rng = np.random.default_rng(up.round)
        g, idx = up.grads.astype(np.float32), up.indices.copy()
        if self.attack == "huge-g":
            g = np.full_like(g, 3e38)
        elif self.attack == "flip-x100":
            g = -100 * g
        elif self.attack == "examples":  # all the weight, no pairs: cancels the honest updates
            up.num_examples, idx, g = 2 ** 32 - 1, idx[:0], g[:0]
        elif self.attack == "repeat-index":
            idx, g = np.full_like(idx, rng.integers(k)), np.full_like(g, 1e6)
        elif self.attack == "one-pair":
            g[0] = 1e4
        elif self.attack == "loss":
            up.train_loss = 1e30
        up.indices, up.grads = idx, g
        return P.encode_up(up, k=k)


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    parts, eval_ex, _ = build_data(CFG)
    ws = load_workspace(CFG)
    items = M.tokenize_examples(ws.tok, eval_ex, CFG.max_length, CFG.prompt)
    return parts, ws, items


def federate(world, cfg: FedConfig, attack=None, *, known_sizes=True, rounds=None):
    """(held-out loss, server, per-round stats) of a federation where the smallest sampled client
    lies (``attack``) every round."""
    parts, ws, items = world
    server = FedKSeedServer(cfg)
    clients = {c: FedKSeedClient(cfg, lambda: ws, parts[c], client_id=c)
               for c in range(cfg.num_clients)}
    stats = []
    for rnd in range(1, (rounds or cfg.rounds) + 1):
        ids = server.sample_clients(rnd)
        ups = {}
        for c in ids:
            cl = LyingClient(clients[c], attack) if attack and c == ids[0] else clients[c]
            ups[c] = cl.fit(server.make_down(rnd, c))
        sizes = {c: len(parts[c]) for c in ids} if known_sizes else None
        stats.append(server.aggregate(rnd, ups, weights=sizes))
    ws.rebuild(server.seeds, server.global_coefs())
    return M.eval_loss(ws.model, items, ws.pad_id, ws.device), server, stats


@pytest.fixture(scope="module")
def clean(world):
    return federate(world, CFG)


def test_bounds_change_an_honest_run_by_little(world, clean):
    """An honest run with and without the bounds: the norm bound scales at most a few honest updates
    by a little (the only bound that may bind on honest clients); the held-out loss moves < 1 %."""
    loss, server, stats = clean
    assert all(s["bounds"]["g"] is not None and s["bounds"]["norm"] is not None for s in stats)
    for s in stats:
        for why in s["clipped"].values():
            assert why.startswith("update norm"), why
            words = why.split()
            old, new = float(words[2]), float(words[5])
            assert new >= old / 1.5, why
    off_loss, off, off_stats = federate(world, dataclasses.replace(CFG, **OFF), known_sizes=False)
    assert all(not s["clipped"] for s in off_stats)
    assert abs(loss - off_loss) <= 0.01 * off_loss, (loss, off_loss)
    ws = world[1]
    base = FedKSeedServer(CFG)
    ws.rebuild(base.seeds, base.global_coefs())
    assert loss < 0.95 * M.eval_loss(ws.model, world[2], ws.pad_id, ws.device)  # it learns


@pytest.mark.parametrize("attack", [a if a == "huge-g" else
                                    pytest.param(a, marks=pytest.mark.slow) for a in ATTACKS])
def test_one_lying_client_of_four_cannot_wreck_the_run(world, clean, attack):
    clean_loss = clean[0]
    loss, server, stats = federate(world, CFG, attack)
    assert math.isfinite(loss) and np.isfinite(server.acc).all()
    assert abs(loss - clean_loss) <= 0.05 * clean_loss, (attack, loss, clean_loss)
    assert all(math.isfinite(s["train_loss"]) and s["train_loss"] < 10 for s in stats)
    for s in stats:  # the liar is bounded every round; an honest client at most by the norm bound
        liar = s["accepted"][0]
        assert liar in s["clipped"], s["clipped"]
        assert all(why.startswith("update norm") for c, why in s["clipped"].items() if c != liar)
    # client-wise lr stays in the rule's range: [lr (1 - delta), lr (1 + delta)]
    lrs = server.round_lrs(CFG.rounds + 1)
    assert all(CFG.lr * (1 - CFG.lr_delta) * (1 - 1e-12) <= v <= CFG.lr * (1 + CFG.lr_delta) * (1 + 1e-12)
               for v in lrs.values())
    # without the bounds (and trusting the claimed example counts) the same lie wrecks the run
    quick = attack in ("huge-g", "repeat-index", "one-pair", "loss")  # one round wrecks it
    bad_loss, bad, bad_stats = federate(world, dataclasses.replace(CFG, **OFF), attack,
                                        known_sizes=False, rounds=1 if quick else None)
    if attack == "loss":
        assert bad_stats[0]["train_loss"] > 1e28  # the forged loss poisons the metrics and the lr
    else:
        assert not math.isfinite(bad_loss) or bad_loss > 1.05 * clean_loss, (attack, bad_loss)


def test_bounds_are_deterministic_and_resumable(world):
    """A bounded (attacked) run resumed from its state after round 1 ends bitwise the same."""
    parts, ws, _ = world
    _, full, _ = federate(world, CFG, "repeat-index", rounds=2)
    cfg = CFG
    first = FedKSeedServer(cfg)
    clients = {c: FedKSeedClient(cfg, lambda: ws, parts[c], client_id=c) for c in range(8)}

    def play(server, rnd):
        ids = server.sample_clients(rnd)
        ups = {c: (LyingClient(clients[c], "repeat-index") if c == ids[0] else clients[c]).fit(
            server.make_down(rnd, c)) for c in ids}
        server.aggregate(rnd, ups, weights={c: len(parts[c]) for c in ids})

    play(first, 1)
    resumed = FedKSeedServer(cfg)
    resumed.load_state_dict(first.state_dict())
    play(resumed, 2)
    assert np.array_equal(resumed.acc, full.acc) and resumed.client_diff == full.client_diff
