"""FedKSeed and FedKSeed-Pro (Qin et al., ICML 2024): K candidate seeds, one accumulator each.

Server: K distinct uint64 seeds drawn from the run seed, one float64 accumulator per seed with the
learning rate already multiplied in (the global model is w0 + sum_k A_k z_k), the FedKSeed-Pro running
sums, and the clients' last losses (client-wise lr).  Sampling and client RNG seeds are derived
statelessly from (run seed, round, client), so a resumed run repeats an uninterrupted one exactly.

Client: ``fit(down_bytes) -> up_bytes``: decode and check the server's message (round, seed-pool
fingerprint, K), rebuild the global model w0 + sum_k A_k z_k from a pristine copy of w0 with ONE fused
pass, run tau zeroth-order steps (seed index uniform or by the FedKSeed-Pro probabilities; two passes
over the weights per step), and return the (index, g) list with the example count.
``evaluate(down_bytes)`` rebuilds and returns the response loss on the client's data.

The wire format is kseed.protocol's (KSD1 / KSU1).
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from .. import protocol as P
from ..config import FedConfig
from .base import Method, SeedClient, SeedServer, _typed, bound_uploads, check_local


class FedKSeedServer(SeedServer):
    method = "fedkseed"

    def __init__(self, config: FedConfig, *, base_identity: Optional[dict] = None,
                 workdir: Optional[str] = None, readonly: bool = False):
        super().__init__(config, base_identity=base_identity, workdir=workdir, readonly=readonly)
        self.seeds = P.seed_pool(config.seed, config.num_seeds)
        self.fingerprint = P.fingerprint(self.seeds)
        k = config.num_seeds
        self.acc = np.zeros(k, dtype=np.float64)
        self.pro_sum = np.zeros(k, dtype=np.float64)  # sum of |clip(g)| per seed; history starts [0.0]
        self.pro_count = np.ones(k, dtype=np.int64)
        self._probs_cache = None  # (round, probs)

    # ---------------------------------------------------------------------------------- Pro
    def probabilities(self) -> np.ndarray:
        """FedKSeed-Pro: psi_j = mean |clip(g, -C, C)| over seed j's history (starting [0.0]),
        min-max normalised, p = softmax(psi~) (float64)."""
        psi = self.pro_sum / self.pro_count
        lo, hi = psi.min(), psi.max()
        t = (psi - lo) / (hi - lo + 1e-10)
        e = np.exp(t - t.max())
        return e / e.sum()

    def _round_probs(self, rnd: int) -> np.ndarray:
        if self._probs_cache is None or self._probs_cache[0] != rnd:
            self._probs_cache = (rnd, self.probabilities().astype(np.float32))
        return self._probs_cache[1]

    # ------------------------------------------------------------------------------ messages
    def global_coefs(self) -> np.ndarray:
        """float32 [K]: the coefficients of the global model, exactly what every client applies."""
        return self.acc.astype(np.float32)

    def load_global(self, ws) -> None:
        ws.rebuild(self.seeds, self.global_coefs())

    def export_info(self) -> dict:
        return {"num_seeds": self.config.num_seeds,
                "nonzero_coefficients": int(np.count_nonzero(self.global_coefs()))}

    def make_down(self, rnd: int, client_id: int) -> bytes:
        self._check_round(rnd)
        c = self.config
        self._check_client(client_id)
        msg = P.DownMessage(round=rnd, client_id=client_id, fingerprint=self.fingerprint,
                            coefs=self.global_coefs(), lr=self.client_lr(client_id, rnd), eps=c.eps,
                            local_steps=c.local_steps, batch_size=c.batch_size,
                            client_seed=self.client_seed(rnd, client_id),
                            probs=self._round_probs(rnd) if c.sampling == "pro" else None,
                            noise=c.noise)
        return P.encode_down(msg)

    def aggregate(self, rnd: int, uploads: Mapping[int, bytes],
                  weights: Optional[Mapping[int, float]] = None) -> dict:
        """Validate and apply the round's uploads.  Malformed or unexpected uploads are rejected and
        logged; the round completes with the rest (at least ``min_replies``, else NotEnoughReplies and
        nothing changes).  Each accepted upload's influence is bounded (bound_uploads).  Weights:
        equal (equal_weights), else ``weights`` (the clients' true example counts, when the engine
        knows them), else the claimed example counts, capped.  Returns the round's statistics:
        ``rejected`` {client: why} and ``clipped`` {client: what was bounded} among them, and
        ``bounds`` (the round's limits)."""
        self._check_round(rnd)
        c = self.config
        max_bytes = P.up_size(c.local_steps, c.num_seeds)
        accepted, rejected, bytes_up = self.collect(
            rnd, uploads, lambda data, cid: P.decode_up(
                data, k=c.num_seeds, expected_round=rnd, expected_client=cid,
                max_steps=c.local_steps, max_bytes=max_bytes))
        b = bound_uploads(c, accepted, weights)
        w = b.weights / b.weights.sum()
        lrs = self.round_lrs(rnd)
        deltas = []
        for m, g, wc in zip(accepted, b.grads, w):
            lr_c = lrs.get(m.client_id, c.lr)
            idx = m.indices.astype(np.int64)
            np.add.at(self.acc, idx, -lr_c * wc * g)
            np.add.at(self.pro_sum, idx, np.minimum(np.abs(g), c.pro_clip))
            np.add.at(self.pro_count, idx, 1)
            deltas.append(-lr_c * np.bincount(idx, weights=g, minlength=c.num_seeds))
        self._probs_cache = None
        return self.record_clients(rnd, accepted, b, w, deltas, rejected, bytes_up)

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue: JSON-able, arrays as exact hex bytes."""
        return {
            "format": "kseed-server/1",
            "round": self.round,
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint.hex(),
            "seeds": self.seeds.astype("<u8").tobytes().hex(),
            "acc": self.acc.astype("<f8").tobytes().hex(),
            "pro_sum": self.pro_sum.astype("<f8").tobytes().hex(),
            "pro_count": self.pro_count.astype("<i8").tobytes().hex(),
            **self.client_state(),
            "rng": "stateless: derived from (seed, round, client) by SHA-256",
            "base_identity": self.base_identity,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from state_dict(); ValueError naming the mismatch if it is not this run's."""
        if not isinstance(state, dict) or state.get("format") != "kseed-server/1":
            raise ValueError("not a kseed server checkpoint (format field missing or unknown)")
        k = self.config.num_seeds
        try:
            fp = bytes.fromhex(_typed(state, "fingerprint", str))
            seeds = np.frombuffer(bytes.fromhex(_typed(state, "seeds", str)), dtype="<u8")
            acc = np.frombuffer(bytes.fromhex(_typed(state, "acc", str)), dtype="<f8")
            ps = np.frombuffer(bytes.fromhex(_typed(state, "pro_sum", str)), dtype="<f8")
            pc = np.frombuffer(bytes.fromhex(_typed(state, "pro_count", str)), dtype="<i8")
            rnd = _typed(state, "round", int)
            hist, diff = self.read_client_state(state)
        except KeyError as exc:
            raise ValueError(f"corrupt server checkpoint: field {exc} missing") from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"corrupt server checkpoint: {exc}") from None
        if fp != self.fingerprint or seeds.shape != (k,) or not np.array_equal(seeds, self.seeds):
            raise ValueError("checkpoint seed pool differs from this run's (different --seed or "
                             "--num-seeds)")
        if acc.shape != (k,) or ps.shape != (k,) or pc.shape != (k,):
            raise ValueError("corrupt server checkpoint: array sizes differ from K")
        if not np.isfinite(acc).all() or rnd < 0:
            raise ValueError("corrupt server checkpoint: non-finite accumulators or bad round")
        if not (np.isfinite(ps).all() and (ps >= 0).all() and (pc >= 1).all()):
            raise ValueError("corrupt server checkpoint: bad FedKSeed-Pro sums or counts")
        self.check_base_identity(state)
        self.acc = acc.astype(np.float64)
        self.pro_sum = ps.astype(np.float64)
        self.pro_count = pc.astype(np.int64)
        self.client_loss_hist = hist
        self.client_diff = diff
        self.round = rnd
        self._probs_cache = None
        self._lrs_cache = None


