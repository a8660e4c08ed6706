"""The seed history of a run whose global model is w0 plus every round's (seed, coefficient) pairs
(FedMeZO, MeZO: fresh seeds every step), its wire form, the rebuild from it, and a client's model cache.

The global model is defined round by round: model_0 = w0, model_r = model_{r-1} + round r's pairs,
each round applied by ONE fused multi-tensor call (``ModelSeeds.apply``, or ``apply_from`` out of place
for the first round from w0).  The apply sums a round's terms in float32 in ascending order and rounds
once per round (docs/SPEC.md section 4; the out-of-place form is bitwise copy + in place), so a client
that keeps its model and applies only the rounds it missed ends bitwise equal to a rebuild from w0
through the same rounds.

All integers are little-endian.

Record body (the unit of the file and of the wire form), 12 + 12 n bytes for a round of n pairs::

    offset  size
    0       4    magic b"KSHR"
    4       4    round r (uint32, >= 1)
    8       4    n, the round's pair count (uint32; 0 is allowed: a round that changed nothing)
    12      8n   seeds (uint64)
    12+8n   4n   coefficients (float32, all finite)

File ``history.bin`` (``SeedHistory(path)``): an 8-byte header, then one record per round, each a
body followed by its 32-byte chained checksum, so round r takes 44 + 12 n bytes::

    0       4    magic b"KSHF"
    4       2    version (uint16) = 1
    6       2    flags (uint16) = 0 (any other value is refused)
    8  ...       records of rounds 1, 2, ...: body, then c_r (32 bytes)

The chain: c_0 = SHA-256(b"kseed-history/v1"), c_r = SHA-256(c_{r-1} || body_r).  c_r is the
history's digest after r rounds (``SeedHistory.digest(r)``, as hex): it names the whole prefix, so a
checkpoint refers to the history by (rounds, digest), and it checks every record (a torn or flipped
record is found on opening and named with its round and byte offset).  The file is append-only: each
append is one write, flushed and fsync'd; a failed append cuts the file back to its previous length.
``truncate`` drops the records after a checkpoint's round (a crash between an append and the
checkpoint) with one ftruncate + fsync, after checking the digest.

Wire form (``encode_rounds`` / ``decode_rounds``, for a down message), 16 + sum over rounds of
(12 + 12 n) bytes, i.e. 16 + 12 R + 12 P for R rounds holding P pairs::

    0       4    magic b"KSHW"
    4       2    version (uint16) = 1
    6       2    flags (uint16) = 0
    8       4    first round (uint32, >= 1)
    12      4    round count R (uint32; 0 = nothing to apply)
    16  ...      R record bodies, rounds first .. first + R - 1 in order (no checksums: the receiver
                 extends its own digest with ``next_digest``)

The paper's Dolly setting (40 rounds of 10 clients x tau 200 = 2,000 pairs) is 16 + 40 x 24,012 =
960,496 bytes for the whole history, 24,028 bytes for one round.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import protocol as P
from .protocol import ProtocolError
from .rundir import atomic_file, atomic_write
from .weights import ModelError, map_safetensors, write_safetensors

log = logging.getLogger("kseed.history")

FILE_MAGIC = b"KSHF"
RECORD_MAGIC = b"KSHR"
WIRE_MAGIC = b"KSHW"
VERSION = 1
_FILE_HDR = struct.Struct("<4sHH")
_REC_HDR = struct.Struct("<4sII")
_WIRE_HDR = struct.Struct("<4sHHII")
FILE_HEADER_SIZE = _FILE_HDR.size
RECORD_HEADER_SIZE = _REC_HDR.size
WIRE_HEADER_SIZE = _WIRE_HDR.size
DIGEST_SIZE = 32
assert (FILE_HEADER_SIZE, RECORD_HEADER_SIZE, WIRE_HEADER_SIZE) == (8, 12, 16)
PAIR_BYTES = 12  # 8 (seed) + 4 (coefficient)
MAX_PAIRS = 1 << 26  # decode_rounds' default bound on the pairs of one message (805 MB of pairs)
_U32 = 1 << 32
GENESIS = hashlib.sha256(b"kseed-history/v1").digest()

Round = Tuple[int, np.ndarray, np.ndarray]  # (round, seeds uint64 [n], coefs float32 [n])


class HistoryError(ValueError):
    """A seed history (file, record, call or wire bytes) that cannot be used; the text names why."""


class HistoryWireError(HistoryError, ProtocolError):
    """Bad bytes in the wire form of a span of rounds (also a ProtocolError: it is a bad message)."""


# ------------------------------------------------------------------------------ records
def record_bytes(n: int) -> int:
    """Bytes of one record body of n pairs (the file adds DIGEST_SIZE to each)."""
    return RECORD_HEADER_SIZE + PAIR_BYTES * n


def wire_bytes(pairs_per_round: Sequence[int]) -> int:
    """The exact size of ``encode_rounds`` for rounds of these pair counts."""
    return WIRE_HEADER_SIZE + sum(record_bytes(int(n)) for n in pairs_per_round)


def _check_round_no(rnd, what: str = "round") -> int:
    if isinstance(rnd, (bool, np.bool_)) or not isinstance(rnd, (int, np.integer)) or \
            not 1 <= int(rnd) < _U32:
        raise HistoryError(f"{what} must be an int in [1, 2^32), got {rnd!r}")
    return int(rnd)


def _pairs(seeds, coefs) -> Tuple[np.ndarray, np.ndarray]:
    """(seeds as uint64, coefs as float32), checked: 1-d, same length, seeds in [0, 2^64), coefs finite
    after rounding to float32."""
    s = seeds.detach().cpu().numpy() if isinstance(seeds, torch.Tensor) else np.asarray(seeds)
    if s.ndim != 1:
        raise HistoryError(f"seeds must be 1-d, got shape {s.shape}")
    if s.dtype != np.uint64:
        if s.size == 0:
            s = s.astype(np.uint64)
        elif s.dtype.kind not in "iu":
            raise HistoryError(f"seeds must be integers (uint64), got dtype {s.dtype}")
        elif s.dtype.kind == "i" and int(s.min()) < 0:
            raise HistoryError("seeds must be in [0, 2^64); a negative seed was given")
        else:
            s = s.astype(np.uint64)
    c0 = coefs.detach().cpu().numpy() if isinstance(coefs, torch.Tensor) else np.asarray(coefs)
    c = c0
    if c.ndim != 1:
        raise HistoryError(f"coefs must be 1-d, got shape {c.shape}")
    if c.size and c.dtype.kind not in "fiu":
        raise HistoryError(f"coefs must be real numbers, got dtype {c.dtype}")
    with np.errstate(over="ignore"):
        c = c.astype(np.float32)
    if c.shape != s.shape:
        raise HistoryError(f"seeds and coefs must have the same length, got {s.size} seeds and "
                           f"{c.size} coefs")
    if not np.isfinite(c).all():
        bad = int(np.flatnonzero(~np.isfinite(c))[0])
        raise HistoryError(f"coefs[{bad}] is not finite after rounding to float32 ({c0[bad]!r})")
    return s, c


def _body(rnd: int, s: np.ndarray, c: np.ndarray) -> bytes:
    return b"".join((_REC_HDR.pack(RECORD_MAGIC, rnd, s.size), s.astype("<u8").tobytes(),
                     c.astype("<f4").tobytes()))


def _unpack_pairs(buf, off: int, n: int) -> Tuple[np.ndarray, np.ndarray]:
    s = np.frombuffer(buf, dtype="<u8", count=n, offset=off).astype(np.uint64)
    c = np.frombuffer(buf, dtype="<f4", count=n, offset=off + 8 * n).astype(np.float32)
    return s, c


def next_digest(prev: str, rnd: int, seeds, coefs) -> str:
    """The history digest after round ``rnd`` given the digest ``prev`` after round rnd - 1 (hex):
    what a client that applied a decoded span computes for its model cache."""
    try:
        p = bytes.fromhex(prev)
    except (TypeError, ValueError):
        p = b""
    if len(p) != DIGEST_SIZE:
        raise HistoryError(f"digest must be {2 * DIGEST_SIZE} hex digits, got {prev!r}")
    s, c = _pairs(seeds, coefs)
    return hashlib.sha256(p + _body(_check_round_no(rnd), s, c)).hexdigest()


# ------------------------------------------------------------------------------ the history
class _BadRecord(Exception):
    """A torn or corrupt record met by SeedHistory's scan: its round, byte offset and message."""

    def __init__(self, rnd: int, off: int, msg: str):
        super().__init__(msg)
        self.rnd, self.off = rnd, off


