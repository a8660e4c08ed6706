"""The Rademacher family (docs/SPEC.md section 8) through the public API on the backends that serve CPU
tensors here: kseed_kernels.rademacher, and apply_seeds_ / apply_seeds_multi_ / apply_seeds /
apply_seeds_multi with noise="rademacher", bit for bit against the reference (itself checked against the
spec vectors and an element-wise oracle in tests/test_rademacher.py), on every SIMD path of the cpu
backend.  Triton (interpreted) is checked in tests/test_triton.py, the CUDA kernels under the host
emulation in tests/test_cuda_emu.py.
"""
import json
import os
import re

import pytest
import torch

import kseed_kernels as kk
from kseed_kernels import _spec as S
from kseed_kernels import torch_reference as R

from bitwise import bits, random_seeds

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HAS_CPU = "cpu" in kk.backends()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROUNDINGS = ["nearest", "stochastic"]


def _isas():
    if not HAS_CPU:
        return []
    from kseed_kernels.backends import cpu

    return cpu.supported_isas()


@pytest.fixture(params=["reference"] + [f"cpu:{i}" for i in _isas()])
def backend(request):
    """A backend name, the cpu backend once per SIMD path this machine runs."""
    name = request.param
    if not name.startswith("cpu:"):
        yield name
        return
    from kseed_kernels.backends import cpu

    cpu.set_isa(name.split(":", 1)[1])
    try:
        yield "cpu"
    finally:
        cpu.set_isa(None)


def _coefs(gen, k):
    return (torch.randn(k, generator=gen) * 1e-2).float()


def _ref_apply(w, seeds, coefs, stream, rounding, base=None):
    """The reference update of one tensor (the normalised inputs the backends see)."""
    s = [x & S.MASK64 for x in seeds.tolist()]
    key = kk.ops._sr_key(seeds, coefs, rounding, [w.dtype])
    R.apply_seeds_(w, s, coefs, stream, rounding, key, base=base, noise="rademacher")
    return w


# ----------------------------------------------------------------------------------- rademacher()
def test_spec_vectors(backend):
    with open(os.path.join(HERE, "data", "spec_vectors_rademacher.json")) as fh:
        rows = json.load(fh)["vectors"]
    for row in rows[::7]:
        got = kk.rademacher(int(row["seed"]), len(row["signs"]), stream=row["stream"],
                            offset=row["offset"], backend=backend)
        assert got.dtype == torch.float32
        assert "".join("+" if x > 0 else "-" for x in got.tolist()) == row["signs"], row


@pytest.mark.parametrize("offset,numel", [(0, 1), (127, 2), (5, 1000), (2**40 - 60, 300),
                                          ((1 << 39) + 128 * 3 - 1, 4100)])
def test_rademacher_matches_reference(backend, gen, offset, numel):
    seed = int(torch.randint(-2**63, 2**63 - 1, (1,), generator=gen)) & S.MASK64
    stream = int(torch.randint(0, 2**32, (1,), dtype=torch.int64, generator=gen))
    got = kk.rademacher(seed, numel, stream=stream, offset=offset, backend=backend)
    want = R.rademacher(seed, numel, stream, offset)
    assert got.shape == (numel,) and torch.equal(bits(got), bits(want))
    assert set(got.unique().tolist()) <= {-1.0, 1.0}


def test_rademacher_empty_and_errors():
    assert kk.rademacher(1, 0).shape == (0,)
    with pytest.raises(ValueError, match="numel"):
        kk.rademacher(1, -1)
    with pytest.raises(TypeError, match="numel"):
        kk.rademacher(1, 2.0)
    with pytest.raises(ValueError, match="seed"):
        kk.rademacher(-1, 3)
    with pytest.raises(ValueError, match="offset"):
        kk.rademacher(1, 3, offset=2**62)
    with pytest.raises(ValueError, match="stream"):
        kk.rademacher(1, 3, stream=2**32)


def test_rademacher_is_not_gaussian():
    """Its own counter domain and its own values: not the sign of z."""
    r = kk.rademacher(7, 4096)
    z = kk.gaussian(7, 4096)
    assert not torch.equal(r, torch.sign(z))


