"""FedMeZO (Ling et al. 2024, arXiv 2402.05926): FedAvg over clients that each run MeZO (Malladi et
al. 2023): every local step perturbs along a FRESH random direction, never one of a pool of seeds.

Seeds.  Step t of client c in round r goes along z(s) with s = derive_seed(run seed, 3, r, c, t)
(kseed.protocol.derive_seed: SHA-256, 64 bits), so the server knows every seed without being told.

A MeZO client's local update is exactly sum_t (-lr_c g_t) z(s_t) (MeZO's step w <- w - lr g z, summed
in real arithmetic), so FedAvg of the clients' models, sum_c w_c model_c with the weights w_c summing
to 1, is model_{r-1} + sum_c sum_t -(w_c lr_c g_ct) z(s_ct): the round's update is a list of (seed,
coefficient) pairs, in client id order and then step order, with coef = -(w_c x lr_c x g) (computed in
float64, stored in float32; zero coefficients left out).  The weights are the clients' example counts
(or equal, --equal-weights), normalised; lr_c is the base lr or the client-wise rule
(SeedServer.round_lrs, --clientwise-lr --lr-rule fedmezo).  Each client's g first go through the
threat model's bounds (base.bound_uploads: |g| clip, the norm bound over the client's pairs, weight
cap, loss cap).

The global model.  model_0 = w0, model_r = model_{r-1} + round r's pairs, ONE fused multi-tensor apply
per round (rounded once per round): kseed.history.apply_history.  The server keeps every round in the
run directory's append-only, checksummed history.bin (kseed.history.SeedHistory); its checkpoint names
the history by (rounds, digest).  A client rebuilds model_{r-1} from w0 and the rounds its down message
carries, or catches up from the model it kept (Flower node config cache-dir; kseed.history.ModelCache)
on the rounds it missed, bitwise the same; in the in-process engine the clients share the server's
model and the message carries no rounds.

Wire format (little-endian; every decoder checks every field and raises ProtocolError naming it).

Down (server -> client), ``DOWN_MAGIC`` b"KMD1", version 1, 128 + S bytes::

    offset size
    0      4   magic b"KMD1"
    4      2   version (uint16) = 1
    6      2   flags (uint16): bit 1 = Rademacher noise (as kseed.protocol's down message)
    8      4   round r (uint32, >= 1)
    12     4   client id (uint32)
    16     8   run fingerprint (SHA-256 prefix of the run seed: the seeds derive from it)
    24     4   local steps tau (uint32)
    28     4   batch size (uint32, >= 1)
    32     8   lr (float64, this client's)
    40     8   eps (float64)
    48     8   client RNG seed (uint64: the batches)
    56     4   first round carried, a (uint32, 1 <= a <= r): the span holds rounds a .. r-1
    60     4   reserved (0)
    64    32   history digest after a-1 rounds (what a client catching up must hold)
    96    32   history digest after r-1 rounds (the model the client trains from)
    128    S   the rounds a .. r-1 in kseed.history's wire form: S = 16 + 12 R + 12 P for R rounds of
               P pairs (R = 0: S = 16)

Up (client -> server), ``UP_MAGIC`` b"KMU1", version 1, 32 + 4 tau bytes::

    0      4   magic b"KMU1"
    4      2   version (uint16) = 1
    6      2   flags (uint16) = 0
    8      4   round (uint32)
    12     4   client id (uint32)
    16     4   example count (uint32, >= 1)
    20     4   tau, the number of g (uint32; <= the run's local steps)
    24     4   train loss (float32; NaN when no step was taken)
    28     4   cached round (uint32): the round of the global model the client keeps in its
               cache-dir after this round (r - 1), or 0 (none)
    32   4 tau g of steps 0 .. tau-1 (float32, finite; 0 for a step skipped for a non-finite g)

The paper's Dolly setting (tau = 200, 10 clients a round, 40 rounds): up = 32 + 800 = 832 bytes per
client per round; round r's history holds 2,000 pairs = 24,012 bytes of wire form, so a down message
carrying the whole history before round r is 128 + 16 + 24,012 (r-1) bytes (936,612 bytes before round
40), one carrying only round r-1 (a client with a cache that took part in round r-1) 24,156 bytes,
and an in-process one 144 bytes.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
import time
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import numpy as np

from .. import protocol as P
from .. import weights as W
from ..config import FedConfig
from ..history import (GENESIS, HistoryError, ModelCache, SeedHistory, apply_history, decode_rounds,
                       next_digest)
from ..rundir import HISTORY  # the server's seed history, in the run directory
from .base import Method, SeedClient, SeedServer, _client_map, _typed, bound_uploads, check_local

VERSION = 1
DOWN_MAGIC = b"KMD1"
UP_MAGIC = b"KMU1"
_DOWN_HDR = struct.Struct("<4sHHII8sIIddQII32s32s")
_UP_HDR = struct.Struct("<4sHHIIIIfI")
DOWN_HEADER_SIZE = _DOWN_HDR.size
UP_HEADER_SIZE = _UP_HDR.size
assert DOWN_HEADER_SIZE == 128 and UP_HEADER_SIZE == 32
FLAG_RADEMACHER = P.FLAG_RADEMACHER
STEP_TAG = 3  # derive_seed(run seed, STEP_TAG, round, client, step); 1: sampling, 2: client RNG


def step_seeds(run_seed: int, rnd: int, client_id: int, tau: int) -> np.ndarray:
    """uint64 [tau]: the fresh seed of each local step of a client in a round."""
    return np.array([P.derive_seed(run_seed, STEP_TAG, rnd, client_id, t) for t in range(tau)],
                    dtype=np.uint64)


def run_fingerprint(run_seed: int) -> bytes:
    """8 bytes naming the run seed every step seed derives from."""
    return hashlib.sha256(b"kseed-fedmezo/v1/%d" % int(run_seed)).digest()[:8]


def up_size(tau: int) -> int:
    return UP_HEADER_SIZE + 4 * tau


# --------------------------------------------------------------------------------- messages
@dataclass
class MeZODown:
    round: int
    client_id: int
    fingerprint: bytes
    local_steps: int
    batch_size: int
    lr: float
    eps: float
    client_seed: int
    start: int  # first round carried; rounds start .. round-1
    digest_before: str  # hex: history digest after start-1 rounds
    digest_model: str  # hex: history digest after round-1 rounds
    span: bytes  # kseed.history wire form of rounds start .. round-1
    noise: str = "gaussian"


@dataclass
class MeZOUp:
    round: int
    client_id: int
    num_examples: int
    grads: np.ndarray  # float32 [tau]
    train_loss: float = float("nan")
    cached: int = 0

    @property
    def tau(self) -> int:
        return int(self.grads.shape[0])

    @property
    def indices(self) -> np.ndarray:
        """Each g's own 'seed index' (its step): every step has its own seed, so base.bound_uploads'
        per-index bounds are per-pair bounds here."""
        return np.arange(self.tau, dtype=np.uint32)


def _digest_bytes(name: str, hexd: str) -> bytes:
    try:
        b = bytes.fromhex(hexd)
    except (TypeError, ValueError):
        b = b""
    if len(b) != 32:
        raise P.ProtocolError(f"{name} must be 64 hex digits, got {hexd!r}")
    return b


def encode_down(m: MeZODown, *, magic: bytes = DOWN_MAGIC) -> bytes:
    u32 = P._u32
    for name in ("lr", "eps"):
        v = float(getattr(m, name))
        if not (math.isfinite(v) and v > 0):
            raise P.ProtocolError(f"{name} must be finite and > 0, got {v}")
    if not isinstance(m.fingerprint, bytes) or len(m.fingerprint) != 8:
        raise P.ProtocolError("fingerprint must be 8 bytes")
    if u32("batch_size", m.batch_size) < 1:
        raise P.ProtocolError("batch_size must be >= 1")
    rnd, start = u32("round", m.round), u32("start", m.start)
    if not 1 <= start <= rnd:
        raise P.ProtocolError(f"start must be in [1, round = {rnd}], got {start}")
    if not isinstance(m.client_seed, (int, np.integer)) or not 0 <= int(m.client_seed) < 2 ** 64:
        raise P.ProtocolError(f"client_seed must be a uint64, got {m.client_seed!r}")
    if m.noise not in ("gaussian", "rademacher"):
        raise P.ProtocolError(f"noise must be gaussian or rademacher, got {m.noise!r}")
    if not isinstance(m.span, bytes):
        raise P.ProtocolError("span must be bytes")
    hdr = _DOWN_HDR.pack(magic, VERSION, FLAG_RADEMACHER if m.noise == "rademacher" else 0,
                         rnd, u32("client_id", m.client_id), m.fingerprint,
                         u32("local_steps", m.local_steps), int(m.batch_size), float(m.lr),
                         float(m.eps), int(m.client_seed), start, 0,
                         _digest_bytes("digest_before", m.digest_before),
                         _digest_bytes("digest_model", m.digest_model))
    return hdr + m.span


def decode_down(data, *, expected_fingerprint: Optional[bytes] = None,
                magic: bytes = DOWN_MAGIC) -> MeZODown:
    """Decode and check a down message (the span's rounds are checked by decode_rounds when the
    client applies them).  ``magic``: another method's down message of this layout (Ferret's)."""
    data = P._check_bytes(data)
    if len(data) < DOWN_HEADER_SIZE + 16:
        raise P.ProtocolError(f"FedMeZO down message truncated: {len(data)} bytes, the header and "
                              f"an empty span are {DOWN_HEADER_SIZE + 16}")
    (got, ver, flags, rnd, cid, fp, tau, bs, lr, eps, cseed, start, res, d0,
     d1) = _DOWN_HDR.unpack_from(data)
    P.check_preamble(f"{magic.decode()} down message", got, magic, ver, VERSION, flags,
                     FLAG_RADEMACHER)
    if res:
        raise P.ProtocolError(f"reserved field of the FedMeZO down message is {res}, not 0")
    if expected_fingerprint is not None and fp != expected_fingerprint:
        raise P.ProtocolError("run fingerprint mismatch: the server's run has another --seed")
    if rnd < 1 or not 1 <= start <= rnd:
        raise P.ProtocolError(f"FedMeZO down message carries rounds {start}..{rnd - 1} for round "
                              f"{rnd}: not a span before the round")
    if not (math.isfinite(lr) and math.isfinite(eps) and eps > 0 and lr > 0):
        raise P.ProtocolError(f"bad local config in down message: lr {lr}, eps {eps}")
    if bs < 1:
        raise P.ProtocolError("batch size 0 in down message")
    return MeZODown(round=rnd, client_id=cid, fingerprint=fp, local_steps=tau, batch_size=bs,
                    lr=lr, eps=eps, client_seed=cseed, start=start, digest_before=d0.hex(),
                    digest_model=d1.hex(), span=data[DOWN_HEADER_SIZE:],
                    noise="rademacher" if flags & FLAG_RADEMACHER else "gaussian")


def up_header_fields(m):
    """(round, client id, cached round) of an upload to encode, checked as every seed-history method's
    upload header needs them (ProtocolError naming the field): uint32s, at least one example, and the
    cached round before the round."""
    if P._u32("num_examples", m.num_examples) < 1:
        raise P.ProtocolError("num_examples must be >= 1")
    rnd, cached = P._u32("round", m.round), P._u32("cached", m.cached)
    if cached >= max(rnd, 1):
        raise P.ProtocolError(f"cached round {cached} is not before round {rnd}")
    return rnd, P._u32("client_id", m.client_id), cached


def encode_up(m: MeZOUp) -> bytes:
    g = P._finite_f32("grads", m.grads)
    if g.shape[0] > P.MAX_STEPS:
        raise P.ProtocolError(f"too many g: {g.shape[0]}")
    rnd, cid, cached = up_header_fields(m)
    hdr = _UP_HDR.pack(UP_MAGIC, VERSION, 0, rnd, cid, int(m.num_examples), g.shape[0],
                       float(m.train_loss), cached)
    return hdr + g.astype("<f4").tobytes()


def decode_up(data, *, expected_round: Optional[int] = None, expected_client: Optional[int] = None,
              max_steps: Optional[int] = None) -> MeZOUp:
    data = P._check_bytes(data)
    if max_steps is not None and len(data) > up_size(max_steps):
        raise P.ProtocolError(f"oversized upload: {len(data)} bytes > limit {up_size(max_steps)}")
    if len(data) < UP_HEADER_SIZE:
        raise P.ProtocolError(f"upload truncated: {len(data)} bytes, the header alone is "
                              f"{UP_HEADER_SIZE}")
    magic, ver, flags, rnd, cid, n_ex, tau, loss, cached = _UP_HDR.unpack_from(data)
    P.check_preamble("FedMeZO upload", magic, UP_MAGIC, ver, VERSION, flags)
    if max_steps is not None and tau > max_steps:
        raise P.ProtocolError(f"oversized upload: {tau} g > {max_steps} local steps")
    if len(data) != up_size(tau):
        raise P.ProtocolError(f"wrong length: upload has {len(data)} bytes, {tau} g need "
                              f"{up_size(tau)}")
    P.check_up_header(rnd, cid, n_ex, cached, expected_round, expected_client)
    g = np.frombuffer(data, dtype="<f4", count=tau, offset=UP_HEADER_SIZE).astype(np.float32)
    if not np.isfinite(g).all():
        bad = int(np.flatnonzero(~np.isfinite(g))[0])
        raise P.ProtocolError(f"NaN/inf gradient: step {bad} has g = {g[bad]}")
    return MeZOUp(round=rnd, client_id=cid, num_examples=n_ex, grads=g, train_loss=float(loss),
                  cached=cached)


# ---------------------------------------------------------------------------- global model
class GlobalModel:
    """The global model of a seed history at one round, kept beside a workspace: a host copy of it
    (kseed.weights.host_buffer: page cache, not private memory) and its round.  ``load(history, r)``
    puts model_r into the workspace's weights: from the copy when it is at round r, else applying
    rounds (copy's round + 1) .. r onto it (one fused apply per round), or from w0 when the copy is
    newer or absent; the copy then holds round r."""

    def __init__(self, ws, apply=apply_history):
        self.ws = ws
        self.apply = apply  # apply(ms, rounds, bases=): the method's rounds -> weights
        self.buf = None
        self.round = 0

    def load(self, history: SeedHistory, rnd: int) -> None:
        ws = self.ws
        t0 = time.perf_counter()
        if self.buf is None or rnd < self.round:
            base, bases = 0, ws.w0
        else:
            base, bases = self.round, self.buf.tensors
        self.apply(ws.ms, history.read(base + 1, rnd), bases=bases)
        if self.buf is None:
            self.buf = W.host_buffer(ws.ms.params, "the global model")
        if self.buf is not bases:
            self.buf.copy_from(ws.ms.params)
        self.round = rnd
        if rnd > base:
            ws.rebuilds += 1
        ws.rebuild_seconds += time.perf_counter() - t0


# ---------------------------------------------------------------------------------- server
class FedMeZOServer(SeedServer):
    method = "fedmezo"
    files = (HISTORY,)

    def __init__(self, config: FedConfig, *, base_identity: Optional[dict] = None,
                 workdir: Optional[str] = None, readonly: bool = False):
        super().__init__(config, base_identity=base_identity, workdir=workdir, readonly=readonly)
        self.fingerprint = run_fingerprint(config.seed)
        path = None if workdir is None else os.path.join(workdir, HISTORY)
        if readonly and path is not None and not os.path.isfile(path):
            raise ValueError(f"no seed history in {workdir} ({HISTORY} missing)")
        # not readonly: a resume's truncate to the checkpoint drops a torn tail (a kill mid-append)
        self.history = SeedHistory(path, resume=not readonly)
        self.client_cached: Dict[int, int] = {}  # client -> round of the model in its cache-dir
        self._model: Optional[GlobalModel] = None

    # ------------------------------------------------------------------------------ messages
    down_magic = DOWN_MAGIC

    def apply_rounds(self, ms, rounds, *, bases=None) -> int:
        """Apply history rounds to ``ms`` (kseed.history.apply_history; a method whose pairs mean
        something else, Ferret's, overrides it)."""
        return apply_history(ms, rounds, bases=bases)

    def down_eps(self) -> float:
        """The down message's eps field."""
        return self.config.eps

    def load_global(self, ws) -> None:
        if self._model is None or self._model.ws is not ws:
            self._model = GlobalModel(ws, self.apply_rounds)
        self._model.load(self.history, self.round)

    def make_down(self, rnd: int, client_id: int) -> bytes:
        self._check_round(rnd)
        self._check_client(client_id)
        c = self.config
        start = rnd if self.shares_model else self.client_cached.get(client_id, 0) + 1
        return encode_down(MeZODown(
            round=rnd, client_id=client_id, fingerprint=self.fingerprint,
            local_steps=c.local_steps, batch_size=c.batch_size, lr=self.client_lr(client_id, rnd),
            eps=self.down_eps(), client_seed=self.client_seed(rnd, client_id), start=start,
            digest_before=self.history.digest(start - 1), digest_model=self.history.digest(rnd - 1),
            span=self.history.encode_rounds(start, rnd - 1), noise=c.noise), magic=self.down_magic)

    def aggregate(self, rnd: int, uploads: Mapping[int, bytes],
                  weights: Optional[Mapping[int, float]] = None) -> dict:
        """Validate the round's uploads, bound them (base.bound_uploads), and append the round's
        (seed, coef) pairs to the history: coef = -(w_c lr_c g), clients in id order, steps in
        order.  Returns the round's statistics, as FedKSeed's."""
        self._check_round(rnd)
        c = self.config
        accepted, rejected, bytes_up = self.collect(
            rnd, uploads, lambda data, cid: decode_up(data, expected_round=rnd, expected_client=cid,
                                                      max_steps=c.local_steps))
        b = bound_uploads(c, accepted, weights)
        w = b.weights / b.weights.sum()
        lrs = self.round_lrs(rnd)
        seeds, coefs, own = [], [], []
        for m, g, wc in zip(accepted, b.grads, w):
            lr_c = lrs.get(m.client_id, c.lr)
            seeds.append(step_seeds(c.seed, rnd, m.client_id, m.tau))
            coefs.append(-(wc * lr_c * g))
            own.append(-lr_c * g)
        seeds_all = np.concatenate(seeds) if seeds else np.zeros(0, np.uint64)
        coefs_all = (np.concatenate(coefs) if coefs else np.zeros(0)).astype(np.float32)
        keep = coefs_all != 0
        self.history.append(rnd, seeds_all[keep], coefs_all[keep])
        # each client's update in the space of the round's pairs (for the model-diff lr signal)
        sizes = [len(d) for d in own]
        deltas = []
        for i, d in enumerate(own):
            v = np.zeros(sum(sizes))
            v[sum(sizes[:i]):sum(sizes[:i + 1])] = d
            deltas.append(v)
        for cid in self.sample_clients(rnd):
            self.client_cached.pop(cid, None)
        for m in accepted:
            if m.cached:
                self.client_cached[m.client_id] = m.cached
        stats = self.record_clients(rnd, accepted, b, w, deltas, rejected, bytes_up)
        stats["pairs"] = int(keep.sum())
        return stats

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "format": "kseed-fedmezo/1",
            "method": self.method,
            "round": self.round,
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint.hex(),
            "history": {"file": None if self.workdir is None else HISTORY,
                        "rounds": self.history.rounds, "pairs": self.history.pairs,
                        "digest": self.history.digest()},
            **self.client_state(),
            "client_cached": {str(k): v for k, v in sorted(self.client_cached.items())},
            "rng": "stateless: derived from (seed, round, client, step) by SHA-256",
            "base_identity": self.base_identity,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from state_dict(): the history is cut back to the checkpoint's rounds (records
        appended after it, by a run that stopped before its checkpoint, are dropped) after checking
        its digest; ValueError naming the mismatch if it is not this run's."""
        def history(state):
            h = _typed(state, "history", dict)
            return (_typed(h, "rounds", int), _typed(h, "digest", str),
                    _client_map(state, "client_cached", lambda v: _typed({"v": v}, "v", int)))

        fp, rnd, hist, diff, (rounds, digest, cached) = self.read_checkpoint(
            state, "kseed-fedmezo/1", history)
        if fp != self.fingerprint:
            raise ValueError("checkpoint run fingerprint differs from this run's (different --seed)")
        if rnd < 0 or rounds != rnd or any(not 0 < v < rnd for v in cached.values()):
            raise ValueError(f"corrupt server checkpoint: round {rnd}, history of {rounds} rounds")
        self.check_base_identity(state)
        try:
            if self.readonly:
                if self.history.rounds < rounds or self.history.digest(rounds) != digest:
                    raise HistoryError(f"{self.history.path or 'the seed history'} does not match "
                                       f"the checkpoint's ({rounds} rounds, digest {digest[:12]}...)")
            else:
                self.history.truncate(rounds, digest)
        except HistoryError as exc:
            raise ValueError(f"seed history: {exc}") from None
        self.client_loss_hist = hist
        self.client_diff = diff
        self.client_cached = cached
        self.round = rnd
        self._model = None
        self._lrs_cache = None

    def export_info(self) -> dict:
        return {"history_rounds": self.round, "history_pairs": self.history.pairs_in(1, self.round),
                "history_digest": self.history.digest(self.round)}


# ---------------------------------------------------------------------------------- client
class FedMeZOClient(SeedClient):
    """A FedMeZO client.  ``shared``: the server whose model this client shares (the in-process
    engine), so a down message that carries no rounds is served from it; ``cache_dir``: a folder
    where this client keeps the global model between participations (a subfolder per run and client;
    its hash is checked before use), so the server sends only the rounds it missed."""

    def __init__(self, config: FedConfig, model_loader, partition, *,
                 client_id: Optional[int] = None, shared=None, cache_dir: Optional[str] = None,
                 memory_budget_mib: Optional[float] = None):
        super().__init__(config, model_loader, partition, client_id=client_id,
                         memory_budget_mib=memory_budget_mib)
        self.fingerprint = run_fingerprint(config.seed)
        self.shared = shared
        self.cache_dir = cache_dir
        self.cached = 0  # the round of the model this client keeps (0: none)
        self.last_catch_up: dict = {}

    down_magic = DOWN_MAGIC
    apply_rounds = FedMeZOServer.apply_rounds  # the server's and the client's rounds -> weights

    def _decode(self, down_bytes) -> MeZODown:
        m = decode_down(down_bytes, expected_fingerprint=self.fingerprint, magic=self.down_magic)
        self._check_for_me(m.client_id)
        self.check_down(m)
        return m

    def check_down(self, m: MeZODown) -> None:
        """Refuse a down message whose local settings are not this client's (base.check_local)."""
        check_local(self.config, noise=m.noise, local_steps=m.local_steps, batch_size=m.batch_size,
                    eps=m.eps, lr=m.lr, rnd=m.round, client_id=m.client_id,
                    client_seed=m.client_seed)

    def _cache(self, cid: int) -> Optional[ModelCache]:
        if self.cache_dir is None:
            return None
        return ModelCache(os.path.join(self.cache_dir, f"kseed-{self.config.method}-"
                                                       f"{self.fingerprint.hex()}-client{cid}"))

    def _identity(self) -> dict:
        return {"base": self.workspace.identity, "noise": self.config.noise,
                "run": self.fingerprint.hex()}

    def _from_cache(self, cache: Optional[ModelCache], rounds: int, digest: str) -> None:
        got = cache.load(self.workspace.ms, identity=self._identity()) if cache else None
        if got != (rounds, digest):
            raise P.ProtocolError(
                f"the down message expects this client to hold the global model of round {rounds} "
                f"(digest {digest[:12]}...), its model cache holds "
                f"{'nothing usable' if got is None else f'round {got[0]} ({got[1][:12]}...)'}")

    def load_model(self, m: MeZODown) -> None:
        """Set the workspace's weights to model_{round-1}: the shared server's, or the cached model
        (or w0) plus the rounds the message carries, checked against its digests first."""
        ws = self.workspace
        if ws.ms.noise != m.noise:
            raise P.ProtocolError(f"down message noise {m.noise!r} does not match this client's "
                                  f"workspace (built with noise {ws.ms.noise!r})")
        t0 = time.perf_counter()
        base = m.round - 1
        cache = self._cache(m.client_id)
        rounds = decode_rounds(m.span, expected_start=m.start)
        if len(rounds) != base - m.start + 1:
            raise P.ProtocolError(f"down message span holds {len(rounds)} rounds, rounds "
                                  f"{m.start}..{base} are {base - m.start + 1}")
        d = GENESIS.hex() if m.start == 1 else m.digest_before
        if m.start == 1 and m.digest_before != d:
            raise P.ProtocolError("down message digest before round 1 is not the empty history's")
        for r, s, c in rounds:
            d = next_digest(d, r, s, c)
        if d != m.digest_model:
            raise P.ProtocolError(f"the rounds in the down message do not chain to its digest "
                                  f"after round {base}")
        fresh = cache is not None and base > 0
        if rounds and m.start == 1:
            self.apply_rounds(ws.ms, rounds, bases=ws.w0)
        elif rounds:
            self._from_cache(cache, m.start - 1, m.digest_before)
            self.apply_rounds(ws.ms, rounds)
        elif base == 0:
            self.apply_rounds(ws.ms, [], bases=ws.w0)
            fresh = False
        elif self.shared is not None:
            srv = self.shared
            if srv.round != base or srv.history.digest(base) != m.digest_model:
                raise P.ProtocolError(f"the shared server model is at round {srv.round}, the down "
                                      f"message is for round {m.round}")
            srv.load_global(ws)
            fresh = False
        else:
            self._from_cache(cache, base, m.digest_model)
            fresh = False
        if fresh:
            cache.save(ws.ms, base, m.digest_model, self._identity())
        self.cached = base if cache is not None and base > 0 else 0
        dt = time.perf_counter() - t0
        if self.shared is None:
            ws.rebuild_seconds += dt
        self.last_catch_up = {"rounds": len(rounds), "pairs": int(sum(len(s) for _, s, _ in rounds)),
                              "seconds": dt}

    def load(self, down_bytes) -> None:
        self.load_model(self._decode(down_bytes))

    def fit(self, down_bytes: bytes) -> bytes:
        m = self._decode(down_bytes)
        self.load_model(m)
        rng = np.random.Generator(np.random.PCG64(m.client_seed))
        seeds = step_seeds(self.config.seed, m.round, m.client_id, m.local_steps)
        kept, kept_g, train_loss = self.local_steps([int(s) for s in seeds], rng, eps=m.eps,
                                                    lr=m.lr, batch_size=m.batch_size, rnd=m.round)
        g = np.zeros(m.local_steps, dtype=np.float32)
        g[kept] = np.array(kept_g, dtype=np.float32)
        return encode_up(MeZOUp(round=m.round, client_id=m.client_id,
                                num_examples=len(self.partition), grads=g, train_loss=train_loss,
                                cached=self.cached))


ZO_OPTIONS = frozenset({"local_steps", "lr", "eps", "batch_size", "noise"})
METHOD = Method(
    name="fedmezo",
    summary="FedMeZO: FedAvg of MeZO clients, a fresh seed every local step; the global model is "
            "the seed history",
    server=FedMeZOServer, client=FedMeZOClient,
    options=ZO_OPTIONS | {"clientwise_lr", "lr_rule", "lr_signal", "lr_delta"})
