"""FedKSeedServer: the FedKSeed / FedKSeed-Pro server as a plain object over bytes (no engine inside).

Any engine drives it the same way, round r = 1, 2, ...::

    ids = server.sample_clients(r)
    downs = {c: server.make_down(r, c) for c in ids}          # bytes to send
    stats = server.aggregate(r, {c: upload_bytes, ...})       # bytes received
    server.state_dict() / load_state_dict(...)                # checkpoints

State: K distinct uint64 seeds drawn from the run seed, one float64 accumulator per seed with the
learning rate already multiplied in (the global model is w0 + sum_k A_k z_k), the FedKSeed-Pro running
sums, and the clients' last losses (client-wise lr).  Sampling and client RNG seeds are derived
statelessly from (run seed, round, client), so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Mapping, Optional

import numpy as np

from . import protocol as P
from .config import FedConfig

log = logging.getLogger("kseed.server")


class NotEnoughReplies(RuntimeError):
    """Fewer valid uploads than the minimum: the round was not applied (state unchanged)."""


class FedKSeedServer:
    def __init__(self, config: FedConfig, *, base_identity: Optional[dict] = None):
        self.config = config
        self.seeds = P.seed_pool(config.seed, config.num_seeds)
        self.fingerprint = P.fingerprint(self.seeds)
        k = config.num_seeds
        self.acc = np.zeros(k, dtype=np.float64)
        self.pro_sum = np.zeros(k, dtype=np.float64)  # sum of |clip(g)| per seed; history starts [0.0]
        self.pro_count = np.ones(k, dtype=np.int64)
        self.client_loss: Dict[int, float] = {}
        self.round = 0  # rounds completed
        self.base_identity = dict(base_identity or {})
        self._probs_cache = None  # (round, probs)

    # ----------------------------------------------------------------------------- sampling
    def sample_clients(self, rnd: int) -> List[int]:
        """The clients of round ``rnd`` (sorted ids in [0, num_clients)), a pure function of
        (run seed, round)."""
        c = self.config
        rng = np.random.Generator(np.random.PCG64(P.derive_seed(c.seed, 1, rnd)))
        pick = rng.choice(c.num_clients, size=c.clients_per_round, replace=False)
        return sorted(int(x) for x in pick)

    def client_seed(self, rnd: int, client_id: int) -> int:
        return P.derive_seed(self.config.seed, 2, rnd, client_id)

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

    def client_lr(self, client_id: int) -> float:
        """The lr a client gets: the base lr, or with client-wise lr (FedMeZO-style) the base lr times
        the client's last loss over the mean of the known clients' last losses, clipped to [0.5, 2]."""
        lr = self.config.lr
        if not self.config.clientwise_lr or client_id not in self.client_loss:
            return lr
        mean = float(np.mean(list(self.client_loss.values())))
        if not (mean > 0 and math.isfinite(mean)):
            return lr
        return lr * float(np.clip(self.client_loss[client_id] / mean, 0.5, 2.0))

    # ------------------------------------------------------------------------------ messages
    def _check_round(self, rnd: int) -> None:
        if rnd != self.round + 1:
            raise ValueError(f"round {rnd} is not the next round (completed: {self.round})")

    def global_coefs(self) -> np.ndarray:
        """float32 [K]: the coefficients of the global model, exactly what every client applies."""
        return self.acc.astype(np.float32)

    def make_down(self, rnd: int, client_id: int) -> bytes:
        self._check_round(rnd)
        c = self.config
        if not 0 <= client_id < c.num_clients:
            raise ValueError(f"client id {client_id} out of range [0, {c.num_clients})")
        msg = P.DownMessage(round=rnd, client_id=client_id, fingerprint=self.fingerprint,
                            coefs=self.global_coefs(), lr=self.client_lr(client_id), eps=c.eps,
                            local_steps=c.local_steps, batch_size=c.batch_size,
                            client_seed=self.client_seed(rnd, client_id),
                            probs=self._round_probs(rnd) if c.sampling == "pro" else None)
        return P.encode_down(msg)

    def aggregate(self, rnd: int, uploads: Mapping[int, bytes],
                  weights: Optional[Mapping[int, float]] = None) -> dict:
        """Validate and apply the round's uploads.  Malformed or unexpected uploads are rejected and
        logged; the round completes with the rest (at least ``min_replies``, else NotEnoughReplies and
        nothing changes).  Weights: ``weights`` if given, else equal (equal_weights) or by example
        count.  Returns the round's statistics."""
        self._check_round(rnd)
        c = self.config
        expected = set(self.sample_clients(rnd))
        accepted: List[P.UpMessage] = []
        rejected: Dict[int, str] = {}
        bytes_up = 0
        max_bytes = P.up_size(c.local_steps, c.num_seeds)
        for cid in sorted(uploads):
            data = uploads[cid]
            try:
                bytes_up += len(data)
            except TypeError:
                pass
            if cid not in expected:
                rejected[cid] = f"client {cid} was not sampled in round {rnd}"
            else:
                try:
                    accepted.append(P.decode_up(data, k=c.num_seeds, expected_round=rnd,
                                                expected_client=cid, max_steps=c.local_steps,
                                                max_bytes=max_bytes))
                    continue
                except P.ProtocolError as exc:
                    rejected[cid] = str(exc)
            log.warning("round %d: rejected upload of client %s: %s", rnd, cid, rejected[cid])
        if len(accepted) < max(1, c.min_replies):
            raise NotEnoughReplies(f"round {rnd}: {len(accepted)} valid uploads, need "
                                   f"{max(1, c.min_replies)}; rejected: {rejected}")
        if weights is not None:
            w = np.array([float(weights[m.client_id]) for m in accepted], dtype=np.float64)
        elif c.equal_weights:
            w = np.ones(len(accepted))
        else:
            w = np.array([m.num_examples for m in accepted], dtype=np.float64)
        if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
            raise ValueError("aggregation weights must be finite, >= 0 and not all 0")
        w = w / w.sum()
        for m, wc in zip(accepted, w):
            lr_c = self.client_lr(m.client_id)
            g = m.grads.astype(np.float64)
            idx = m.indices.astype(np.int64)
            np.add.at(self.acc, idx, -lr_c * wc * g)
            np.add.at(self.pro_sum, idx, np.minimum(np.abs(g), c.pro_clip))
            np.add.at(self.pro_count, idx, 1)
        for m in accepted:
            if math.isfinite(m.train_loss):
                self.client_loss[m.client_id] = float(m.train_loss)
        losses = [(m.train_loss, wc) for m, wc in zip(accepted, w) if math.isfinite(m.train_loss)]
        train_loss = (sum(l * wc for l, wc in losses) / sum(wc for _, wc in losses)
                      if losses else float("nan"))
        self.round = rnd
        self._probs_cache = None
        return {"round": rnd, "accepted": [m.client_id for m in accepted], "rejected": rejected,
                "train_loss": float(train_loss), "num_examples": int(sum(m.num_examples
                                                                         for m in accepted)),
                "steps": int(sum(m.tau for m in accepted)), "bytes_up": int(bytes_up)}

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
            "client_loss": {str(k): v for k, v in sorted(self.client_loss.items())},
            "rng": "stateless: derived from (seed, round, client) by SHA-256",
            "base_identity": self.base_identity,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from state_dict(); ValueError naming the mismatch if it is not this run's."""
        if not isinstance(state, dict) or state.get("format") != "kseed-server/1":
            raise ValueError("not a kseed server checkpoint (format field missing or unknown)")
        k = self.config.num_seeds
        try:
            fp = bytes.fromhex(state["fingerprint"])
            seeds = np.frombuffer(bytes.fromhex(state["seeds"]), dtype="<u8")
            acc = np.frombuffer(bytes.fromhex(state["acc"]), dtype="<f8")
            ps = np.frombuffer(bytes.fromhex(state["pro_sum"]), dtype="<f8")
            pc = np.frombuffer(bytes.fromhex(state["pro_count"]), dtype="<i8")
            rnd = int(state["round"])
            cl = {int(a): float(b) for a, b in state["client_loss"].items()}
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"corrupt server checkpoint: {exc}") from None
        if fp != self.fingerprint or seeds.shape != (k,) or not np.array_equal(seeds, self.seeds):
            raise ValueError("checkpoint seed pool differs from this run's (different --seed or "
                             "--num-seeds)")
        if acc.shape != (k,) or ps.shape != (k,) or pc.shape != (k,):
            raise ValueError("corrupt server checkpoint: array sizes differ from K")
        if not np.isfinite(acc).all() or rnd < 0:
            raise ValueError("corrupt server checkpoint: non-finite accumulators or bad round")
        ident = state.get("base_identity") or {}
        if self.base_identity and ident and ident.get("hash") != self.base_identity.get("hash"):
            raise ValueError(f"checkpoint was made with another base model (hash "
                             f"{str(ident.get('hash'))[:12]}..., this model "
                             f"{str(self.base_identity.get('hash'))[:12]}...)")
        self.acc = acc.astype(np.float64)
        self.pro_sum = ps.astype(np.float64)
        self.pro_count = pc.astype(np.int64)
        self.client_loss = cl
        self.round = rnd
        self._probs_cache = None
