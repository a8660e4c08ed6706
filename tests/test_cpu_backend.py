"""The compiled CPU backend (csrc/, torch.ops.kseed) against the pure-PyTorch reference, bitwise.

Every comparison is on fresh random inputs (the ``gen`` fixture) and checks the bit patterns, not values.
"""
import json
import os

import pytest
import torch

import kseed_kernels as kk
from kseed_kernels import torch_reference as R

from bitwise import bits

pytestmark = pytest.mark.skipif("cpu" not in kk.backends(), reason="kseed_kernels._C is not built")

DATA = os.path.join(os.path.dirname(__file__), "data")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def assert_same_bits(a, b, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    ba, bb = bits(a), bits(b)
    if not torch.equal(ba, bb):
        bad = (ba != bb).nonzero()
        raise AssertionError(f"{what}: {bad.shape[0]} of {a.numel()} elements differ, first at "
                             f"{bad[0].tolist()}: {a.flatten()[bad[0, 0]].item()!r} vs "
                             f"{b.flatten()[bad[0, 0]].item()!r}")


def rand_u64(gen, n):
    hi = torch.randint(0, 1 << 32, (n,), generator=gen, dtype=torch.int64)
    lo = torch.randint(0, 1 << 32, (n,), generator=gen, dtype=torch.int64)
    return [(int(h) << 32) | int(l) for h, l in zip(hi, lo)]


def rand_seeds(gen, k):
    """K uint64 seeds, always including values >= 2^63 when K > 1."""
    s = rand_u64(gen, k)
    if k > 1:
        s[0] |= 1 << 63
    return s


def rand_weights(gen, shape, dtype):
    return (torch.randn(shape, generator=gen) * 3).to(dtype)


# ------------------------------------------------------------------------------------- gaussian
GAUSS_CASES = [
    # (stream, offset, numel)
    (0, 0, 1),
    (1, 0, 4099),
    (2**31, 3, 1000),
    (2**32 - 1, 5, 17),
    (123, 2**32 - 6, 64),
    (2**31 + 7, 2**40 + 1, 333),
    (77, 2**62 - 9, 9),
    (5, 1021, 8192 + 3),
]


@pytest.mark.parametrize("stream,offset,numel", GAUSS_CASES)
def test_gaussian_matches_reference(gen, stream, offset, numel):
    for seed in rand_seeds(gen, 3) + [0, 2**64 - 1]:
        got = kk.gaussian(seed, numel, stream=stream, offset=offset, backend="cpu")
        want = R.gaussian(seed, numel, stream, offset)
        assert_same_bits(got, want, f"seed {seed} stream {stream} offset {offset}")


def test_gaussian_random_offsets(gen):
    for _ in range(20):
        seed = rand_u64(gen, 1)[0]
        stream = rand_u64(gen, 1)[0] >> 32
        offset = rand_u64(gen, 1)[0] >> 3
        n = int(torch.randint(1, 300, (1,), generator=gen))
        got = kk.gaussian(seed, n, stream=stream, offset=offset, backend="cpu")
        assert_same_bits(got, R.gaussian(seed, n, stream, offset), f"{seed} {stream} {offset}")


def test_gaussian_empty():
    assert kk.gaussian(1, 0, backend="cpu").shape == (0,)


def test_spec_vectors():
    with open(os.path.join(DATA, "spec_vectors.json")) as fh:
        vectors = json.load(fh)["vectors"]
    for v in vectors:
        z = kk.gaussian(int(v["seed"]), len(v["bits"]), stream=v["stream"], offset=v["offset"],
                        backend="cpu")
        got = ["%08x" % (b & 0xFFFFFFFF) for b in z.view(torch.int32).tolist()]
        assert got == v["bits"], (v["seed"], v["stream"], v["offset"])


def test_spec_vectors_text_form_matches_json():
    """tests/data/spec_vectors.txt (read by the C++ test) is the JSON's exact text form."""
    with open(os.path.join(DATA, "spec_vectors.json")) as fh:
        vectors = json.load(fh)["vectors"]
    rows = [line.split() for line in open(os.path.join(DATA, "spec_vectors.txt"))
            if line.strip() and not line.startswith("#")]
    assert len(rows) == len(vectors)
    for r, v in zip(rows, vectors):
        assert r == [v["seed"], str(v["stream"]), str(v["offset"])] + v["bits"]


# ---------------------------------------------------------------------------------- apply_seeds_
SHAPES = [(0,), (1,), (3,), (4,), (5,), (7,), (13,), (1001,), (4, 5, 3), (2, 4099)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("k", [0, 1, 2, 17])
def test_apply_seeds_matches_reference(gen, dtype, rounding, k):
    for shape in SHAPES:
        w = rand_weights(gen, shape, dtype)
        seeds = rand_seeds(gen, k)
        coefs = (torch.randn(k, generator=gen) * 0.1).tolist()
        stream = rand_u64(gen, 1)[0] >> 32
        got, want = w.clone(), w.clone()
        kk.apply_seeds_(got, seeds, coefs, stream=stream, backend="cpu", rounding=rounding)
        kk.apply_seeds_(want, seeds, coefs, stream=stream, backend="reference", rounding=rounding)
        assert_same_bits(got, want, f"{dtype} {rounding} K={k} shape {shape}")
        if k == 0:
            assert_same_bits(got, w, "K = 0 must leave the tensor as it is")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_apply_seeds_many_seeds(gen, dtype, rounding):
    k = 1024
    for shape in [(5,), (3, 7)]:
        w = rand_weights(gen, shape, dtype)
        seeds = rand_seeds(gen, k)
        coefs = torch.randn(k, generator=gen) * 0.01
        got, want = w.clone(), w.clone()
        kk.apply_seeds_(got, seeds, coefs, stream=2**31 + 1, backend="cpu", rounding=rounding)
        kk.apply_seeds_(want, seeds, coefs, stream=2**31 + 1, backend="reference", rounding=rounding)
        assert_same_bits(got, want, f"{dtype} {rounding} K={k} shape {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_seeds_non_contiguous(gen, dtype):
    base = rand_weights(gen, (9, 14), dtype)
    seeds, coefs = rand_seeds(gen, 3), [0.5, -1.25, 2.0]
    got, want = base.clone().t(), base.clone().t()
    kk.apply_seeds_(got, seeds, coefs, stream=3, backend="cpu", rounding="stochastic")
    kk.apply_seeds_(want, seeds, coefs, stream=3, backend="reference", rounding="stochastic")
    assert_same_bits(got, want, "transposed")


def test_apply_seeds_special_values(gen):
    """Large / tiny / signed-zero weights and coefficients round the same way as the reference."""
    vals = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 6e-8, 3e38, -3e38, 65500.0, -65500.0, 1.0, 1e-5,
                         2.0**-24, 2.0**-14, 0.3])
    for dtype in DTYPES:
        for rounding in ("nearest", "stochastic"):
            w = vals.to(dtype)
            seeds = rand_seeds(gen, 2)
            for coefs in ([0.0, 0.0], [1e-3, -2e-3], [1e30, 1e30]):
                got, want = w.clone(), w.clone()
                kk.apply_seeds_(got, seeds, coefs, stream=1, backend="cpu", rounding=rounding)
                kk.apply_seeds_(want, seeds, coefs, stream=1, backend="reference", rounding=rounding)
                assert_same_bits(got, want, f"{dtype} {rounding} {coefs}")


def test_apply_seeds_multi_matches_reference(gen):
    shapes = [(3,), (256,), (17, 5), (0,), (1,), (4099,), (2, 3, 4)]
    for rounding in ("nearest", "stochastic"):
        for k in (1, 2, 9):
            ts = [rand_weights(gen, s, DTYPES[i % 3]) for i, s in enumerate(shapes)]
            streams = [rand_u64(gen, 1)[0] >> 32 for _ in shapes]
            seeds = rand_seeds(gen, k)
            coefs = torch.randn(k, generator=gen) * 0.05
            got = [t.clone() for t in ts]
            want = [t.clone() for t in ts]
            kk.apply_seeds_multi_(got, streams, seeds, coefs, backend="cpu", rounding=rounding)
            kk.apply_seeds_multi_(want, streams, seeds, coefs, backend="reference", rounding=rounding)
            for i, (a, b) in enumerate(zip(got, want)):
                assert_same_bits(a, b, f"tensor {i} {rounding} K={k}")


def test_multi_equals_single(gen):
    ts = [rand_weights(gen, (1000 + i,), torch.bfloat16) for i in range(5)]
    streams = [kk.stream_id(f"layer{i}") for i in range(5)]
    seeds, coefs = rand_seeds(gen, 4), [0.1, -0.2, 0.3, 0.05]
    one = [t.clone() for t in ts]
    kk.apply_seeds_multi_(one, streams, seeds, coefs, backend="cpu", rounding="stochastic")
    for t, st, o in zip(ts, streams, one):
        kk.apply_seeds_(t, seeds, coefs, stream=st, backend="cpu", rounding="stochastic")
        assert_same_bits(t, o, "multi vs single")


# ----------------------------------------------------------------------- threads and tile sizes
def _run_all(ws, streams, seeds, coefs):
    out = [w.clone() for w in ws]
    kk.apply_seeds_multi_(out, streams, seeds, coefs, backend="cpu", rounding="stochastic")
    g = kk.gaussian(seeds[0], 30011, stream=9, offset=7, backend="cpu")
    return out, g


def test_threads_and_tiles_do_not_change_results(gen):
    ws = [rand_weights(gen, (n,), d) for n, d in
          [(50021, torch.float32), (30000, torch.bfloat16), (12345, torch.float16), (7, torch.float32)]]
    streams = [1, 2, 2**32 - 1, 0]
    seeds, coefs = rand_seeds(gen, 3), [0.3, -0.7, 1.1]
    threads, tile = torch.get_num_threads(), torch.ops.kseed.cpu_tile_elems()
    try:
        torch.set_num_threads(1)
        base, gbase = _run_all(ws, streams, seeds, coefs)
        for n_threads, t in [(2, tile), (1, 67), (2, 1000), (2, 1), (3, 4093)]:
            torch.set_num_threads(n_threads)
            torch.ops.kseed.set_cpu_tile_elems(t)
            out, g = _run_all(ws, streams, seeds, coefs)
            for a, b in zip(out, base):
                assert_same_bits(a, b, f"threads {n_threads} tile {t}")
            assert_same_bits(g, gbase, f"gaussian threads {n_threads} tile {t}")
    finally:
        torch.set_num_threads(threads)
        torch.ops.kseed.set_cpu_tile_elems(tile)
    # and the single-threaded result is the reference's
    for w, st, b in zip(ws, streams, base):
        want = w.clone()
        kk.apply_seeds_(want, seeds, coefs, stream=st, backend="reference", rounding="stochastic")
        assert_same_bits(b, want, "vs reference")


# ---------------------------------------------------------------------------------- validation
def _seeds(k=2):
    return torch.arange(k, dtype=torch.int64)


def _coefs(k=2):
    return torch.ones(k, dtype=torch.float32)


BAD_CALLS = [
    ("int tensor", lambda: torch.ops.kseed.apply_seeds_(torch.zeros(4, dtype=torch.int32), _seeds(),
                                                        _coefs(), 0, 0, 0)),
    ("float64 tensor", lambda: torch.ops.kseed.apply_seeds_(torch.zeros(4, dtype=torch.float64),
                                                            _seeds(), _coefs(), 0, 0, 0)),
    ("non-contiguous", lambda: torch.ops.kseed.apply_seeds_(torch.zeros(4, 4).t(), _seeds(), _coefs(),
                                                            0, 0, 0)),
    ("float seeds", lambda: torch.ops.kseed.apply_seeds_(torch.zeros(4), torch.zeros(2), _coefs(), 0,
                                                         0, 0)),
    ("2-d seeds", lambda: torch.ops.kseed.apply_seeds_(torch.zeros(4), _seeds().view(1, 2),
                                                       _coefs().view(1, 2), 0, 0, 0)),
    ("float64 coefs", lambda: torch.ops.kseed.apply_seeds_(torch.zeros(4), _seeds(),
                                                           _coefs().double(), 0, 0, 0)),
    ("length mismatch", lambda: torch.ops.kseed.apply_seeds_(torch.zeros(4), _seeds(3), _coefs(2), 0,
                                                             0, 0)),
    ("nan coef", lambda: torch.ops.kseed.apply_seeds_(torch.zeros(4), _seeds(1),
                                                      torch.tensor([float("nan")]), 0, 0, 0)),
    ("inf coef", lambda: torch.ops.kseed.apply_seeds_(torch.zeros(4), _seeds(1),
                                                      torch.tensor([float("inf")]), 0, 0, 0)),
    ("negative stream", lambda: torch.ops.kseed.apply_seeds_(torch.zeros(4), _seeds(), _coefs(), -1,
                                                             0, 0)),
    ("stream 2^32", lambda: torch.ops.kseed.apply_seeds_(torch.zeros(4), _seeds(), _coefs(), 2**32,
                                                         0, 0)),
    ("rounding 2", lambda: torch.ops.kseed.apply_seeds_(torch.zeros(4), _seeds(), _coefs(), 0, 2, 0)),
    ("gaussian 2-d", lambda: torch.ops.kseed.gaussian_(torch.zeros(2, 2), 0, 0, 0)),
    ("gaussian fp16", lambda: torch.ops.kseed.gaussian_(torch.zeros(4, dtype=torch.float16), 0, 0, 0)),
    ("gaussian offset < 0", lambda: torch.ops.kseed.gaussian_(torch.zeros(4), 0, 0, -1)),
    ("gaussian offset 2^62", lambda: torch.ops.kseed.gaussian_(torch.zeros(4), 0, 0, 2**62 - 2)),
    ("gaussian strided", lambda: torch.ops.kseed.gaussian_(torch.zeros(8)[::2], 0, 0, 0)),
    ("philox float", lambda: torch.ops.kseed.philox4x32_10(torch.zeros(1, 4), torch.zeros(1, 2))),
    ("philox shape", lambda: torch.ops.kseed.philox4x32_10(torch.zeros(1, 3, dtype=torch.int64),
                                                           torch.zeros(1, 2, dtype=torch.int64))),
    ("philox lead", lambda: torch.ops.kseed.philox4x32_10(torch.zeros(2, 4, dtype=torch.int64),
                                                          torch.zeros(3, 2, dtype=torch.int64))),
    ("philox range", lambda: torch.ops.kseed.philox4x32_10(torch.full((1, 4), 2**32),
                                                           torch.zeros(1, 2, dtype=torch.int64))),
    ("philox negative", lambda: torch.ops.kseed.philox4x32_10(torch.zeros(1, 4, dtype=torch.int64),
                                                              torch.full((1, 2), -1))),
    ("multi lengths", lambda: torch.ops.kseed.apply_seeds_multi_([torch.zeros(4)], [0, 1], _seeds(),
                                                                 _coefs(), 0, 0)),
    ("multi duplicate", lambda: (lambda t: torch.ops.kseed.apply_seeds_multi_(
        [t, t], [0, 1], _seeds(), _coefs(), 0, 0))(torch.zeros(4))),
    ("multi bad dtype", lambda: torch.ops.kseed.apply_seeds_multi_(
        [torch.zeros(4), torch.zeros(4, dtype=torch.int64)], [0, 1], _seeds(), _coefs(), 0, 0)),
    ("multi bad stream", lambda: torch.ops.kseed.apply_seeds_multi_([torch.zeros(4)], [2**32],
                                                                    _seeds(), _coefs(), 0, 0)),
]


@pytest.mark.parametrize("name,call", BAD_CALLS, ids=[n for n, _ in BAD_CALLS])
def test_direct_op_calls_raise(name, call):
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        call()


def test_bad_call_leaves_tensor_untouched():
    w = torch.ones(8)
    with pytest.raises(ValueError):
        torch.ops.kseed.apply_seeds_(w, _seeds(2), torch.tensor([1.0, float("nan")]), 0, 0, 0)
    assert torch.equal(w, torch.ones(8))


def test_direct_op_k0_and_empty_are_noops():
    w = torch.randn(5)
    before = w.clone()
    torch.ops.kseed.apply_seeds_(w, _seeds(0), _coefs(0), 0, 1, 0)
    torch.ops.kseed.apply_seeds_(torch.zeros(0), _seeds(), _coefs(), 0, 0, 0)
    torch.ops.kseed.apply_seeds_multi_([], [], _seeds(), _coefs(), 0, 0)
    assert torch.equal(w, before)


def test_philox_op_matches_reference(gen):
    c = torch.randint(0, 2**32, (100, 4), generator=gen, dtype=torch.int64)
    k = torch.randint(0, 2**32, (100, 2), generator=gen, dtype=torch.int64)
    assert torch.equal(torch.ops.kseed.philox4x32_10(c, k), R.philox4x32_10(c, k))
    kat = torch.tensor([[0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]])
    out = kk.philox4x32_10(kat, torch.tensor([[0xA4093822, 0x299F31D0]]))
    assert out.tolist() == [[0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]]
