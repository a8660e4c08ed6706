"""kseed.history: the seed-history file (round trip, validation on open, torn and flipped records, resume
by truncation, the digest chain), its wire form against hostile bytes, the rebuild and catch-up
(bitwise against each other, against the reference backend and against a per-round plain-torch
computation), and a client's on-disk model cache."""
import logging
import os
import struct

import numpy as np
import pytest
import torch

import kseed_kernels as kk
from bitwise import same_bits
from kseed import history as H
from kseed.history import (HistoryError, HistoryWireError, ModelCache, SeedHistory, apply_history,
                           decode_rounds, next_digest)
from kseed.protocol import ProtocolError
from kseed.weights import map_safetensors

EMBEDDED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python", "kseed",
                        "data", "embedded", "model.safetensors")


def _rng(gen):
    return np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))


def random_rounds(rng, counts, scale=1e-2):
    """[(round, seeds uint64, coefs float32)], rounds 1.., of the given pair counts (fresh values; the
    extreme seeds 0 and 2^64 - 1 in the first round with two or more pairs)."""
    out = []
    for r, n in enumerate(counts, 1):
        s = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
        if n >= 2 and not any(len(x[1]) >= 2 for x in out):
            s[0], s[1] = 0, 2**64 - 1
        c = (rng.standard_normal(n) * scale).astype(np.float32)
        out.append((r, s, c))
    return out


def filled(path, rounds):
    h = SeedHistory(path)
    for r, s, c in rounds:
        h.append(r, s, c)
    return h


def same_rounds(got, want):
    got, want = list(got), list(want)
    assert len(got) == len(want)
    for (r1, s1, c1), (r2, s2, c2) in zip(got, want):
        assert r1 == r2 and s1.dtype == np.uint64 and c1.dtype == np.float32
        assert np.array_equal(s1, s2) and np.array_equal(c1.view(np.int32), c2.view(np.int32))


# ---------------------------------------------------------------------------------- the file
def test_round_trip_file_and_memory(tmp_path, gen):
    rounds = random_rounds(_rng(gen), [5, 0, 17, 1, 64])
    path = str(tmp_path / "history.bin")
    hf, hm = filled(path, rounds), filled(None, rounds)
    for h in (hf, hm):
        assert (h.rounds, h.pairs) == (5, 87)
        same_rounds(h.read(1, 5), rounds)
        same_rounds(h.read(2, 4), rounds[1:4])
        same_rounds(h.read(3, 2), [])  # start = stop + 1: empty
    assert [hf.digest(r) for r in range(6)] == [hm.digest(r) for r in range(6)]
    assert len(set(hf.digest(r) for r in range(6))) == 6
    assert os.path.getsize(path) == 8 + sum(12 + 12 * len(s) + 32 for _, s, _ in rounds)
    again = SeedHistory(path)  # reopening validates and restores the chain
    assert (again.rounds, again.pairs, again.digest()) == (5, 87, hf.digest())
    same_rounds(again.read(1, 5), rounds)
    r6 = random_rounds(_rng(gen), [1] * 6)[5]
    again.append(*r6)  # and appends after what it found
    assert SeedHistory(path).digest() == filled(None, rounds + [r6]).digest()


def test_append_checks(tmp_path, gen):
    path = str(tmp_path / "h.bin")
    h = filled(path, random_rounds(_rng(gen), [3, 4]))
    size, d = os.path.getsize(path), h.digest()
    s, c = np.arange(3, dtype=np.uint64), np.ones(3, np.float32)
    bad = [((2, s, c), "next is 3"), ((4, s, c), "next is 3"), ((0, s, c), "round"),
           ((True, s, c), "round"), ((3, s, c[:2]), "same length"),
           ((3, s, np.array([1, np.nan, 2], np.float32)), "not finite"),
           ((3, s, np.array([1, 1e39, 2])), "not finite after rounding"),
           ((3, np.array([1, -2, 3]), c), "negative"), ((3, s.astype(float), c), "integers"),
           ((3, s.reshape(1, 3), c), "1-d")]
    for args, msg in bad:
        with pytest.raises(HistoryError, match=msg):
            h.append(*args)
    assert (os.path.getsize(path), h.digest(), h.rounds) == (size, d, 2)
    # seeds as an int64 tensor of non-negative values and coefs as float64 are accepted, as their values
    h.append(3, torch.tensor([5, 6], dtype=torch.int64), np.array([0.5, -0.25]))
    r, s3, c3 = next(h.read(3, 3))
    assert s3.tolist() == [5, 6] and c3.tolist() == [0.5, -0.25]