def check_down(cfg: FedConfig, m: P.DownMessage) -> None:
    """Refuse a down message whose local settings are not what this client's own config says
    (ProtocolError naming the field; base.check_local), nor another sampling than --sampling."""
    def sampling(bad):
        if (m.probs is not None) != (cfg.sampling == "pro"):
            bad("probs", "present" if m.probs is not None else "absent", f"--sampling {cfg.sampling}")

    check_local(cfg, noise=m.noise, local_steps=m.local_steps, batch_size=m.batch_size, eps=m.eps,
                lr=m.lr, rnd=m.round, client_id=m.client_id, client_seed=m.client_seed,
                also=sampling)


class FedKSeedClient(SeedClient):
    """A FedKSeed client; ``shared``, ``cache_dir`` and ``memory_budget_mib`` are accepted and not
    needed (the down message carries the whole global model as K coefficients)."""

    def __init__(self, config: FedConfig, model_loader, partition, *,
                 client_id: Optional[int] = None, shared=None, cache_dir: Optional[str] = None,
                 memory_budget_mib: Optional[float] = None):
        super().__init__(config, model_loader, partition, client_id=client_id,
                         memory_budget_mib=memory_budget_mib)
        self.seeds = P.seed_pool(config.seed, config.num_seeds)
        self.fingerprint = P.fingerprint(self.seeds)

    def _decode(self, down_bytes) -> P.DownMessage:
        m = P.decode_down(down_bytes, expected_k=self.config.num_seeds,
                          expected_fingerprint=self.fingerprint)
        self._check_for_me(m.client_id)
        check_down(self.config, m)
        return m

    def rebuild(self, coefs: np.ndarray) -> None:
        self.workspace.rebuild(self.seeds, coefs)

    def load(self, down_bytes) -> None:
        self.rebuild(self._decode(down_bytes).coefs)

    def fit(self, down_bytes: bytes) -> bytes:
        m = self._decode(down_bytes)
        ws = self.workspace
        if ws.ms.noise != m.noise:
            raise P.ProtocolError(f"down message noise {m.noise!r} does not match this client's "
                                  f"workspace (built with noise {ws.ms.noise!r})")
        ws.rebuild(self.seeds, m.coefs)
        k, tau = m.k, m.local_steps
        rng = np.random.Generator(np.random.PCG64(m.client_seed))
        if m.probs is not None:
            p = m.probs.astype(np.float64)
            idx = rng.choice(k, size=tau, p=p / p.sum())
        else:
            idx = rng.integers(0, k, size=tau)
        kept, kept_g, train_loss = self.local_steps(
            [int(self.seeds[i]) for i in idx], rng, eps=m.eps, lr=m.lr, batch_size=m.batch_size,
            rnd=m.round)
        up = P.UpMessage(round=m.round, client_id=m.client_id, num_examples=len(self.partition),
                         indices=np.array([int(idx[t]) for t in kept], dtype=np.uint32),
                         grads=np.array(kept_g, dtype=np.float32), train_loss=train_loss)
        return P.encode_up(up, k=k)


METHOD = Method(
    name="fedkseed",
    summary="FedKSeed (--sampling uniform) and FedKSeed-Pro (--sampling pro): K candidate seeds, "
            "the global model as K accumulators",
    server=FedKSeedServer, client=FedKSeedClient,
    options=frozenset({"local_steps", "lr", "eps", "batch_size", "noise", "clientwise_lr", "lr_rule",
                       "lr_signal", "lr_delta", "num_seeds", "sampling", "pro_clip"}))
