"""The FedKSeed wire format: small, versioned, validated binary messages (little-endian, struct-based).

Down (server -> client), ``DOWN_MAGIC`` + version 1::

    offset size
    0      4   magic b"KSD1"
    4      2   version (uint16) = 1
    6      2   flags (uint16): bit 0 = probabilities present (FedKSeed-Pro); bit 1 = Rademacher
                 noise (the directions are r in {-1, +1}; clear: Gaussian z, as every message
                 before the flag existed)
    8      4   round (uint32)
    12     4   client id (uint32)
    16     8   seed-pool fingerprint (8 bytes: SHA-256 prefix of the K seeds)
    24     4   K (uint32)
    28     4   local steps tau (uint32)
    32     4   batch size (uint32)
    36     4   reserved (0)
    40     8   lr (float64)
    48     8   eps (float64)
    56     8   client RNG seed (uint64)
    64    4K   coefficients (float32): the global model is w0 + sum_k coef_k z(seed_k)
    ..    4K   probabilities (float32), only with flag bit 0

Up (client -> server), ``UP_MAGIC`` + version 1::

    0      4   magic b"KSU1"
    4      2   version (uint16) = 1
    6      2   flags (uint16): bit 0 = 16-bit seed indices (else 32-bit)
    8      4   round (uint32)
    12     4   client id (uint32)
    16     4   example count (uint32, >= 1)
    20     4   number of pairs tau (uint32)
    24     4   train loss (float32; NaN when no step was taken)
    28     4   reserved (0)
    32   w*tau seed indices (uint16 or uint32)
    ..   4*tau projected gradients g (float32)

With K = 4096 and tau = 200: down = 64 + 16384 = 16,448 bytes, up = 32 + 200 * 6 = 1,232 bytes.

The noise kind is a flag bit, not the reserved word, and the version stays 1: a Gaussian message is
byte for byte what it always was, and a decoder from before the flag refuses a Rademacher message
("unknown flags") instead of reading it as Gaussian (it does not check the reserved word, so a kind
kept there would be silently ignored and the client would train along the wrong directions).

Every decoder checks everything and raises ``ProtocolError`` (a ValueError) naming the problem.
"""
from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .config import NOISES  # the noise kinds a down message can name

VERSION = 1
DOWN_MAGIC = b"KSD1"
UP_MAGIC = b"KSU1"
_DOWN_HDR = struct.Struct("<4sHHII8sIIIIdd Q")
_UP_HDR = struct.Struct("<4sHHIIIIfI")
DOWN_HEADER_SIZE = _DOWN_HDR.size
UP_HEADER_SIZE = _UP_HDR.size
assert DOWN_HEADER_SIZE == 64 and UP_HEADER_SIZE == 32
FLAG_PROBS = 1
FLAG_RADEMACHER = 2
_DOWN_FLAGS = FLAG_PROBS | FLAG_RADEMACHER
FLAG_U16 = 1
MAX_K = 1 << 24
MAX_STEPS = 1 << 24


class ProtocolError(ValueError):
    """A message that is malformed or does not belong here (the text names the problem)."""