def test_torn_last_record_is_named(tmp_path, gen):
    rounds = random_rounds(_rng(gen), [4, 6, 5])
    path = str(tmp_path / "history.bin")
    filled(path, rounds)
    raw = open(path, "rb").read()
    off3 = 8 + (12 + 48 + 32) + (12 + 72 + 32)
    assert off3 + 12 + 60 + 32 == len(raw)
    for cut in (1, 3, 32, 33, 60, len(raw) - off3 - 12, len(raw) - off3 - 1):
        with open(path, "wb") as f:
            f.write(raw[:len(raw) - cut])
        with pytest.raises(HistoryError) as e:
            SeedHistory(path)
        msg = str(e.value)
        assert path in msg and "round 3" in msg and f"byte offset {off3}" in msg and "torn" in msg, msg
    with open(path, "wb") as f:  # cut exactly at a record boundary: two whole rounds, nothing torn
        f.write(raw[:off3])
    assert SeedHistory(path).rounds == 2



def test_resume_drops_a_bad_tail_the_checkpoint_does_not_need(tmp_path, gen):
    """A kill in the middle of an append leaves a torn last record: under resume=True the scan stops
    there, the history refuses to grow, and truncate() to a checkpoint before that round cuts it off
    (and keeps the checkpoint's rounds); a checkpoint that needs the torn round gets its error."""
    rounds = random_rounds(_rng(gen), [4, 6, 5])
    path = str(tmp_path / "history.bin")
    h = filled(path, rounds)
    d2, d3 = h.digest(2), h.digest(3)
    raw = open(path, "rb").read()
    off3 = 8 + (12 + 48 + 32) + (12 + 72 + 32)
    for cut, flip in ((7, None), (40, None), (0, off3 + 20)):  # torn twice, then a flipped byte
        data = bytearray(raw[:len(raw) - cut])
        if flip is not None:
            data[flip] ^= 0x10
        with open(path, "wb") as f:
            f.write(bytes(data))
        with pytest.raises(HistoryError, match=r"round 3 \(record at byte offset"):
            SeedHistory(path)  # not a resume: refused at once
        r = SeedHistory(path, resume=True)
        assert r.rounds == 2 and r.bad_tail[:2] == (3, off3)
        with pytest.raises(HistoryError, match="truncate to the checkpoint first"):
            r.append(*rounds[2])
        with pytest.raises(HistoryError, match=r"the checkpoint needs 3 rounds, but .*round 3"):
            r.truncate(3, d3)
        assert os.path.getsize(path) == len(data)  # nothing changed by the refusals
        r.truncate(2, d2)
        assert r.bad_tail is None and os.path.getsize(path) == off3
        r.append(*rounds[2])
        assert r.digest() == d3 and open(path, "rb").read() == raw
    r = SeedHistory(path, resume=True)  # a whole file: nothing to drop
    assert r.bad_tail is None and r.rounds == 3

def test_flipped_byte_is_named(tmp_path, gen):
    rounds = random_rounds(_rng(gen), [4, 6, 5])
    path = str(tmp_path / "history.bin")
    filled(path, rounds)
    raw = open(path, "rb").read()
    off2 = 8 + 12 + 48 + 32
    size2 = 12 + 72 + 32
    for i in list(range(0, 12)) + [12, 12 + 47, 12 + 48, 12 + 48 + 23, size2 - 32, size2 - 1]:
        bad = bytearray(raw)
        bad[off2 + i] ^= 1 << (i % 8)
        with open(path, "wb") as f:
            f.write(bad)
        with pytest.raises(HistoryError) as e:
            SeedHistory(path)
        msg = str(e.value)
        assert path in msg and "round 2" in msg and f"byte offset {off2}" in msg, (i, msg)
    for i, what in ((0, "not a seed history"), (4, "version"), (6, "flags")):
        bad = bytearray(raw)
        bad[i] ^= 2
        with open(path, "wb") as f:
            f.write(bad)
        with pytest.raises(HistoryError, match=what):
            SeedHistory(path)
    with open(path, "wb") as f:
        f.write(raw[:5])
    with pytest.raises(HistoryError, match="header torn"):
        SeedHistory(path)


