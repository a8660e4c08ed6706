"""Backend "cuda" (csrc/cuda) checked bit for bit against the reference and the CPU backend.

Needs a CUDA GPU and an extension built with CUDA (pip install --no-build-isolation . on a machine with
a CUDA torch); skipped otherwise.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import kseed_kernels as kk
from kseed_kernels import _spec as S
from kseed_kernels import torch_reference as R
from kseed_kernels.backends import Update
from kseed_kernels.backends import reference as bref

from bitwise import random_seeds, same_bits

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_backend_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from kseed_kernels.backends import cuda as bc
    except ImportError:
        return False
    return bc.available()


pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif(not _cuda_backend_usable(), reason="kseed_kernels._C has no CUDA kernels"),
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROUNDINGS = ("nearest", "stochastic")



def _key(seeds, coefs, rounding):
    if rounding != "stochastic":
        return 0
    return S.sr_key(seeds.numpy().view(np.uint64), coefs.numpy().view(np.uint32))


def _oracle(x, seeds, coefs, stream, rounding, sk):
    out = x.detach().cpu().clone()
    bref.apply([out], [stream], Update(seeds, coefs, rounding, sk))
    return out


def _cpu_oracle(x, seeds, coefs, stream, rounding, noise="gaussian"):
    """The CPU backend when built (fast; bitwise the reference), else the reference."""
    out = x.detach().cpu().clone()
    backend = "cpu" if "cpu" in kk.backends() else "reference"
    kk.apply_seeds_(out, seeds, coefs, stream=stream, rounding=rounding, backend=backend, noise=noise)
    return out


def test_registry():
    assert "cuda" in kk.backends()
    from kseed_kernels.backends import pick

    assert pick(torch.device("cuda"), "cuda").NAME == "cuda"


def test_spec_vectors():
    with open(os.path.join(HERE, "data", "spec_vectors.json")) as f:
        data = json.load(f)
    bad = []
    for v in data["vectors"]:
        n = len(v["bits"])
        z = kk.gaussian(int(v["seed"]), n, stream=v["stream"], offset=v["offset"], device="cuda",
                        backend="cuda").cpu()
        got = [format(x & 0xFFFFFFFF, "08x") for x in z.view(torch.int32).tolist()]
        bad += [(v["seed"], v["stream"], v["offset"] + j) for j, (a, b) in
                enumerate(zip(got, v["bits"])) if a != b]
    assert not bad, f"{len(bad)} spec vectors differ, e.g. {bad[:5]}"


@pytest.mark.parametrize("seed,stream,offset,n", [
    (0, 0, 0, 1), (1, 0, 0, 1000), (2**64 - 1, 2**32 - 1, 3, 5001), (12345678901234567, 77, 2**33 + 1, 19),
    (2**63, 5, 2**31 - 2, 4099), (99, 2**31, 2**62 - 9, 9)])
def test_gaussian(seed, stream, offset, n):
    a = kk.gaussian(seed, n, stream=stream, offset=offset, device="cuda", backend="cuda")
    assert a.device.type == "cuda" and a.dtype == torch.float32 and a.shape == (n,)
    assert same_bits(a, R.gaussian(seed, n, stream, offset))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("k,n", [(1, 1), (1, 7), (2, 2048), (3, 2049), (16, 5000), (300, 777),
                                 (1024, 4096 + 5)])
def test_apply_bitwise(gen, dtype, rounding, k, n):
    seeds = random_seeds(gen, k)
    coefs = (torch.randn(k, generator=gen) * 1e-2).float()
    x = torch.randn(n, generator=gen).to(dtype)
    stream = int(torch.randint(0, 2**32, (1,), generator=gen))
    got = x.cuda()
    kk.apply_seeds_(got, seeds, coefs, stream=stream, rounding=rounding, backend="cuda")
    assert same_bits(got, _cpu_oracle(x, seeds, coefs, stream, rounding))
    if k * n <= 50_000:
        assert same_bits(got, _oracle(x, seeds, coefs, stream, rounding, _key(seeds, coefs, rounding)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_apply_out_of_place(gen, dtype, rounding):
    """apply_seeds / apply_seeds_multi on the GPU: bitwise copy + in-place, the base unchanged, with
    aligned and misaligned bases and outs."""
    seeds = random_seeds(gen, 5)
    coefs = (torch.randn(5, generator=gen) * 1e-2).float()
    for n, b_off, o_off in ((5000, 0, 0), (4099, 1, 0), (2049, 0, 1), (7, 1, 1)):
        x = torch.randn(n + b_off, generator=gen).to(dtype)[b_off:]
        base = torch.empty(n + b_off, dtype=dtype, device="cuda")[b_off:]
        base.copy_(x)
        out = torch.empty(n + o_off, dtype=dtype, device="cuda")[o_off:]
        got = kk.apply_seeds(base, seeds, coefs, out=out, stream=9, rounding=rounding, backend="cuda")
        assert got is out
        assert same_bits(out, _cpu_oracle(x, seeds, coefs, 9, rounding)), (n, b_off, o_off)
        assert same_bits(base, x), "base changed"
    xs = [torch.randn(n, generator=gen).to(DTYPES[i % 3]) for i, n in enumerate((3, 2048, 9000, 1))]
    outs = kk.apply_seeds_multi([x.cuda() for x in xs], [1, 2, 3, 4], seeds, coefs, rounding=rounding,
                                backend="cuda")
    want = kk.apply_seeds_multi(xs, [1, 2, 3, 4], seeds, coefs, rounding=rounding,
                                backend="cpu" if "cpu" in kk.backends() else "reference")
    assert all(same_bits(a, b) for a, b in zip(outs, want))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_special_values(gen, dtype, rounding):
    n = 300
    fmax, tiny = torch.finfo(dtype).max, torch.finfo(dtype).tiny
    x = torch.randn(n, generator=gen) * 1e-3
    x[:8] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, fmax, -fmax, tiny])
    x[8:16] = tiny * torch.rand(8, generator=gen)
    x = x.to(dtype)
    for scale in (1e-3, 1e-39, 3e4):  # 1e-39: float32 subnormals (no flush-to-zero allowed)
        seeds = random_seeds(gen, 3)
        coefs = (torch.randn(3, generator=gen) * scale).float()
        got = x.cuda()
        kk.apply_seeds_(got, seeds, coefs, stream=11, rounding=rounding, backend="cuda")
        assert same_bits(got, _oracle(x, seeds, coefs, 11, rounding, _key(seeds, coefs, rounding))), scale


def test_unaligned_views(gen):
    """Tensors whose data pointer is not 16-byte aligned take the scalar path, same bits."""
    seeds, coefs = random_seeds(gen, 4), (torch.randn(4, generator=gen) * 1e-2).float()
    for dtype in DTYPES:
        base = torch.randn(5000, generator=gen).to(dtype)
        dev = base.cuda()
        part = dev[1:4001]  # contiguous view, misaligned
        kk.apply_seeds_(part, seeds, coefs, stream=3, backend="cuda")
        assert same_bits(part, _cpu_oracle(base[1:4001], seeds, coefs, 3, "nearest"))
        assert same_bits(dev[0], base[0]) and same_bits(dev[4001:], base[4001:])


@pytest.mark.parametrize("k", [1, 2, 7])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_multi(gen, k, rounding):
    sizes = [1, 3, 4, 5, 2048, 2049, 7, 10000, 16, 2, 300, 65536 + 3]
    xs = [torch.randn(n, generator=gen).to(DTYPES[i % 3]) for i, n in enumerate(sizes)]
    streams = [int(s) for s in torch.randint(0, 2**32, (len(xs),), generator=gen)]
    seeds, coefs = random_seeds(gen, k), (torch.randn(k, generator=gen) * 1e-2).float()
    got = [x.cuda() for x in xs]
    kk.apply_seeds_multi_(got, streams, seeds, coefs, rounding=rounding, backend="cuda")
    for g, x, st in zip(got, xs, streams):
        assert same_bits(g, _cpu_oracle(x, seeds, coefs, st, rounding))


def test_multi_many_small(gen):
    xs = [torch.randn(int(n), generator=gen).to(torch.bfloat16)
          for n in torch.randint(1, 600, (400,), generator=gen)]
    streams = list(range(400))
    seeds, coefs = random_seeds(gen, 2), torch.tensor([1e-3, -2e-3])
    got = [x.cuda() for x in xs]
    kk.apply_seeds_multi_(got, streams, seeds, coefs, backend="cuda")
    for g, x, st in zip(got, xs, streams):
        assert same_bits(g, _cpu_oracle(x, seeds, coefs, st, "nearest"))


def test_long_history(gen):
    """2^20 (seed, coef) pairs in one call: the float32 sum over all of them, never rounded early."""
    if "cpu" not in kk.backends():
        pytest.skip("the CPU backend is the oracle at this K")
    k = 1 << 20
    seeds = random_seeds(gen, k)
    coefs = (torch.randn(k, generator=gen) * 1e-4).float()
    x = torch.randn(37, generator=gen).to(torch.bfloat16)
    got = x.cuda()
    kk.apply_seeds_(got, seeds, coefs, stream=5, backend="cuda")
    assert same_bits(got, _cpu_oracle(x, seeds, coefs, 5, "nearest"))


def test_cuda_equals_triton(gen):
    if "triton" not in kk.backends():
        pytest.skip("triton not usable")
    seeds, coefs = random_seeds(gen, 33), (torch.randn(33, generator=gen) * 1e-2).float()
    x = torch.randn(10007, generator=gen).to(torch.float16).cuda()
    a, b = x.clone(), x.clone()
    kk.apply_seeds_(a, seeds, coefs, stream=1, rounding="stochastic", backend="cuda")
    kk.apply_seeds_(b, seeds, coefs, stream=1, rounding="stochastic", backend="triton")
    assert same_bits(a, b)


def test_direct_op_errors():
    ops = torch.ops.kseed
    t = torch.zeros(8, device="cuda")
    s = torch.zeros(2, dtype=torch.int64)
    c = torch.zeros(2)
    with pytest.raises((ValueError, RuntimeError)):
        ops.apply_seeds_(t, s, c, -1, 0, 0)
    with pytest.raises((ValueError, RuntimeError)):
        ops.apply_seeds_(t, s, torch.tensor([1.0, float("nan")]), 0, 0, 0)
    with pytest.raises((TypeError, RuntimeError)):
        ops.apply_seeds_(t.to(torch.int32), s, c, 0, 0, 0)
    with pytest.raises((ValueError, RuntimeError)):
        ops.apply_seeds_(t[::2], s, c, 0, 0, 0)


# ------------------------------------------------------------------------ the Rademacher family
def _cpu_oracle_rad(x, seeds, coefs, stream, rounding):
    return _cpu_oracle(x, seeds, coefs, stream, rounding, noise="rademacher")


def test_rademacher_spec_vectors():
    with open(os.path.join(HERE, "data", "spec_vectors_rademacher.json")) as f:
        rows = json.load(f)["vectors"]
    for v in rows:
        r = kk.rademacher(int(v["seed"]), len(v["signs"]), stream=v["stream"], offset=v["offset"],
                          device="cuda", backend="cuda").cpu()
        assert "".join("+" if x > 0 else "-" for x in r.tolist()) == v["signs"], v


@pytest.mark.parametrize("seed,stream,offset,n", [
    (0, 0, 0, 1), (1, 0, 0, 1000), (2**64 - 1, 2**32 - 1, 127, 5001),
    (12345678901234567, 77, 2**40 + 31, 19), (99, 2**31, 2**62 - 9000, 9000)])
def test_rademacher(seed, stream, offset, n):
    a = kk.rademacher(seed, n, stream=stream, offset=offset, device="cuda", backend="cuda")
    assert a.device.type == "cuda" and a.dtype == torch.float32 and a.shape == (n,)
    assert same_bits(a, R.rademacher(seed, n, stream, offset))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("k,n", [(1, 1), (1, 7), (3, 2049), (16, 5000), (17, 4096), (300, 777),
                                 (1024, 4096 + 5)])
def test_rademacher_apply_bitwise(gen, dtype, rounding, k, n):
    seeds = random_seeds(gen, k)
    coefs = (torch.randn(k, generator=gen) * 1e-2).float()
    x = torch.randn(n, generator=gen).to(dtype)
    stream = int(torch.randint(0, 2**32, (1,), generator=gen))
    got = x.cuda()
    kk.apply_seeds_(got, seeds, coefs, stream=stream, rounding=rounding, backend="cuda",
                    noise="rademacher")
    assert same_bits(got, _cpu_oracle_rad(x, seeds, coefs, stream, rounding))
    out = kk.apply_seeds(x.cuda(), seeds, coefs, stream=stream, rounding=rounding, backend="cuda",
                         noise="rademacher")
    assert same_bits(out, got)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_rademacher_multi(gen, rounding):
    sizes = [1, 3, 128, 129, 2048, 2049, 7, 10000, 300, 65536 + 3]
    xs = [torch.randn(n, generator=gen).to(DTYPES[i % 3]) for i, n in enumerate(sizes)]
    streams = [int(s) for s in torch.randint(0, 2**32, (len(xs),), generator=gen)]
    seeds, coefs = random_seeds(gen, 20), (torch.randn(20, generator=gen) * 1e-2).float()
    got = [x.cuda() for x in xs]
    kk.apply_seeds_multi_(got, streams, seeds, coefs, rounding=rounding, backend="cuda",
                          noise="rademacher")
    outs = kk.apply_seeds_multi([x.cuda()[1:] for x in xs], streams, seeds, coefs,
                                rounding=rounding, backend="cuda", noise="rademacher")
    for g, o, x, st in zip(got, outs, xs, streams):
        assert same_bits(g, _cpu_oracle_rad(x, seeds, coefs, st, rounding))
        assert same_bits(o, _cpu_oracle_rad(x[1:], seeds, coefs, st, rounding))


def test_rademacher_cuda_equals_triton(gen):
    if "triton" not in kk.backends():
        pytest.skip("triton not usable")
    seeds, coefs = random_seeds(gen, 33), (torch.randn(33, generator=gen) * 1e-2).float()
    x = torch.randn(10007, generator=gen).to(torch.bfloat16).cuda()
    a, b = x.clone(), x.clone()
    kk.apply_seeds_(a, seeds, coefs, stream=1, rounding="stochastic", backend="cuda",
                    noise="rademacher")
    kk.apply_seeds_(b, seeds, coefs, stream=1, rounding="stochastic", backend="triton",
                    noise="rademacher")
    assert same_bits(a, b)
    r = kk.rademacher(5, 3000, stream=2, offset=77, device="cuda", backend="triton")
    assert same_bits(r, kk.rademacher(5, 3000, stream=2, offset=77, device="cuda", backend="cuda"))


def test_rademacher_noise_floor(gen):
    from kseed_kernels.backends import cuda as bc

    seeds, coefs = random_seeds(gen, 5), (torch.randn(5, generator=gen) * 1e-2).float()
    f = bc.noise_floor(3 * 2048, seeds, coefs, 9, torch.device("cuda"), noise="rademacher").cpu()
    acc = torch.zeros(3 * 2048)
    kk.apply_seeds_(acc, seeds, coefs, stream=9, backend="reference", noise="rademacher")
    assert torch.allclose(f, acc.view(3, 2048).sum(1), rtol=1e-4, atol=1e-5)