# ------------------------------------------------------------------------------- seed pool
def seed_pool(run_seed: int, k: int) -> np.ndarray:
    """K distinct uint64 candidate seeds drawn from the run seed (SHA-256 counter mode, portable)."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ValueError(f"num_seeds K must be an int in [1, {MAX_K}], got {k!r}")
    if not isinstance(run_seed, (int, np.integer)) or isinstance(run_seed, bool) or run_seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {run_seed!r}")
    out, seen, ctr = [], set(), 0
    while len(out) < k:
        h = hashlib.sha256(b"kseed-seed-pool/v1/%d/%d" % (run_seed, ctr)).digest()
        ctr += 1
        s = int.from_bytes(h[:8], "little")
        if s not in seen:  # distinct: two equal seeds would silently merge
            seen.add(s)
            out.append(s)
    return np.array(out, dtype=np.uint64)


def fingerprint(seeds: np.ndarray) -> bytes:
    """8-byte identity of a seed pool (its order included)."""
    return hashlib.sha256(np.ascontiguousarray(seeds, dtype="<u8").tobytes()).digest()[:8]


def derive_seed(run_seed: int, *parts: int) -> int:
    """A uint64 derived from the run seed and integers (e.g. round, client id): stateless RNG seeds."""
    msg = b"kseed-derive/v1/" + b"/".join(str(int(x)).encode() for x in (run_seed,) + parts)
    return int.from_bytes(hashlib.sha256(msg).digest()[:8], "little")


def client_rng_seed(run_seed: int, rnd: int, client_id: int) -> int:
    """The RNG seed of a client's local training in a round (seed choice and batches): the server
    sends it, the client checks it."""
    return derive_seed(run_seed, 2, rnd, client_id)


# --------------------------------------------------------------------------------- messages
@dataclass
class DownMessage:
    round: int
    client_id: int
    fingerprint: bytes
    coefs: np.ndarray  # float32 [K]
    lr: float
    eps: float
    local_steps: int
    batch_size: int
    client_seed: int
    probs: Optional[np.ndarray] = None  # float32 [K] or None
    noise: str = "gaussian"  # the direction family: gaussian | rademacher (flag bit 1)

    @property
    def k(self) -> int:
        return int(self.coefs.shape[0])


@dataclass
class UpMessage:
    round: int
    client_id: int
    num_examples: int
    indices: np.ndarray  # uint32 [tau]
    grads: np.ndarray  # float32 [tau]
    train_loss: float = float("nan")
    extra: dict = field(default_factory=dict)

    @property
    def tau(self) -> int:
        return int(self.indices.shape[0])


def _u32(name, x):
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not 0 <= int(x) < 2 ** 32:
        raise ProtocolError(f"{name} must be an int in [0, 2^32), got {x!r}")
    return int(x)


def _finite_f32(name, arr) -> np.ndarray:
    a = np.ascontiguousarray(arr, dtype=np.float32)
    if a.ndim != 1:
        raise ProtocolError(f"{name} must be 1-d, got shape {a.shape}")
    if not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a))[0])
        raise ProtocolError(f"{name}[{bad}] is not finite ({a[bad]})")
    return a


def encode_down(m: DownMessage) -> bytes:
    coefs = _finite_f32("coefs", m.coefs)
    k = coefs.shape[0]
    if not 1 <= k <= MAX_K:
        raise ProtocolError(f"K must be in [1, {MAX_K}], got {k}")
    if not isinstance(m.fingerprint, bytes) or len(m.fingerprint) != 8:
        raise ProtocolError("fingerprint must be 8 bytes")
    for name in ("lr", "eps"):
        v = float(getattr(m, name))
        if not math.isfinite(v):
            raise ProtocolError(f"{name} must be finite, got {v}")
    if not float(m.eps) > 0:
        raise ProtocolError(f"eps must be > 0, got {m.eps}")
    if not float(m.lr) > 0:
        raise ProtocolError(f"lr must be > 0, got {m.lr}")
    steps = _u32("local_steps", m.local_steps)
    bs = _u32("batch_size", m.batch_size)
    if bs < 1:
        raise ProtocolError("batch_size must be >= 1")
    if not isinstance(m.client_seed, (int, np.integer)) or not 0 <= int(m.client_seed) < 2 ** 64:
        raise ProtocolError(f"client_seed must be a uint64, got {m.client_seed!r}")
    if not isinstance(m.noise, str) or m.noise not in NOISES:
        raise ProtocolError(f"noise must be one of {' | '.join(NOISES)}, got {m.noise!r}")
    flags = FLAG_RADEMACHER if m.noise == "rademacher" else 0
    tail = b""
    if m.probs is not None:
        p = _finite_f32("probs", m.probs)
        if p.shape[0] != k:
            raise ProtocolError(f"probs has {p.shape[0]} entries, expected K = {k}")
        if (p < 0).any():
            raise ProtocolError("probs must be >= 0")
        flags |= FLAG_PROBS
        tail = p.astype("<f4").tobytes()
    hdr = _DOWN_HDR.pack(DOWN_MAGIC, VERSION, flags, _u32("round", m.round),
                         _u32("client_id", m.client_id), m.fingerprint, k, steps, bs, 0,
                         float(m.lr), float(m.eps), int(m.client_seed))
    return hdr + coefs.astype("<f4").tobytes() + tail


def _check_bytes(data) -> bytes:
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise ProtocolError(f"message must be bytes, got {type(data).__name__}")
    return data


def check_preamble(what: str, magic: bytes, want: bytes, ver: int, version: int, flags: int,
                   allowed: int = 0, error=ProtocolError) -> None:
    """The checks every kseed message and file header opens with: its magic, its format version and
    no flag outside ``allowed``; ``what`` names the message in the error (``error``: the class)."""
    if magic != want:
        raise error(f"not a {what} (magic {magic!r})")
    if ver != version:
        raise error(f"unsupported {what} version {ver} (this build reads {version})")
    if flags & ~allowed:
        raise error(f"unknown flags 0x{flags:x} in the {what}")


def check_up_header(rnd: int, cid: int, n_ex: int, cached: int, expected_round: Optional[int],
                    expected_client: Optional[int]) -> None:
    """The checks of an upload header's round, client, example count and cached round (0: none)
    that every upload makes (ProtocolError naming the field)."""
    if expected_round is not None and rnd != expected_round:
        raise ProtocolError(f"wrong round: upload is for round {rnd}, expected {expected_round}")
    if expected_client is not None and cid != expected_client:
        raise ProtocolError(f"upload names client {cid}, expected {expected_client}")
    if n_ex < 1:
        raise ProtocolError("upload reports 0 examples")
    if cached and cached != rnd - 1:
        raise ProtocolError(f"upload says the client keeps round {cached}, but it trained from "
                            f"round {rnd - 1}")


def decode_down(data, *, expected_round: Optional[int] = None, expected_k: Optional[int] = None,
                expected_fingerprint: Optional[bytes] = None) -> DownMessage:
    data = _check_bytes(data)
    if len(data) < DOWN_HEADER_SIZE:
        raise ProtocolError(f"down message truncated: {len(data)} bytes, the header alone is "
                            f"{DOWN_HEADER_SIZE}")
    (magic, ver, flags, rnd, cid, fp, k, steps, bs, _res, lr, eps,
     cseed) = _DOWN_HDR.unpack_from(data)
    check_preamble("kseed down message", magic, DOWN_MAGIC, ver, VERSION, flags, _DOWN_FLAGS)
    if not 1 <= k <= MAX_K:
        raise ProtocolError(f"K = {k} out of range [1, {MAX_K}]")
    want = DOWN_HEADER_SIZE + 4 * k * (2 if flags & FLAG_PROBS else 1)
    if len(data) != want:
        raise ProtocolError(f"down message has {len(data)} bytes, expected {want} for K = {k}")
    if expected_round is not None and rnd != expected_round:
        raise ProtocolError(f"down message is for round {rnd}, expected round {expected_round}")
    if expected_k is not None and k != expected_k:
        raise ProtocolError(f"down message has K = {k}, this client's seed pool has {expected_k}")
    if expected_fingerprint is not None and fp != expected_fingerprint:
        raise ProtocolError("seed-pool fingerprint mismatch: the server uses another seed pool "
                            "(different --seed or --num-seeds)")
    if not (math.isfinite(lr) and math.isfinite(eps) and eps > 0 and lr > 0):
        raise ProtocolError(f"bad local config in down message: lr {lr}, eps {eps}")
    if bs < 1:
        raise ProtocolError("batch size 0 in down message")
    coefs = np.frombuffer(data, dtype="<f4", count=k, offset=DOWN_HEADER_SIZE).astype(np.float32)
    if not np.isfinite(coefs).all():
        raise ProtocolError("down message coefficients contain NaN/inf")
    probs = None
    if flags & FLAG_PROBS:
        probs = np.frombuffer(data, dtype="<f4", count=k,
                              offset=DOWN_HEADER_SIZE + 4 * k).astype(np.float32)
        if not np.isfinite(probs).all() or (probs < 0).any() or not probs.sum() > 0:
            raise ProtocolError("down message probabilities are not a valid distribution")
    return DownMessage(round=rnd, client_id=cid, fingerprint=fp, coefs=coefs, lr=lr, eps=eps,
                       local_steps=steps, batch_size=bs, client_seed=cseed, probs=probs,
                       noise="rademacher" if flags & FLAG_RADEMACHER else "gaussian")


def encode_up(m: UpMessage, *, k: int) -> bytes:
    """Encode an upload; indices use 16 bits when K <= 65536."""
    idx = np.ascontiguousarray(m.indices)
    g = _finite_f32("grads", m.grads)
    if idx.ndim != 1 or idx.shape != g.shape:
        raise ProtocolError(f"indices and grads must be 1-d of one length, got {idx.shape} and "
                            f"{g.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= k):
        raise ProtocolError(f"a seed index is outside [0, {k})")
    if _u32("num_examples", m.num_examples) < 1:
        raise ProtocolError("num_examples must be >= 1")
    tau = idx.shape[0]
    if tau > MAX_STEPS:
        raise ProtocolError(f"too many pairs: {tau}")
    small = k <= 1 << 16
    flags = FLAG_U16 if small else 0
    loss = float(m.train_loss)
    hdr = _UP_HDR.pack(UP_MAGIC, VERSION, flags, _u32("round", m.round), _u32("client_id", m.client_id),
                       int(m.num_examples), tau, loss, 0)
    return hdr + idx.astype("<u2" if small else "<u4").tobytes() + g.astype("<f4").tobytes()


def up_size(tau: int, k: int) -> int:
    return UP_HEADER_SIZE + tau * ((2 if k <= 1 << 16 else 4) + 4)


def decode_up(data, *, k: int, expected_round: Optional[int] = None,
              expected_client: Optional[int] = None, max_steps: Optional[int] = None,
              max_bytes: Optional[int] = None) -> UpMessage:
    data = _check_bytes(data)
    if max_bytes is not None and len(data) > max_bytes:
        raise ProtocolError(f"oversized upload: {len(data)} bytes > limit {max_bytes}")
    if len(data) < UP_HEADER_SIZE:
        raise ProtocolError(f"upload truncated: {len(data)} bytes, the header alone is "
                            f"{UP_HEADER_SIZE}")
    magic, ver, flags, rnd, cid, n_ex, tau, loss, _res = _UP_HDR.unpack_from(data)
    check_preamble("kseed upload", magic, UP_MAGIC, ver, VERSION, flags, FLAG_U16)
    if bool(flags & FLAG_U16) != (k <= 1 << 16):
        raise ProtocolError(f"upload index width does not match K = {k}")
    if max_steps is not None and tau > max_steps:
        raise ProtocolError(f"oversized upload: {tau} pairs > {max_steps} local steps")
    want = up_size(tau, k)
    if len(data) != want:
        raise ProtocolError(f"wrong length: upload has {len(data)} bytes, {tau} pairs need {want}")
    check_up_header(rnd, cid, n_ex, 0, expected_round, expected_client)
    w = 2 if flags & FLAG_U16 else 4
    idx = np.frombuffer(data, dtype="<u2" if w == 2 else "<u4", count=tau,
                        offset=UP_HEADER_SIZE).astype(np.uint32)
    g = np.frombuffer(data, dtype="<f4", count=tau, offset=UP_HEADER_SIZE + w * tau).astype(np.float32)
    if tau and int(idx.max()) >= k:
        bad = int(np.flatnonzero(idx >= k)[0])
        raise ProtocolError(f"seed index out of range: pair {bad} has index {int(idx[bad])} >= K = {k}")
    if not np.isfinite(g).all():
        bad = int(np.flatnonzero(~np.isfinite(g))[0])
        raise ProtocolError(f"NaN/inf gradient: pair {bad} has g = {g[bad]}")
    return UpMessage(round=rnd, client_id=cid, num_examples=n_ex, indices=idx, grads=g,
                     train_loss=float(loss))


__all__ = ["VERSION", "ProtocolError", "DownMessage", "UpMessage", "encode_down", "decode_down",
           "encode_up", "decode_up", "seed_pool", "fingerprint", "derive_seed", "client_rng_seed",
           "up_size",
           "DOWN_HEADER_SIZE", "UP_HEADER_SIZE"]
