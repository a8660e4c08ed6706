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
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from . import protocol as P
from .config import RATIO_CLIP, FedConfig

log = logging.getLogger("kseed.server")


FIVE = 5  # losses kept per client: the 'five-round' signal of the client-wise lr


class NotEnoughReplies(RuntimeError):
    """Fewer valid uploads than the minimum: the round was not applied (state unchanged)."""


def lower_median(values) -> float:
    """The ((n-1)//2)-th smallest value: the median for odd n, the smaller middle value for even n.

    The round's bounds scale with it, so with at most (n-1)//2 outliers among n values (one of 2, one
    of 3 or 4, two of 5 or 6) it lies between two honest values: an outlier can lower it but not
    raise it above every honest value."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    return float(v[(len(v) - 1) // 2])


@dataclass
class Bounded:
    """What bound_uploads made of a round's accepted uploads (in their order)."""
    grads: List[np.ndarray]  # float64 g per client, after the |g| clip and the norm bound
    weights: np.ndarray  # aggregation weights (unnormalised)
    losses: List[float]  # reported training losses after the loss bound (NaN: none)
    clipped: Dict[int, str] = field(default_factory=dict)  # client -> what was bounded and how
    limits: Dict[str, Optional[float]] = field(default_factory=dict)  # the round's limits


