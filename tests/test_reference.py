"""The reference backend against independent computations, and every CPU backend against the spec vectors."""
import json
import os

import numpy as np
import pytest
import torch

import kseed_kernels
from kseed_kernels import _spec as S
from kseed_kernels import torch_reference as R

from conftest import cpu_backends

KAT = [  # Random123 known answers: counter ; key -> output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
VECTORS = json.load(open(os.path.join(os.path.dirname(__file__), "data", "spec_vectors.json")))


def _philox_numpy(ctr, key):
    """An independent Philox4x32-10 in numpy uint64 (wrap-around products are exact)."""
    c = [ctr[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = key[:, 0].astype(np.uint64), key[:, 1].astype(np.uint64)
    m32 = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & m32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & m32]
        k0 = (k0 + np.uint64(0x9E3779B9)) & m32
        k1 = (k1 + np.uint64(0xBB67AE85)) & m32
    return np.stack(c, axis=1)


@pytest.mark.parametrize("ctr,key,out", KAT)
def test_random123_known_answers(ctr, key, out):
    got = kseed_kernels.philox4x32_10(torch.tensor([ctr]), torch.tensor([key]))
    assert got.dtype == torch.int64 and got.shape == (1, 4)
    assert tuple(got[0].tolist()) == out
    assert tuple(R.philox4x32_10(torch.tensor([ctr]), torch.tensor([key]))[0].tolist()) == out


def test_philox_matches_independent_numpy(gen):
    ctr = torch.randint(0, 1 << 32, (5000, 4), generator=gen, dtype=torch.int64)
    key = torch.randint(0, 1 << 32, (5000, 2), generator=gen, dtype=torch.int64)
    want = _philox_numpy(ctr.numpy(), key.numpy()).astype(np.int64)
    assert np.array_equal(kseed_kernels.philox4x32_10(ctr, key).numpy(), want)
    assert np.array_equal(R.philox4x32_10(ctr, key).numpy(), want)


def test_philox_broadcasts_key():
    ctr = torch.tensor([[0, 0, 0, 0], [0xFFFFFFFF] * 4])
    got = kseed_kernels.philox4x32_10(ctr, torch.tensor([0, 0]))
    assert tuple(got[0].tolist()) == KAT[0][2]


@pytest.mark.parametrize("backend", ["reference"] + cpu_backends())
def test_spec_vectors(backend):
    for row in VECTORS["vectors"]:
        z = kseed_kernels.gaussian(int(row["seed"]), len(row["bits"]), stream=row["stream"],
                                   offset=row["offset"], backend=backend)
        got = ["%08x" % (b & 0xFFFFFFFF) for b in z.view(torch.int32).tolist()]
        assert got == row["bits"], (backend, row["seed"], row["stream"], row["offset"])


def test_gaussian_is_the_documented_function(gen):
    """Element j of gaussian() is Box-Muller on the documented Philox block and lane."""
    for _ in range(20):
        seed = int(torch.randint(0, 1 << 62, (1,), generator=gen)) * 4 + 3  # >= 2^63 often
        stream = int(torch.randint(0, 1 << 32, (1,), generator=gen))
        off = int(torch.randint(0, 1 << 40, (1,), generator=gen))
        z = kseed_kernels.gaussian(seed, 9, stream=stream, offset=off, backend="reference")
        for j in range(9):
            i = off + j
            b = i >> 2
            ctr = torch.tensor([[b & 0xFFFFFFFF, b >> 32, stream, 0]])
            key = torch.tensor([[seed & 0xFFFFFFFF, seed >> 32]])
            x = R.philox4x32_10(ctr, key)[0]
            lane = i & 3
            pair = (x[0:1], x[1:2]) if lane < 2 else (x[2:3], x[3:4])
            za, zb = R.box_muller(*pair)
            want = (za if lane % 2 == 0 else zb).item()
            assert z[j].item() == want


def test_gaussian_offset_consistency(gen):
    z = kseed_kernels.gaussian(77, 1003, stream=5, backend="reference")
    for off in (0, 1, 2, 3, 4, 5, 17, 998):
        part = kseed_kernels.gaussian(77, 1003 - off, stream=5, offset=off, backend="reference")
        assert torch.equal(part, z[off:])


def test_apply_is_fp32_sum_in_order(gen):
    """apply_seeds_ == w + (((0 + c0 z0) + c1 z1) + ...), rounded once to the dtype."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = torch.randn(37, generator=gen).to(dtype)
        seeds = [int(x) for x in torch.randint(0, 1 << 62, (5,), generator=gen)]
        coefs = (torch.randn(5, generator=gen) * 1e-2).tolist()
        acc = torch.zeros(37)
        for s, c in zip(seeds, coefs):
            acc = acc + torch.tensor(c, dtype=torch.float32) * kseed_kernels.gaussian(s, 37, stream=9)
        want = (w.float() + acc).to(dtype)
        got = kseed_kernels.apply_seeds_(w.clone(), seeds, coefs, stream=9, backend="reference")
        assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           want.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_sr_key_order_and_content_sensitive():
    s = np.array([1, 2, 3], dtype=np.uint64)
    c = np.array([S.f32_bits(0.5), S.f32_bits(-1.0), S.f32_bits(2.0)], dtype=np.uint32)
    k = S.sr_key(s, c)
    assert k == S.sr_key(s.copy(), c.copy())
    assert k != S.sr_key(s[::-1].copy(), c)
    assert k != S.sr_key(s, c[::-1].copy())
    assert 0 <= k < 1 << 64


def _round_ref_cases(dtype, gen, n=4096):
    # values spread over many binades, including float16 subnormals, and exactly-representable values
    mag = torch.exp2(torch.randint(-30 if dtype == torch.float16 else -120, 15, (n,), generator=gen).float())
    v = (torch.rand(n, generator=gen) + 0.5) * mag * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    v[:8] = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 2.0 ** -24, 3 * 2.0 ** -25, 1e-30])
    return v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased(dtype, gen):
    v = _round_ref_cases(dtype, gen)
    near = v.to(dtype)
    toward = torch.where(v.double() > near.float().double(), torch.full_like(v, float("inf")),
                         torch.full_like(v, -float("inf"))).to(dtype)
    other = torch.nextafter(near, toward)  # the neighbour on v's other side (== near if v is on the grid)
    on_grid = near.float() == v
    trials = 400
    total = torch.zeros_like(v, dtype=torch.float64)
    for _ in range(trials):
        bits = torch.randint(0, 1 << 32, v.shape, generator=gen, dtype=torch.int64)
        r = R.round_stochastic(v, bits, dtype)
        assert bool(((r == near) | ((r == other) & ~on_grid)).all())
        total += r.float().double()
    mean = total / trials
    spacing = (other.float().double() - near.float().double()).abs()
    err = torch.where(on_grid, (mean - v.double()).abs(), (mean - v.double()).abs() / spacing)
    ok = torch.isfinite(err)
    assert ok.sum() > 0.99 * len(v)
    # a mean of 400 Bernoulli draws has std <= 0.025 spacing; 0.15 is 6 sigma
    assert err[ok].max().item() < 0.15, err[ok].max().item()
    assert torch.equal(err[on_grid], torch.zeros_like(err[on_grid]))


def test_stochastic_rounding_keeps_small_updates_in_expectation():
    """Many updates far below a bf16 ulp: SR tracks the exact sum, nearest loses most of it."""
    n, steps, coef = 20000, 60, 5e-4
    exact = torch.zeros(n, dtype=torch.float64)
    w_sr = torch.ones(n, dtype=torch.bfloat16)
    w_rn = torch.ones(n, dtype=torch.bfloat16)
    for t in range(steps):
        exact += coef * kseed_kernels.gaussian(1000 + t, n, stream=3).double()
        kseed_kernels.apply_seeds_(w_sr, [1000 + t], [coef], stream=3, rounding="stochastic")
        kseed_kernels.apply_seeds_(w_rn, [1000 + t], [coef], stream=3)

    def slope(w):
        d = w.double() - 1.0
        return float((d * exact).sum() / (exact * exact).sum())

    assert abs(slope(w_sr) - 1.0) < 0.1, slope(w_sr)
    assert abs(slope(w_rn)) < 0.2, slope(w_rn)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_deterministic(dtype, gen):
    w = torch.randn(1001, generator=gen).to(dtype)
    a = kseed_kernels.apply_seeds_(w.clone(), [5, 6], [1e-3, -2e-3], stream=4, rounding="stochastic")
    b = kseed_kernels.apply_seeds_(w.clone(), [5, 6], [1e-3, -2e-3], stream=4, rounding="stochastic")
    c = kseed_kernels.apply_seeds_(w.clone(), [5, 7], [1e-3, -2e-3], stream=4, rounding="stochastic")
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert not torch.equal(a.view(torch.int16), c.view(torch.int16))


def test_float32_stochastic_equals_nearest(gen):
    w = torch.randn(333, generator=gen)
    a = kseed_kernels.apply_seeds_(w.clone(), [1, 2], [0.1, 0.2], rounding="stochastic")
    b = kseed_kernels.apply_seeds_(w.clone(), [1, 2], [0.1, 0.2])
    assert torch.equal(a, b)