def test_changes_after_open_are_caught_when_read(tmp_path, gen):
    path = str(tmp_path / "h.bin")
    h = filled(path, random_rounds(_rng(gen), [3, 3]))
    with open(path, "r+b") as f:
        f.seek(8 + 12 + 36 + 32 + 20)
        f.write(b"\xff")
    with pytest.raises(HistoryError, match="round 2.*changed on disk"):
        list(h.read(1, 2))
    os.truncate(path, 50)
    with pytest.raises(HistoryError, match="changed on disk"):
        h.append(3, [1], [1.0])
    assert os.path.getsize(path) == 50 and h.rounds == 2


def test_failed_append_leaves_no_torn_record(tmp_path, gen, monkeypatch):
    rounds = random_rounds(_rng(gen), [3, 5, 4])
    path = str(tmp_path / "h.bin")
    h = filled(path, rounds[:1])
    size, d = os.path.getsize(path), h.digest()
    real_write = os.write

    def half_then_fail(fd, data):  # the disk fills up in the middle of the record
        real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(H.os, "write", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        h.append(*rounds[1])
    monkeypatch.setattr(H.os, "write", real_write)
    assert (os.path.getsize(path), h.rounds, h.digest()) == (size, 1, d)
    h.append(*rounds[1])
    h.append(*rounds[2])
    same_rounds(SeedHistory(path).read(1, 3), rounds)


def test_digest_chain(gen):
    rounds = random_rounds(_rng(gen), [3, 0, 7])
    h = filled(None, rounds)
    assert h.digest(0) == H.GENESIS.hex() == filled(None, []).digest()
    for r, s, c in rounds:
        assert h.digest(r) == next_digest(h.digest(r - 1), r, s, c)
    assert h.digest() == h.digest(3)
    c = rounds[2][2].copy()
    c[4] = np.nextafter(c[4], np.float32(1))  # one ulp in one coefficient changes the digest
    assert next_digest(h.digest(2), 3, rounds[2][1], c) != h.digest(3)
    s = rounds[2][1].copy()
    s[0] ^= np.uint64(1 << 63)
    assert next_digest(h.digest(2), 3, s, rounds[2][2]) != h.digest(3)
    assert next_digest(h.digest(2), 4, *rounds[2][1:]) != h.digest(3)  # the round number counts
    for bad in (-1, 4, True, 1.0):
        with pytest.raises(HistoryError, match="rounds must be"):
            h.digest(bad)
    with pytest.raises(HistoryError, match="hex digits"):
        next_digest("abc", 1, [1], [1.0])


@pytest.mark.parametrize("in_file", [True, False])
def test_truncate_for_resume(tmp_path, gen, in_file):
    rng = _rng(gen)
    rounds = random_rounds(rng, [4, 2, 9, 3, 5])
    path = str(tmp_path / "h.bin") if in_file else None
    h = filled(path, rounds)
    d3 = h.digest(3)
    size = os.path.getsize(path) if in_file else None
    for args, msg in (((3, h.digest(2)), "does not match the checkpoint"),
                      ((6, h.digest()), "holds 5 rounds, the checkpoint needs 6"),
                      ((-1, d3), "non-negative")):
        with pytest.raises(HistoryError, match=msg):
            h.truncate(*args)
        assert h.rounds == 5 and (not in_file or os.path.getsize(path) == size)
    h.truncate(5, h.digest())  # nothing to drop
    h.truncate(3, d3)
    assert (h.rounds, h.pairs, h.digest()) == (3, 15, d3)
    same_rounds(h.read(1, 3), rounds[:3])
    if in_file:
        assert os.path.getsize(path) == 8 + sum(12 + 12 * n + 32 for n in (4, 2, 9))
        assert SeedHistory(path).digest() == d3
    new4 = random_rounds(rng, [1, 1, 1, 6])[3]  # the re-run round 4 (fresh values)
    h.append(*new4)
    same_rounds(h.read(1, 4), rounds[:3] + [new4])
    if in_file:
        same_rounds(SeedHistory(path).read(1, 4), rounds[:3] + [new4])
    h.truncate(0, H.GENESIS.hex())
    assert h.rounds == 0 and (not in_file or os.path.getsize(path) == 8)


def test_read_span_checks():
    h = filled(None, random_rounds(np.random.default_rng(0), [1, 2]))
    for a, b in ((0, 1), (1, 3), (3, 1), (2, 0), (1.0, 2)):
        with pytest.raises(HistoryError, match="not a span"):
            list(h.read(a, b))


# ----------------------------------------------------------------------------- wire form
def test_encode_decode_round_trip(tmp_path, gen):
    rounds = random_rounds(_rng(gen), [3, 0, 11, 2])
    for h in (filled(str(tmp_path / "h.bin"), rounds), filled(None, rounds)):
        for a, b in ((1, 4), (2, 3), (4, 4), (5, 4)):
            data = h.encode_rounds(a, b)
            assert len(data) == 16 + 12 * (b - a + 1) + 12 * h.pairs_in(a, b)
            assert len(data) == H.wire_bytes([len(s) for _, s, _ in rounds[a - 1:b]])
            same_rounds(decode_rounds(data), rounds[a - 1:b])
            same_rounds(decode_rounds(bytearray(data), expected_start=a), rounds[a - 1:b])
    # the documented size of the paper's Dolly setting
    assert H.wire_bytes([2000] * 40) == 960_496 and H.wire_bytes([2000]) == 24_028


def _wire(first, recs, count=None, magic=H.WIRE_MAGIC, ver=1, flags=0):
    out = struct.pack("<4sHHII", magic, ver, flags, first, len(recs) if count is None else count)
    for r, s, c in recs:
        out += struct.pack("<4sII", H.RECORD_MAGIC, r, len(s)) + np.asarray(s, "<u8").tobytes() + \
            np.asarray(c, "<f4").tobytes()
    return out


def test_decode_rejects_hostile_bytes(gen):
    rounds = random_rounds(_rng(gen), [2, 3])
    good = filled(None, rounds).encode_rounds(1, 2)
    assert good == _wire(1, rounds)
    for n in range(len(good)):  # every truncation
        with pytest.raises(HistoryWireError) as e:
            decode_rounds(good[:n])
        assert isinstance(e.value, ProtocolError) and isinstance(e.value, HistoryError)
    with pytest.raises(HistoryWireError, match="trailing"):
        decode_rounds(good + b"\0")
    s, c = rounds[1][1], rounds[1][2]
    cases = [
        (_wire(1, rounds, magic=b"KSD1"), "magic"),
        (_wire(1, rounds, ver=2), "version"),
        (_wire(1, rounds, flags=1), "flags"),
        (_wire(0, [(0, s, c)]), "round 0"),
        (_wire(1, rounds, count=3), "claims 3 rounds|truncated"),
        (_wire(1, rounds, count=1), "trailing"),
        (_wire(1, rounds, count=0xFFFFFFFF), "pass 2\\^32|claims"),
        (_wire(1, [(1, s, c), (3, s, c)]), "not consecutive"),
        (_wire(2, [(1, s, c)]), "not consecutive"),
        (_wire(1, [(1, s, np.array([1, np.nan, 2], np.float32))]), "coefficient 1 is not finite"),
        (_wire(1, [(1, s, np.array([1, 2, -np.inf], np.float32))]), "coefficient 2 is not finite"),
        (_wire(5, rounds[:1]), "not consecutive"),
    ]
    bad_n = bytearray(good)  # a record's pair count that does not match the bytes
    struct.pack_into("<I", bad_n, 16 + 8, 3)
    cases.append((bytes(bad_n), "truncated|bad magic|not consecutive|not finite"))
    bad_n2 = bytearray(good)
    struct.pack_into("<I", bad_n2, 16 + 8, 1)
    cases.append((bytes(bad_n2), "bad magic|trailing|not finite"))
    huge = bytearray(good)
    struct.pack_into("<I", huge, 16 + 8, 0xFFFFFFFF)
    cases.append((bytes(huge), "truncated|max_pairs"))
    bad_rec = bytearray(good)
    bad_rec[16] ^= 1
    cases.append((bytes(bad_rec), "bad magic"))
    for data, msg in cases:
        with pytest.raises(HistoryWireError, match=msg):
            decode_rounds(data)
    with pytest.raises(HistoryWireError, match="max_pairs = 4"):
        decode_rounds(good, max_pairs=4)
    assert len(decode_rounds(good, max_pairs=5)) == 2
    with pytest.raises(HistoryWireError, match="expected round 2"):
        decode_rounds(good, expected_start=2)
    with pytest.raises(HistoryWireError, match="must be bytes"):
        decode_rounds("KSHW")


# ------------------------------------------------------------------------------- rebuilding
def _small_model(gen, dtype):
    shapes = [("embed.weight", (37, 8)), ("layers.0.w", (13, 11)), ("layers.0.norm", (11,)),
              ("head.weight", (5, 29)), ("empty", (0,))]
    return [(n, (torch.randn(s, generator=gen) * 0.05).to(dtype)) for n, s in shapes]


def _embedded_model(gen, dtype):
    return [(n, t.to(dtype).clone()) for n, t in sorted(map_safetensors(EMBEDDED).items())]


def _plain_torch(named, rounds, noise):
    """model_r = model_{r-1} + round r's pairs, computed per tensor: the float32 sum in ascending k of
    coef_k * noise(seed_k), added in float32, rounded to the dtype once per round (docs/SPEC.md 4)."""
    gen_noise = kk.gaussian if noise == "gaussian" else kk.rademacher
    out = []
    for name, w in named:
        w = w.clone()
        sid = kk.stream_id(name)
        for _, seeds, coefs in rounds:
            acc = torch.zeros(w.numel(), dtype=torch.float32)
            for s, c in zip(seeds.tolist(), coefs.tolist()):
                acc = acc + torch.tensor(c, dtype=torch.float32) * gen_noise(s, w.numel(), stream=sid,
                                                                              backend="reference")
            w = (w.float().reshape(-1) + acc).to(w.dtype).reshape(w.shape)
        out.append(w)
    return out


@pytest.mark.parametrize("model", ["small", "embedded"])
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_catch_up_is_bitwise_a_rebuild(gen, model, noise, dtype):
    rng = _rng(gen)
    w0 = (_small_model if model == "small" else _embedded_model)(gen, dtype)
    # coefficients big enough that bf16 rounding happens in every round (a bf16 ulp at 0.05 is 2.4e-4)
    rounds = random_rounds(rng, [7, 0, 12, 5, 9], scale=3e-3 if dtype == torch.float32 else 1e-1)
    hist = filled(None, rounds)
    names = [n for n, _ in w0]
    bases = [t for _, t in w0]

    def fresh(junk=False, backend=None):
        ts = [torch.randn(t.shape, generator=gen).to(dtype) if junk else t.clone() for t in bases]
        return ModelSeeds(list(zip(names, ts)), noise=noise, backend=backend)

    ModelSeeds = kk.ModelSeeds
    full = fresh(junk=True)  # a client with no model: w0 + the whole history, out of place
    assert apply_history(full, hist.read(1, 5), bases=bases) == 33
    kept = fresh()  # a client that took part in rounds 1 and 2, then missed 3 and 4, then catches up
    assert apply_history(kept, hist.read(1, 2)) == 7
    cached = [t.clone() for t in kept.params]
    assert apply_history(kept, decode_rounds(hist.encode_rounds(3, 5))) == 26
    staged = fresh(junk=True)  # the first round staged (copy + in place) instead of out of place
    staged.apply_from(bases, rounds[0][1], rounds[0][2], staged=True)
    apply_history(staged, hist.read(2, 5))
    ref = fresh(junk=True, backend="reference")  # the plain-torch backend
    apply_history(ref, hist.read(1, 5), bases=bases)
    for a, b, c, d in zip(full.params, kept.params, staged.params, ref.params):
        assert same_bits(a, b) and same_bits(a, c) and same_bits(a, d)
    changed = sum(int(not same_bits(a, b)) for a, b in zip(full.params, bases) if a.numel())
    assert changed == sum(1 for b in bases if b.numel())
    # an independent per-round computation (only where it is cheap: the small model)
    if model == "small":
        for a, want in zip(full.params, _plain_torch(w0, rounds, noise)):
            assert same_bits(a, want)
        if dtype == torch.bfloat16:  # rounding once per round matters: one apply of all pairs differs
            merged = fresh()
            merged.apply(np.concatenate([s for _, s, _ in rounds]),
                         np.concatenate([c for _, _, c in rounds]))
            assert any(not same_bits(a, m) for a, m in zip(full.params, merged.params))
    # the cache after round 2 plus rounds 3..5 again, on a third model: same bits
    again = fresh(junk=True)
    with torch.no_grad():
        for p, t in zip(again.params, cached):
            p.copy_(t)
    apply_history(again, hist.read(3, 5))
    assert all(same_bits(a, b) for a, b in zip(full.params, again.params))


def test_apply_history_edges(gen):
    named = _small_model(gen, torch.float32)
    bases = [t for _, t in named]
    ms = kk.ModelSeeds([(n, torch.randn(t.shape, generator=gen)) for n, t in named])
    assert apply_history(ms, [], bases=bases) == 0  # nothing to apply: w0 itself
    assert all(same_bits(p, b) for p, b in zip(ms.params, bases))
    before = [p.clone() for p in ms.params]
    assert apply_history(ms, iter([])) == 0
    assert all(same_bits(p, b) for p, b in zip(ms.params, before))
    rounds = random_rounds(_rng(gen), [2, 3, 4])
    seen = []
    assert apply_history(ms, iter(rounds), progress=lambda r, n: seen.append((r, n))) == 9
    assert seen == [(1, 2), (2, 5), (3, 9)]
    assert apply_history(ms, rounds, progress=True) == 9  # a tqdm bar
    with pytest.raises(HistoryError, match="consecutive: round 3 after round 1"):
        apply_history(ms, [rounds[0], rounds[2]])
    with pytest.raises(HistoryError, match="triple"):
        apply_history(ms, [(1, rounds[0][1])])
    with pytest.raises(HistoryError, match="not finite"):
        apply_history(ms, [(1, np.array([1], np.uint64), np.array([np.nan], np.float32))])
    with pytest.raises(TypeError, match="progress"):
        apply_history(ms, [], progress="yes")


# ------------------------------------------------------------------------------- the cache
def _cache_setup(tmp_path, gen, dtype=torch.float32):
    named = _small_model(gen, dtype)
    ms = kk.ModelSeeds([(n, t.clone()) for n, t in named])
    apply_history(ms, random_rounds(_rng(gen), [4]))
    cache = ModelCache(str(tmp_path / "cache"))
    ident = {"model": "abc123", "dtype": str(dtype), "noise": "gaussian"}
    cache.save(ms, 7, "ab" * 32, ident)
    other = kk.ModelSeeds([(n, torch.randn(t.shape, generator=gen).to(dtype)) for n, t in named])
    return ms, cache, ident, other


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_cache_round_trip(tmp_path, gen, dtype):
    ms, cache, ident, other = _cache_setup(tmp_path, gen, dtype)
    assert sorted(os.listdir(cache.dir)) == ["model.json", "model.safetensors"]  # no temp files
    assert cache.load(other, identity=dict(reversed(list(ident.items())))) == (7, "ab" * 32)
    assert all(same_bits(a, b) for a, b in zip(ms.params, other.params))
    assert ModelCache(str(tmp_path / "nothing")).load(other, identity=ident) is None


def _rejected(cache, other, ident, caplog, why):
    before = [p.clone() for p in other.params]
    with caplog.at_level(logging.INFO, logger="kseed.history"):
        caplog.clear()
        assert cache.load(other, identity=ident) is None
    assert all(same_bits(a, b) for a, b in zip(before, other.params))  # never touched
    assert why in caplog.text, caplog.text


def test_model_cache_rejects_bad_files(tmp_path, gen, caplog):
    ms, cache, ident, other = _cache_setup(tmp_path, gen)
    raw = open(cache.weights, "rb").read()
    side = open(cache.sidecar, "rb").read()
    _rejected(cache, other, dict(ident, model="other"), caplog, "another base model")
    for i in (len(raw) - 3, len(raw) // 2, 10):  # a flipped byte in the data and in the header
        bad = bytearray(raw)
        bad[i] ^= 0x10
        open(cache.weights, "wb").write(bad)
        _rejected(cache, other, ident, caplog, "does not match its recorded SHA-256")
    open(cache.weights, "wb").write(raw[:-4])  # torn
    _rejected(cache, other, ident, caplog, "does not match its recorded SHA-256")
    open(cache.weights, "wb").write(raw)
    for text in (b"{", b"[]", side.replace(b"kseed-model-cache/1", b"kseed-model-cache/9"),
                 side.replace(b'"rounds": 7', b'"rounds": -7')):
        open(cache.sidecar, "wb").write(text)
        _rejected(cache, other, ident, caplog, "not a kseed model-cache record")
    open(cache.sidecar, "wb").write(side)
    fewer = kk.ModelSeeds([(n, p.clone()) for n, p in zip(other.names[:-1], other.params[:-1])])
    _rejected(cache, fewer, ident, caplog, "another list of parameters")
    bf = kk.ModelSeeds([(n, p.to(torch.bfloat16)) for n, p in zip(other.names, other.params)])
    _rejected(cache, bf, ident, caplog, "the model's is torch.bfloat16")
    os.unlink(cache.sidecar)
    _rejected(cache, other, ident, caplog, "no cached model")
    assert cache.load(ms, identity=ident) is None
    cache.save(ms, 7, "cd" * 32, ident)  # a save over a bad cache replaces it
    assert cache.load(other, identity=ident) == (7, "cd" * 32)
    with pytest.raises(ValueError, match="digest"):
        cache.save(ms, 1, "xyz", ident)
    with pytest.raises(ValueError, match="rounds"):
        cache.save(ms, -1, "ab" * 32, ident)