# ------------------------------------------------------------------------------------- apply
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("k", [1, 5])
def test_apply_in_place_matches_reference(backend, gen, dtype, rounding, k):
    w = (torch.randn(3 * 128 + 45, generator=gen) * 0.05).to(dtype)
    seeds, coefs = random_seeds(gen, k), _coefs(gen, k)
    stream = int(torch.randint(0, 2**32, (1,), dtype=torch.int64, generator=gen))
    got = w.clone()
    kk.apply_seeds_(got, seeds, coefs, stream=stream, rounding=rounding, backend=backend,
                    noise="rademacher")
    want = _ref_apply(w.clone(), seeds, coefs, stream, rounding)
    assert torch.equal(bits(got), bits(want))
    assert not torch.equal(bits(got), bits(w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_apply_out_of_place_matches_reference(backend, gen, dtype, rounding):
    base = (torch.randn(1000, generator=gen) * 0.05).to(dtype)
    keep = base.clone()
    seeds, coefs = random_seeds(gen, 3), _coefs(gen, 3)
    out = kk.apply_seeds(base, seeds, coefs, stream=9, rounding=rounding, backend=backend,
                         noise="rademacher")
    want = _ref_apply(base.clone(), seeds, coefs, 9, rounding)
    assert torch.equal(bits(out), bits(want)) and torch.equal(bits(base), bits(keep))


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_apply_multi_matches_reference(backend, gen, rounding):
    """Mixed dtypes and sizes (tails, block crossings), a non-contiguous tensor and one whose storage
    starts off the vector alignment; in place and out of place."""
    sizes = (1, 31, 129, 1000, 2 * 2048 + 5)
    ws = [(torch.randn(n, generator=gen) * 0.05).to(DTYPES[i % 3]) for i, n in enumerate(sizes)]
    ws.append((torch.randn(40, 27, generator=gen) * 0.05).t())  # non-contiguous
    ws.append((torch.randn(700, generator=gen) * 0.05).to(torch.bfloat16)[3:])  # misaligned
    streams = [int(x) for x in torch.randint(0, 2**32, (len(ws),), dtype=torch.int64, generator=gen)]
    seeds, coefs = random_seeds(gen, 4), _coefs(gen, 4)
    want = []
    for w, st in zip(ws, streams):
        # The reference per tensor, with the call's stochastic-rounding key (of all its dtypes).
        key = kk.ops._sr_key(seeds, coefs, rounding, [t.dtype for t in ws])
        r = w.clone()
        R.apply_seeds_(r, [x & S.MASK64 for x in seeds.tolist()], coefs, st, rounding, key,
                       noise="rademacher")
        want.append(r)
    outs = kk.apply_seeds_multi(ws, streams, seeds, coefs, rounding=rounding, backend=backend,
                                noise="rademacher")
    got = [w.clone() for w in ws]
    kk.apply_seeds_multi_(got, streams, seeds, coefs, rounding=rounding, backend=backend,
                          noise="rademacher")
    for i, (g, o, w) in enumerate(zip(got, outs, want)):
        assert torch.equal(bits(g), bits(w)), f"tensor {i} in place"
        assert torch.equal(bits(o), bits(w)), f"tensor {i} out of place"


def test_apply_exact_sum(backend, gen):
    """float32: w + sum_k (+-c_k) in ascending k, each term exact, from the signs themselves."""
    n, k = 700, 6
    w = torch.randn(n, generator=gen)
    seeds, coefs = random_seeds(gen, k), _coefs(gen, k)
    acc = torch.zeros(n)
    for s, c in zip(seeds.tolist(), coefs):
        acc = acc + c * kk.rademacher(s & S.MASK64, n, stream=3)
    got = kk.apply_seeds(w, seeds, coefs, stream=3, backend=backend, noise="rademacher")
    assert torch.equal(bits(got), bits(w + acc))


def test_default_is_gaussian(gen):
    w = torch.randn(600, generator=gen)
    seeds, coefs = random_seeds(gen, 3), _coefs(gen, 3)
    a = kk.apply_seeds(w, seeds, coefs)
    b = kk.apply_seeds(w, seeds, coefs, noise="gaussian")
    c = kk.apply_seeds(w, seeds, coefs, noise="rademacher")
    s = [x & S.MASK64 for x in seeds.tolist()]
    want = R.apply_seeds_(w.clone(), s, coefs, 0, "nearest", 0)
    assert torch.equal(bits(a), bits(want)) and torch.equal(bits(b), bits(want))
    assert not torch.equal(bits(c), bits(a))


@pytest.mark.parametrize("bad", ["Rademacher", "normal", "", None, 1])
def test_bad_noise_raises(bad):
    w = torch.zeros(4)
    calls = [
        lambda: kk.apply_seeds_(w, [1], [1.0], noise=bad),
        lambda: kk.apply_seeds_multi_([w], [0], [1], [1.0], noise=bad),
        lambda: kk.apply_seeds(w, [1], [1.0], noise=bad),
        lambda: kk.apply_seeds_multi([w], [0], [1], [1.0], noise=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="noise must be one of .*gaussian.*rademacher"):
            call()
    assert torch.equal(w, torch.zeros(4))


@pytest.mark.skipif(not HAS_CPU, reason="the cpu backend is not built")
def test_compiled_ops_check_noise():
    seeds, coefs = torch.tensor([1]), torch.tensor([1.0])
    for bad in (-1, 2):
        with pytest.raises(ValueError, match="noise must be 0 .gaussian. or 1 .rademacher."):
            torch.ops.kseed.apply_seeds_(torch.zeros(4), seeds, coefs, 0, 0, 0, bad)
        with pytest.raises(ValueError, match="noise must be"):
            torch.ops.kseed._noise_floor(torch.zeros(0), seeds, coefs, 10, 0, bad)
    with pytest.raises(ValueError, match="offset"):
        torch.ops.kseed.rademacher_(torch.zeros(4), 0, 0, -1)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.kseed.rademacher_(torch.zeros(4, dtype=torch.float16), 0, 0, 0)


@pytest.mark.skipif(not HAS_CPU, reason="the cpu backend is not built")
def test_noise_floor_rademacher(gen):
    """The floor op's Rademacher variant sums each tile's accumulators: those of a zero tensor."""
    from kseed_kernels.backends import cpu

    numel, k = 3 * 2048 - 10, 3
    seeds, coefs = random_seeds(gen, k), _coefs(gen, k)
    got = cpu.noise_floor(numel, seeds, coefs, 17, torch.device("cpu"), noise="rademacher")
    acc = torch.zeros(numel)
    kk.apply_seeds_(acc, seeds, coefs, stream=17, noise="rademacher", backend="reference")
    want = torch.stack([acc[i:i + 2048].sum() for i in range(0, numel, 2048)])
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    g2 = cpu.noise_floor(numel, seeds, coefs, 17, torch.device("cpu"))
    assert not torch.allclose(got, g2)


def test_noise_codes_match_cpp():
    with open(os.path.join(ROOT, "csrc", "kseed_types.h")) as fh:
        text = fh.read()
    enum = dict((m.group(1), int(m.group(2))) for m in re.finditer(r"kNoise(\w+) = (\d+)", text))
    assert {k.lower(): v for k, v in enum.items()} == S.NOISE_CODES
    assert tuple(S.NOISE_CODES) == S.NOISES