class SeedHistory:
    """The rounds' (seeds, coefs) of a run, in a file (``path``) or in memory (``path=None``).

    Opening an existing file reads it through once (bounded memory) and checks its header, every
    record's round, length and chained checksum: a torn or corrupt record raises HistoryError naming
    the file, the round and the byte offset.  A missing file is created (header only, atomically).
    Kept in memory: 32 bytes of digest and one offset per round.

    ``resume=True`` (a run restarting from its checkpoint): a bad record does not raise at once.  The
    scan stops there and remembers it (``bad_tail``); ``truncate`` then drops it with everything
    after it when the checkpoint needs only the rounds before it (a kill in the middle of an append
    leaves such a torn tail), and raises the record's error, naming it, when the checkpoint needs
    that round.  Until then the history refuses to grow."""

    def __init__(self, path: Optional[str] = None, *, resume: bool = False):
        self.path = None if path is None else os.path.abspath(path)
        self._chain: List[bytes] = [GENESIS]
        self._offsets: List[int] = []  # file offset of round r's record at index r - 1
        self._counts: List[int] = []
        self._mem: List[Tuple[np.ndarray, np.ndarray]] = []  # in-memory mode only
        self._end = FILE_HEADER_SIZE
        self._resume = bool(resume)
        self.bad_tail: Optional[Tuple[int, int, str]] = None  # (round, offset, error), resume only
        if self.path is None:
            return
        if not os.path.exists(self.path):
            atomic_write(self.path, _FILE_HDR.pack(FILE_MAGIC, VERSION, 0))
            return
        self._scan()

    def _where(self, rnd: int, off: int) -> str:
        return f"{self.path}: round {rnd} (record at byte offset {off})"

    def _scan(self) -> None:
        try:
            f = open(self.path, "rb")
        except OSError as exc:
            raise HistoryError(f"cannot read the seed history {self.path}: {exc.strerror}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            hdr = f.read(FILE_HEADER_SIZE)
            if len(hdr) < FILE_HEADER_SIZE:
                raise HistoryError(f"{self.path}: not a seed history (header torn: {len(hdr)} of "
                                   f"{FILE_HEADER_SIZE} bytes)")
            magic, ver, flags = _FILE_HDR.unpack(hdr)
            if magic != FILE_MAGIC:
                raise HistoryError(f"{self.path}: not a seed history (magic {magic!r})")
            if ver != VERSION:
                raise HistoryError(f"{self.path}: seed history version {ver}, this build reads "
                                   f"{VERSION}")
            if flags:
                raise HistoryError(f"{self.path}: unknown flags 0x{flags:x} in the header")
            try:
                off = FILE_HEADER_SIZE
                while off < size:
                    rnd = len(self._offsets) + 1
                    w = self._where(rnd, off)
                    head = f.read(RECORD_HEADER_SIZE)
                    if len(head) < RECORD_HEADER_SIZE:
                        raise _BadRecord(rnd, off, f"{w} is torn: {size - off} bytes left, "
                                         f"its header alone is {RECORD_HEADER_SIZE}")
                    magic, got, n = _REC_HDR.unpack(head)
                    if magic != RECORD_MAGIC:
                        raise _BadRecord(rnd, off, f"{w} is corrupt: magic {magic!r}")
                    if got != rnd:
                        raise _BadRecord(rnd, off, f"{w} is corrupt: it says round {got}")
                    want = record_bytes(n) + DIGEST_SIZE
                    if size - off < want:
                        raise _BadRecord(rnd, off, f"{w} is torn (or its pair count is "
                                         f"corrupt): {size - off} bytes left of its {want} ({n} pairs)")
                    rest = f.read(want - RECORD_HEADER_SIZE)
                    body, check = head + rest[:-DIGEST_SIZE], rest[-DIGEST_SIZE:]
                    c = hashlib.sha256(self._chain[-1] + body).digest()
                    if c != check:
                        raise _BadRecord(rnd, off, f"{w} is corrupt: checksum mismatch")
                    coefs = np.frombuffer(body, dtype="<f4", count=n, offset=RECORD_HEADER_SIZE + 8 * n)
                    if not np.isfinite(coefs).all():  # a checksum over bad data cannot be ours
                        raise _BadRecord(rnd, off, f"{w} is corrupt: non-finite coefficient")
                    self._chain.append(c)
                    self._offsets.append(off)
                    self._counts.append(n)
                    off += want
                self._end = off
            except _BadRecord as bad:
                if not self._resume:
                    raise HistoryError(str(bad)) from None
                self.bad_tail = (bad.rnd, bad.off, str(bad))
                self._end = bad.off
                log.warning("%s; resuming drops it if the checkpoint does not need it", bad)

    # ------------------------------------------------------------------------------ state
    @property
    def rounds(self) -> int:
        return len(self._counts)

    @property
    def pairs(self) -> int:
        return sum(self._counts)

    def pairs_in(self, start: int, stop: int) -> int:
        """Pairs of rounds start..stop (inclusive)."""
        start, stop = self._span(start, stop)
        return sum(self._counts[start - 1:stop])

    def digest(self, rounds: Optional[int] = None) -> str:
        """The chained SHA-256 (hex) of the first ``rounds`` records (default: all of them)."""
        r = self.rounds if rounds is None else rounds
        if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)) or \
                not 0 <= int(r) <= self.rounds:
            raise HistoryError(f"rounds must be an int in [0, {self.rounds}], got {rounds!r}")
        return self._chain[int(r)].hex()

    def __len__(self) -> int:
        return self.rounds

    def __repr__(self) -> str:
        return (f"SeedHistory({self.path or 'in memory'}: {self.rounds} rounds, {self.pairs} pairs, "
                f"digest {self.digest()[:12]})")

    # ---------------------------------------------------------------------------- writing
    def append(self, rnd: int, seeds, coefs) -> str:
        """Add round ``rnd`` (= rounds + 1): seeds uint64 [n], coefs float32 [n] (finite).  In a file:
        one write, flushed and fsync'd before this returns.  Returns the new digest."""
        rnd = _check_round_no(rnd)
        if self.bad_tail is not None:
            raise HistoryError(f"append: {self.bad_tail[2]}; truncate to the checkpoint first")
        if rnd != self.rounds + 1:
            raise HistoryError(f"append: the history holds {self.rounds} rounds, so the next is "
                               f"{self.rounds + 1}, got round {rnd}")
        s, c = _pairs(seeds, coefs)
        if s.size >= _U32:
            raise HistoryError(f"a round holds at most 2^32 - 1 pairs, got {s.size}")
        body = _body(rnd, s, c)
        d = hashlib.sha256(self._chain[-1] + body).digest()
        if self.path is None:
            self._mem.append((s.copy(), c.copy()))
        else:
            self._write(body + d)
        self._offsets.append(self._end)
        self._end += len(body) + DIGEST_SIZE
        self._counts.append(int(s.size))
        self._chain.append(d)
        return d.hex()

    def _write(self, rec: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            size = os.fstat(fd).st_size
            if size != self._end:
                raise HistoryError(f"{self.path} changed on disk: {size} bytes, this history wrote "
                                   f"{self._end} (another writer?)")
            try:
                os.lseek(fd, self._end, os.SEEK_SET)
                view = memoryview(rec)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                try:  # leave no torn record behind: cut back to the last whole one
                    os.ftruncate(fd, self._end)
                    os.fsync(fd)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)

    def truncate(self, rounds: int, digest: str) -> None:
        """Resume: keep the first ``rounds`` records, which must chain to ``digest`` (the
        checkpoint's), and drop the rest (a crash between an append and the checkpoint).  The digest
        is checked before anything changes; the cut is one ftruncate, fsync'd."""
        if isinstance(rounds, (bool, np.bool_)) or not isinstance(rounds, (int, np.integer)) or \
                rounds < 0:
            raise HistoryError(f"rounds must be a non-negative int, got {rounds!r}")
        rounds = int(rounds)
        where = self.path or "the in-memory seed history"
        if rounds > self.rounds:
            if self.bad_tail is not None:
                raise HistoryError(f"the checkpoint needs {rounds} rounds, but {self.bad_tail[2]}")
            raise HistoryError(f"{where} holds {self.rounds} rounds, the checkpoint needs {rounds}")
        if self._chain[rounds].hex() != digest:
            raise HistoryError(f"{where} does not match the checkpoint: its digest after {rounds} "
                               f"rounds is {self._chain[rounds].hex()}, the checkpoint's is "
                               f"{digest!r}")
        if rounds == self.rounds and self.bad_tail is None:
            return
        end = self._offsets[rounds] if rounds < self.rounds else self.bad_tail[1]
        if self.path is not None:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.ftruncate(fd, end)
                os.fsync(fd)
            finally:
                os.close(fd)
        if self.bad_tail is not None:
            log.warning("%s: dropped the bad tail from round %d on (after the checkpoint's %d rounds)",
                        where, self.bad_tail[0] if rounds == self.rounds else rounds + 1, rounds)
            self.bad_tail = None
        else:
            log.info("%s: dropped rounds %d..%d (after the checkpoint)", where, rounds + 1, self.rounds)
        del self._chain[rounds + 1:], self._offsets[rounds:], self._counts[rounds:], self._mem[rounds:]
        self._end = end

    # ---------------------------------------------------------------------------- reading
    def _span(self, start, stop) -> Tuple[int, int]:
        ok = all(not isinstance(x, (bool, np.bool_)) and isinstance(x, (int, np.integer))
                 for x in (start, stop))
        if not ok or not (1 <= start <= self.rounds + 1 and start - 1 <= stop <= self.rounds):
            raise HistoryError(f"rounds {start!r}..{stop!r} are not a span of this history's "
                               f"{self.rounds} rounds (1-based, inclusive; start = stop + 1 is empty)")
        return int(start), int(stop)

    def _bodies(self, start: int, stop: int) -> Iterator[Tuple[int, bytes]]:
        """(round, record body) for rounds start..stop, each checked against the chain again."""
        start, stop = self._span(start, stop)
        if self.path is None:
            for r in range(start, stop + 1):
                yield r, _body(r, *self._mem[r - 1])
            return
        if start > stop:
            return
        with open(self.path, "rb") as f:
            f.seek(self._offsets[start - 1])
            for r in range(start, stop + 1):
                want = record_bytes(self._counts[r - 1])
                raw = f.read(want + DIGEST_SIZE)
                body = raw[:want]
                if len(raw) != want + DIGEST_SIZE or \
                        hashlib.sha256(self._chain[r - 1] + body).digest() != self._chain[r]:
                    raise HistoryError(f"{self._where(r, self._offsets[r - 1])} changed on disk "
                                       "since it was opened")
                yield r, body

    def read(self, start: int, stop: int) -> Iterator[Round]:
        """(round, seeds uint64, coefs float32) for rounds start..stop (1-based, inclusive), streamed
        from the file one record at a time (checked against the chain as read)."""
        for r, body in self._bodies(start, stop):
            s, c = _unpack_pairs(body, RECORD_HEADER_SIZE, (len(body) - RECORD_HEADER_SIZE) // 12)
            yield r, s, c

    def encode_rounds(self, start: int, stop: int) -> bytes:
        """The wire form of rounds start..stop (module docstring): 16 + 12 R + 12 P bytes."""
        start, stop = self._span(start, stop)
        parts = [_WIRE_HDR.pack(WIRE_MAGIC, VERSION, 0, start, stop - start + 1)]
        parts.extend(body for _, body in self._bodies(start, stop))
        return b"".join(parts)


def decode_rounds(data, *, max_pairs: int = MAX_PAIRS, expected_start: Optional[int] = None
                  ) -> List[Round]:
    """The rounds of a wire span, every field checked: HistoryWireError (a HistoryError and a
    ProtocolError) naming the problem for truncated or trailing bytes, a wrong magic, version or flags,
    counts that do not match the length, more than ``max_pairs`` pairs, non-finite coefficients or
    rounds that are not consecutive from the header's first round (``expected_start``: also the
    first round this receiver needs)."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise HistoryWireError(f"a history span must be bytes, got {type(data).__name__}")
    if len(data) < WIRE_HEADER_SIZE:
        raise HistoryWireError(f"history span truncated: {len(data)} bytes, the header alone is "
                               f"{WIRE_HEADER_SIZE}")
    magic, ver, flags, first, count = _WIRE_HDR.unpack_from(data)
    P.check_preamble("kseed history span", magic, WIRE_MAGIC, ver, VERSION, flags,
                     error=HistoryWireError)
    if first < 1:
        raise HistoryWireError("history span starts at round 0 (rounds are 1-based)")
    if first + count - 1 >= _U32:
        raise HistoryWireError(f"history span rounds {first}..{first + count - 1} pass 2^32 - 1")
    if expected_start is not None and first != expected_start:
        raise HistoryWireError(f"history span starts at round {first}, expected round "
                               f"{expected_start}")
    if count > (len(data) - WIRE_HEADER_SIZE) // RECORD_HEADER_SIZE:
        raise HistoryWireError(f"history span claims {count} rounds but has only "
                               f"{len(data) - WIRE_HEADER_SIZE} bytes after its header")
    out: List[Round] = []
    off, total = WIRE_HEADER_SIZE, 0
    for i in range(count):
        rnd = first + i
        if len(data) - off < RECORD_HEADER_SIZE:
            raise HistoryWireError(f"history span truncated in round {rnd} at byte {off}")
        magic, got, n = _REC_HDR.unpack_from(data, off)
        if magic != RECORD_MAGIC:
            raise HistoryWireError(f"history span round {rnd} at byte {off}: bad magic {magic!r}")
        if got != rnd:
            raise HistoryWireError(f"history span rounds are not consecutive: record {i} at byte "
                                   f"{off} is round {got}, expected {rnd}")
        total += n
        if total > max_pairs:
            raise HistoryWireError(f"history span holds more than max_pairs = {max_pairs} pairs")
        if len(data) - off < record_bytes(n):
            raise HistoryWireError(f"history span truncated in round {rnd}: its {n} pairs need "
                                   f"{record_bytes(n)} bytes from byte {off}, {len(data) - off} left")
        s, c = _unpack_pairs(data, off + RECORD_HEADER_SIZE, n)
        if not np.isfinite(c).all():
            bad = int(np.flatnonzero(~np.isfinite(c))[0])
            raise HistoryWireError(f"history span round {rnd}: coefficient {bad} is not finite "
                                   f"({c[bad]})")
        out.append((rnd, s, c))
        off += record_bytes(n)
    if off != len(data):
        raise HistoryWireError(f"history span has {len(data) - off} trailing bytes after its "
                               f"{count} rounds ({off} bytes expected)")
    return out


# ------------------------------------------------------------------------------ the rebuild
def checked_rounds(rounds: Iterable[Round]) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
    """``rounds`` (any iterable of (round, seeds, coefs)), one at a time, checked: consecutive round
    numbers, seeds uint64 and coefs finite float32 of one length (HistoryError naming the problem)."""
    prev = None
    for item in rounds:
        if not (isinstance(item, (tuple, list)) and len(item) == 3):
            raise HistoryError("each round must be a (round, seeds, coefs) triple")
        rnd, seeds, coefs = item
        rnd = _check_round_no(rnd)
        if prev is not None and rnd != prev + 1:
            raise HistoryError(f"rounds must be consecutive: round {rnd} after round {prev}")
        s, c = _pairs(seeds, coefs)
        yield rnd, s, c
        prev = rnd


def apply_history(ms, rounds: Iterable[Round], *, bases: Optional[Sequence[torch.Tensor]] = None,
                  progress: Union[bool, Callable[[int, int], None]] = False) -> int:
    """Apply rounds in order to ``ms`` (a kseed_kernels.ModelSeeds): model_r = model_{r-1} + round r's
    pairs, ONE fused multi-tensor apply per round (so each round is rounded once).  With ``bases``
    (w0, one tensor per parameter, never written) the first round is applied out of place from them
    (an empty iterable copies them): a rebuild.  Without, the rounds are added to the weights as they
    are: a catch-up.  Both give bitwise the same weights for the same rounds.

    ``rounds``: any iterable of (round, seeds, coefs) with consecutive round numbers (e.g.
    ``SeedHistory.read``, ``decode_rounds``); it is consumed one round at a time, so memory stays
    that of one round whatever the length.  ``progress``: True for a tqdm bar (rounds, with the pairs
    applied), or a callable(round, pairs applied so far) called after each round.  Returns the number
    of pairs applied."""
    bar = None
    if progress is True:
        from tqdm import tqdm
        total = len(rounds) if hasattr(rounds, "__len__") else None
        bar = tqdm(total=total, desc="rebuild", unit="round", dynamic_ncols=True)
    elif progress is not False and progress is not None and not callable(progress):
        raise TypeError(f"progress must be a bool or a callable, got {type(progress).__name__}")
    done, prev = 0, None
    try:
        for rnd, s, c in checked_rounds(rounds):
            ts, tc = torch.tensor(s.view(np.int64)), torch.tensor(c)
            if prev is None and bases is not None:
                ms.apply_from(bases, ts, tc)
            elif s.size:
                ms.apply(ts, tc)
            prev = rnd
            done += int(s.size)
            if bar is not None:
                bar.set_postfix(round=rnd, pairs=done)
                bar.update(1)
            elif callable(progress):
                progress(rnd, done)
        if prev is None and bases is not None:
            ms.apply_from(bases, np.zeros(0, np.uint64), np.zeros(0, np.float32))
    finally:
        if bar is not None:
            bar.close()
    return done


# ------------------------------------------------------------------------------ the cache
CACHE_FORMAT = "kseed-model-cache/1"
CACHE_WEIGHTS = "model.safetensors"
CACHE_SIDECAR = "model.json"
_HASH_CHUNK = 1 << 22


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_HASH_CHUNK)
            if not b:
                return h.hexdigest()
            h.update(b)


def _canonical(identity) -> str:
    return json.dumps(identity, sort_keys=True, separators=(",", ":"))


class ModelCache:
    """A client's model kept on disk between participations (the Flower SuperNode node-config key
    ``cache-dir``): ``<dir>/model.safetensors`` (the weights, kseed.weights' atomic writer) and
    ``<dir>/model.json`` (format, rounds, history digest, base identity, parameter names and the
    weights file's SHA-256, written atomically after the weights).  ``load`` checks the sidecar, the
    identity, the names and the file's hash before it writes anything into the model: a missing, stale
    or corrupt cache gives None (with a logged reason), never a bad model."""

    def __init__(self, dir: str):
        if not isinstance(dir, (str, os.PathLike)):
            raise TypeError(f"dir must be a path, got {type(dir).__name__}")
        self.dir = os.path.abspath(dir)
        self.weights = os.path.join(self.dir, CACHE_WEIGHTS)
        self.sidecar = os.path.join(self.dir, CACHE_SIDECAR)

    def save(self, ms, rounds: int, digest: str, identity: dict) -> None:
        """Write the model of ``ms`` after ``rounds`` rounds of the history with ``digest``."""
        if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 0:
            raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
        if not isinstance(digest, str) or len(digest) != 2 * DIGEST_SIZE:
            raise ValueError(f"digest must be {2 * DIGEST_SIZE} hex digits, got {digest!r}")
        ident = _canonical(identity)  # refuses what JSON cannot hold
        os.makedirs(self.dir, exist_ok=True)
        write_safetensors(self.weights, list(ms.names), list(ms.params), {"format": CACHE_FORMAT})
        doc = {"format": CACHE_FORMAT, "rounds": int(rounds), "digest": digest,
               "identity": json.loads(ident), "names": list(ms.names),
               "weights_sha256": _sha256_file(self.weights)}
        with atomic_file(self.sidecar) as f:
            f.write(json.dumps(doc, sort_keys=True, indent=1).encode())

    def _reject(self, why: str) -> None:
        log.warning("model cache %s not used: %s", self.dir, why)
        return None

    def load(self, ms, *, identity: dict) -> Optional[Tuple[int, str]]:
        """(rounds, digest) after copying the cached weights into ``ms``'s tensors, or None (logged)
        when there is no cache, it is for another base model or parameter list, or it is corrupt."""
        if not os.path.isfile(self.sidecar) or not os.path.isfile(self.weights):
            log.info("model cache %s: no cached model", self.dir)
            return None
        try:
            with open(self.sidecar, encoding="utf-8") as f:
                doc = json.load(f)
            ok = isinstance(doc, dict) and doc.get("format") == CACHE_FORMAT
            rounds, digest = (doc.get("rounds"), doc.get("digest")) if ok else (None, None)
            ok = ok and isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 0 \
                and isinstance(digest, str) and len(digest) == 2 * DIGEST_SIZE
        except (OSError, UnicodeDecodeError, ValueError):
            ok = False
        if not ok:
            return self._reject(f"{self.sidecar} is not a kseed model-cache record")
        if _canonical(doc.get("identity")) != _canonical(identity):
            return self._reject(f"it was built from another base model ({doc.get('identity')!r}, "
                                f"this client's is {identity!r})")
        if doc.get("names") != list(ms.names):
            return self._reject("it holds another list of parameters")
        try:
            if _sha256_file(self.weights) != doc.get("weights_sha256"):
                return self._reject(f"{self.weights} does not match its recorded SHA-256 "
                                    "(corrupt or half-written)")
            table = map_safetensors(self.weights)
        except (OSError, ModelError) as exc:
            return self._reject(str(exc))
        for name, p in zip(ms.names, ms.params):
            t = table.get(name)
            if t is None or t.dtype != p.dtype or t.shape != p.shape:
                got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                return self._reject(f"tensor {name!r} is {got}, the model's is {p.dtype} "
                                    f"{tuple(p.shape)}")
        with torch.no_grad():
            for name, p in zip(ms.names, ms.params):
                p.copy_(table[name])
        ms.discard_pending()
        return rounds, digest


__all__ = ["HistoryError", "HistoryWireError", "SeedHistory", "decode_rounds", "next_digest",
           "apply_history", "ModelCache", "wire_bytes", "record_bytes", "MAX_PAIRS"]