def bound_uploads(c: FedConfig, ups: Sequence[P.UpMessage],
                  known_examples: Optional[Mapping[int, float]] = None) -> Bounded:
    """Bound each client's influence on the round (a pure function of the config and the uploads, so
    deterministic and resumable).  Limits are multiples of the round's lower median (lower_median), so
    a minority of clients cannot raise them; 0 in the config turns a bound off.

    1. |g| <= g_clip x (lower median over the clients of each one's median nonzero |g|), and
       <= g_clip_abs when set: caps single absurd values (one pair with g = 1e4); the same limit
       holds for the sum of a client's g on one seed index (one index repeated tau times with
       g = 1e6 counts as one clipped pair, not tau of them: repeated on every round, one direction
       would otherwise grow linearly while honest noise grows as a square root).
    2. The client's update in coefficient space, u_c = sum of its g per seed index (so a seed index
       repeated tau times counts tau times), has ||u_c|| <= norm_bound x (lower median of the
       nonzero norms): norm bounding (Sun et al., 2019); a longer u_c is scaled down.
    3. Weights: ``known_examples`` (the true sizes, when the engine knows them; a claim that differs is
       reported) or the claimed example counts capped at weight_cap x their lower median; ones with
       equal_weights.
    4. Reported losses (they drive the client-wise lr and the train_loss metric) clipped to
       [0, loss_cap x their lower median].
    A bound that does not bind leaves the values untouched (bitwise), so an honest round is unchanged.
    """
    notes: Dict[int, List[str]] = {m.client_id: [] for m in ups}
    grads = [m.grads.astype(np.float64) for m in ups]
    limits: Dict[str, Optional[float]] = {"g": None, "norm": None, "examples": None, "loss": None}
    # 1. per-pair |g|
    lim = c.g_clip_abs if c.g_clip_abs > 0 else math.inf
    if c.g_clip > 0:
        scales = [float(np.median(np.abs(g[g != 0]))) for g in grads if np.any(g != 0)]
        if scales:
            lim = min(lim, c.g_clip * lower_median(scales))
    if math.isfinite(lim):
        limits["g"] = lim
        for i, m in enumerate(ups):
            n = int(np.count_nonzero(np.abs(grads[i]) > lim))
            if n:
                grads[i] = np.clip(grads[i], -lim, lim)
                notes[m.client_id].append(f"{n} of {m.tau} |g| clipped to {lim:.4g}")
            # the same bound on the sum of g per seed index: a seed index repeated tau times counts
            # as one pair (scaled pairs of that index; an honest client rarely repeats an index)
            idx = m.indices.astype(np.int64)
            u = np.bincount(idx, weights=grads[i], minlength=c.num_seeds)
            over = np.abs(u) > lim
            if over.any():
                f = np.ones_like(u)
                f[over] = lim / np.abs(u[over])
                grads[i] = grads[i] * f[idx]
                notes[m.client_id].append(f"the sum of g on {int(over.sum())} seed indices "
                                          f"clipped to {lim:.4g}")
    # 2. update norm
    if c.norm_bound > 0:
        norms = [float(np.linalg.norm(np.bincount(m.indices.astype(np.int64), weights=g,
                                                  minlength=c.num_seeds)))
                 for m, g in zip(ups, grads)]
        pos = [n for n in norms if n > 0]
        if pos:
            bound = c.norm_bound * lower_median(pos)
            limits["norm"] = bound
            for i, m in enumerate(ups):
                if norms[i] > bound:
                    grads[i] = grads[i] * (bound / norms[i])
                    notes[m.client_id].append(f"update norm {norms[i]:.4g} scaled to {bound:.4g}")
    # 3. weights
    claims = np.array([float(m.num_examples) for m in ups], dtype=np.float64)
    if c.equal_weights:
        w = np.ones(len(ups))
    elif known_examples is not None:
        w = np.array([float(known_examples[m.client_id]) for m in ups], dtype=np.float64)
        if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
            raise ValueError("aggregation weights must be finite, >= 0 and not all 0")
        for m, wc in zip(ups, w):
            if m.num_examples != wc:
                notes[m.client_id].append(f"claimed {m.num_examples} examples, weighted by the "
                                          f"known {wc:g}")
    else:
        w = claims
        if c.weight_cap > 0:
            cap = c.weight_cap * lower_median(claims)
            limits["examples"] = cap
            if (claims > cap).any():
                w = np.minimum(claims, cap)
                for m in ups:
                    if m.num_examples > cap:
                        notes[m.client_id].append(f"claimed {m.num_examples} examples, capped to "
                                                  f"{cap:g}")
    # 4. reported losses
    losses = [float(m.train_loss) for m in ups]
    if c.loss_cap > 0:
        ok = [l for l in losses if math.isfinite(l)]
        if ok:
            top = c.loss_cap * max(0.0, lower_median(ok))
            limits["loss"] = top
            for i, m in enumerate(ups):
                l = losses[i]
                if math.isfinite(l) and not 0 <= l <= top:
                    losses[i] = min(max(l, 0.0), top)
                    notes[m.client_id].append(f"loss {l:.4g} clipped to {losses[i]:.4g}")
    return Bounded(grads=grads, weights=w, losses=losses,
                   clipped={cid: "; ".join(v) for cid, v in notes.items() if v}, limits=limits)


def _typed(state: dict, key: str, kind: type):
    v = state[key]
    if isinstance(v, bool) or not isinstance(v, kind):
        raise TypeError(f"field {key!r} must be {kind.__name__}, got {type(v).__name__}")
    return v


def _number(key: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"field {key!r} holds {v!r}, not a finite number")
    return float(v)


def _losses(v) -> List[float]:
    if not isinstance(v, list) or not 1 <= len(v) <= FIVE:
        raise TypeError(f"field 'client_loss_hist' holds {v!r}, not a list of 1 to {FIVE} losses")
    return [_number("client_loss_hist", x) for x in v]


def _client_map(state: dict, key: str, conv, optional: bool = False) -> dict:
    """{client id: conv(value)} from a checkpoint's {"id": value} object, in client order."""
    if optional and key not in state:
        return {}
    d = _typed(state, key, dict)
    out = {}
    for a in sorted(d, key=lambda x: int(x) if str(x).isdigit() else -1):
        if not isinstance(a, str) or not a.isdigit():
            raise TypeError(f"field {key!r} has the key {a!r}, not a client id")
        out[int(a)] = conv(d[a])
    return out


class FedKSeedServer:
    def __init__(self, config: FedConfig, *, base_identity: Optional[dict] = None):
        self.config = config
        self.seeds = P.seed_pool(config.seed, config.num_seeds)
        self.fingerprint = P.fingerprint(self.seeds)
        k = config.num_seeds
        self.acc = np.zeros(k, dtype=np.float64)
        self.pro_sum = np.zeros(k, dtype=np.float64)  # sum of |clip(g)| per seed; history starts [0.0]
        self.pro_count = np.ones(k, dtype=np.int64)
        self.client_loss_hist: Dict[int, List[float]] = {}  # last FIVE reported (bounded) losses
        self.client_diff: Dict[int, float] = {}  # |last update - the round's mean update|
        self.round = 0  # rounds completed
        self.base_identity = dict(base_identity or {})
        self._probs_cache = None  # (round, probs)
        self._lrs_cache = None  # (round, {client: lr})

    @property
    def client_loss(self) -> Dict[int, float]:
        """Each known client's last reported training loss (after the loss bound)."""
        return {c: h[-1] for c, h in self.client_loss_hist.items()}

    # ----------------------------------------------------------------------------- sampling
    def sample_clients(self, rnd: int) -> List[int]:
        """The clients of round ``rnd`` (sorted ids in [0, num_clients)), a pure function of
        (run seed, round)."""
        c = self.config
        rng = np.random.Generator(np.random.PCG64(P.derive_seed(c.seed, 1, rnd)))
        pick = rng.choice(c.num_clients, size=c.clients_per_round, replace=False)
        return sorted(int(x) for x in pick)

    def client_seed(self, rnd: int, client_id: int) -> int:
        return P.client_rng_seed(self.config.seed, rnd, client_id)

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

    def _signal(self, client_id: int) -> Optional[float]:
        """s_i of the FedMeZO rule for a client, None when the client has none yet."""
        kind = self.config.lr_signal
        if kind == "model-diff":
            return self.client_diff.get(client_id)
        hist = self.client_loss_hist.get(client_id)
        if not hist:
            return None
        return float(hist[-1]) if kind == "round-wise" else float(np.mean(hist[-FIVE:]))

    def round_lrs(self, rnd: int) -> Dict[int, float]:
        """{client: lr} for the clients of round ``rnd``: the base lr, or with --clientwise-lr

        - ``fedmezo`` (FedMeZO's set_dynamic_lr): lr_i = lr0 + delta (s_i - mean s) / max_j |s_j -
          mean s| over the round's clients that have a signal s (delta = lr_delta x lr0; a client
          without a signal, or a round where all s are equal, gets lr0), so lr_i lies in
          [lr0 - delta, lr0 + delta] whatever the clients report;
        - ``ratio`` (kseed's earlier rule): lr0 times the client's last loss over the mean of the known
          clients' last losses, clipped to [0.5, 2].
        """
        if self._lrs_cache is not None and self._lrs_cache[0] == rnd:
            return self._lrs_cache[1]
        c = self.config
        ids = self.sample_clients(rnd)
        out = {cid: c.lr for cid in ids}
        if c.clientwise_lr and c.lr_rule == "ratio":
            known = self.client_loss
            mean = float(np.mean([known[k] for k in sorted(known)])) if known else 0.0
            if mean > 0 and math.isfinite(mean):
                for cid in ids:
                    if cid in known:
                        out[cid] = c.lr * float(np.clip(known[cid] / mean, *RATIO_CLIP))
        elif c.clientwise_lr:
            sig = {cid: self._signal(cid) for cid in ids}
            sig = {cid: v for cid, v in sig.items() if v is not None and math.isfinite(v)}
            if sig:
                vals = np.array([sig[cid] for cid in sorted(sig)], dtype=np.float64)
                dev = vals - vals.mean()
                top = float(np.abs(dev).max())
                if top > 0 and math.isfinite(top):
                    delta = c.lr_delta * c.lr
                    for cid, d in zip(sorted(sig), dev):
                        out[cid] = c.lr + delta * float(d) / top
        self._lrs_cache = (rnd, out)
        return out

    def client_lr(self, client_id: int, rnd: Optional[int] = None) -> float:
        """The lr client ``client_id`` gets in round ``rnd`` (default: the next round)."""
        rnd = self.round + 1 if rnd is None else rnd
        return self.round_lrs(rnd).get(client_id, self.config.lr)

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
        mean_delta = np.sum([wc * d for wc, d in zip(w, deltas)], axis=0)
        for m, d, loss in zip(accepted, deltas, b.losses):
            self.client_diff[m.client_id] = float(np.linalg.norm(d - mean_delta))
            if math.isfinite(loss):
                hist = self.client_loss_hist.setdefault(m.client_id, [])
                hist.append(float(loss))
                del hist[:-FIVE]
        losses = [(l, wc) for l, wc in zip(b.losses, w) if math.isfinite(l)]
        train_loss = (sum(l * wc for l, wc in losses) / sum(wc for _, wc in losses)
                      if losses else float("nan"))
        for cid, why in sorted(b.clipped.items()):
            log.warning("round %d: bounded upload of client %s: %s", rnd, cid, why)
        self.round = rnd
        self._probs_cache = None
        self._lrs_cache = None
        return {"round": rnd, "accepted": [m.client_id for m in accepted], "rejected": rejected,
                "clipped": b.clipped, "bounds": b.limits,
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
            "client_loss_hist": {str(k): list(v) for k, v in sorted(self.client_loss_hist.items())},
            "client_diff": {str(k): v for k, v in sorted(self.client_diff.items())},
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
            last = _client_map(state, "client_loss", lambda v: [_number("client_loss", v)])
            hist = _client_map(state, "client_loss_hist", lambda v: _losses(v), optional=True)
            diff = _client_map(state, "client_diff", lambda v: _number("client_diff", v),
                               optional=True)
        except KeyError as exc:
            raise ValueError(f"corrupt server checkpoint: field {exc} missing") from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"corrupt server checkpoint: {exc}") from None
        if not hist:  # an older checkpoint: the last loss only
            hist = last
        elif {c: h[-1] for c, h in hist.items()} != {c: h[-1] for c, h in last.items()}:
            raise ValueError("corrupt server checkpoint: client_loss and client_loss_hist differ")
        if fp != self.fingerprint or seeds.shape != (k,) or not np.array_equal(seeds, self.seeds):
            raise ValueError("checkpoint seed pool differs from this run's (different --seed or "
                             "--num-seeds)")
        if acc.shape != (k,) or ps.shape != (k,) or pc.shape != (k,):
            raise ValueError("corrupt server checkpoint: array sizes differ from K")
        if not np.isfinite(acc).all() or rnd < 0:
            raise ValueError("corrupt server checkpoint: non-finite accumulators or bad round")
        if not (np.isfinite(ps).all() and (ps >= 0).all() and (pc >= 1).all()):
            raise ValueError("corrupt server checkpoint: bad FedKSeed-Pro sums or counts")
        ident = state.get("base_identity") or {}
        if not isinstance(ident, dict):
            raise ValueError("corrupt server checkpoint: field 'base_identity' is not an object")
        if self.base_identity and ident and ident.get("hash") != self.base_identity.get("hash"):
            raise ValueError(f"checkpoint was made with another base model (hash "
                             f"{str(ident.get('hash'))[:12]}..., this model "
                             f"{str(self.base_identity.get('hash'))[:12]}...)")
        self.acc = acc.astype(np.float64)
        self.pro_sum = ps.astype(np.float64)
        self.pro_count = pc.astype(np.int64)
        self.client_loss_hist = hist
        self.client_diff = diff
        self.round = rnd
        self._probs_cache = None
        self._lrs_cache = None
