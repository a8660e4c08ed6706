"""torch.library.opcheck on the torch.ops.kseed operators (schemas, Meta/fake impls, AOT dispatch), on
CPU tensors and, where the extension has its CUDA part and a GPU is present, on CUDA tensors."""
import pytest
import torch

import kseed_kernels as kk

pytestmark = pytest.mark.skipif("cpu" not in kk.backends(), reason="kseed_kernels._C is not built")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    "cuda" not in kk.backends(), reason="no CUDA GPU, or kseed_kernels._C has no CUDA kernels"))]


def _args(gen):
    seeds = torch.randint(-2**62, 2**62, (3,), generator=gen, dtype=torch.int64)
    coefs = torch.randn(3, generator=gen)
    return seeds, coefs


def test_opcheck_philox(gen):
    c = torch.randint(0, 2**32, (5, 4), generator=gen, dtype=torch.int64)
    k = torch.randint(0, 2**32, (5, 2), generator=gen, dtype=torch.int64)
    torch.library.opcheck(torch.ops.kseed.philox4x32_10.default, (c, k))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_gaussian(device):
    out = torch.empty(37, device=device)
    torch.library.opcheck(torch.ops.kseed.gaussian_.default, (out, 2**62 + 5, 7, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_rademacher(device):
    out = torch.empty(300, device=device)
    torch.library.opcheck(torch.ops.kseed.rademacher_.default, (out, -2**62 - 5, 7, 125))


NOISES = [0, 1]  # the noise argument of the apply ops: gaussian, rademacher


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding", [0, 1])
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_apply_seeds(gen, dtype, rounding, noise, device):
    w = torch.randn(3, 11, generator=gen).to(device=device, dtype=dtype)
    seeds, coefs = _args(gen)
    torch.library.opcheck(torch.ops.kseed.apply_seeds_.default,
                          (w, seeds, coefs, 12345, rounding, -77, noise))


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_apply_seeds_multi(gen, noise, device):
    ts = [torch.randn(9, generator=gen).to(device),
          torch.randn(2, 5, generator=gen).to(device=device, dtype=torch.bfloat16)]
    seeds, coefs = _args(gen)
    torch.library.opcheck(torch.ops.kseed.apply_seeds_multi_.default,
                          (ts, [1, 2**32 - 1], seeds, coefs, 1, 99, noise))


def test_meta_shapes():
    c = torch.empty(2, 3, 4, dtype=torch.int64, device="meta")
    k = torch.empty(2, 3, 2, dtype=torch.int64, device="meta")
    out = torch.ops.kseed.philox4x32_10(c, k)
    assert out.shape == (2, 3, 4) and out.dtype == torch.int64 and out.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding", [0, 1])
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_apply_seeds_out(gen, dtype, rounding, noise, device):
    base = torch.randn(3, 11, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty_like(base)
    seeds, coefs = _args(gen)
    torch.library.opcheck(torch.ops.kseed.apply_seeds_out.default,
                          (base, out, seeds, coefs, 12345, rounding, -77, noise))


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_apply_seeds_multi_out(gen, noise, device):
    bases = [torch.randn(9, generator=gen).to(device),
             torch.randn(2, 5, generator=gen).to(device=device, dtype=torch.float16)]
    outs = [torch.empty_like(b) for b in bases]
    seeds, coefs = _args(gen)
    torch.library.opcheck(torch.ops.kseed.apply_seeds_multi_out.default,
                          (bases, outs, [1, 2**32 - 1], seeds, coefs, 1, 99, noise))


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_noise_floor(gen, noise, device):
    like = torch.empty(0, device=device)
    seeds, coefs = _args(gen)
    torch.library.opcheck(torch.ops.kseed._noise_floor.default,
                          (like, seeds, coefs, 5000, 7, noise))


def test_noise_argument_defaults_to_gaussian(gen):
    """The noise argument of the apply ops defaults to 0 (gaussian): a call without it is unchanged."""
    w = torch.randn(50, generator=gen)
    seeds, coefs = _args(gen)
    a, b = w.clone(), w.clone()
    torch.ops.kseed.apply_seeds_(a, seeds, coefs, 3, 0, 0)
    torch.ops.kseed.apply_seeds_(b, seeds, coefs, 3, 0, 0, 0)
    assert torch.equal(a, b) and not torch.equal(a, w)


def test_noise_floor_meta_shape():
    out = torch.ops.kseed._noise_floor(torch.empty(0, device="meta"), torch.zeros(2, dtype=torch.int64),
                                       torch.zeros(2), 4097, 0)
    assert out.shape == (3,) and out.dtype == torch.float32 and out.device.type == "meta"


def test_settings_ops():
    ops = torch.ops.kseed
    assert ops.cpu_isa() in ops.cpu_supported_isas() and "scalar" in ops.cpu_supported_isas()
    assert ops.cpu_best_isa() in ops.cpu_supported_isas()
    tile = ops.cpu_tile_elems()
    try:
        ops.set_cpu_tile_elems(123)
        assert ops.cpu_tile_elems() == 123
        with pytest.raises(ValueError, match="tile must be in"):
            ops.set_cpu_tile_elems(0)
    finally:
        ops.set_cpu_tile_elems(tile)
    with pytest.raises(ValueError, match="isa must be one of"):
        ops.set_cpu_isa("sse9")
    ops.set_cpu_isa("scalar")
    try:
        assert ops.cpu_isa() == "scalar"
    finally:
        ops.set_cpu_isa(None)


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_project_seeds(gen, noise, device):
    ts = [torch.randn(3, 700, generator=gen).to(device),
          torch.randn(2, 5, generator=gen).to(device=device, dtype=torch.bfloat16),
          torch.randn(33, generator=gen).to(device=device, dtype=torch.float16)]
    seeds, _ = _args(gen)
    torch.library.opcheck(torch.ops.kseed.project_seeds.default, (ts, [1, 2**32 - 1, 5], seeds, noise))


def test_project_seeds_meta_shape():
    ts = [torch.empty(4097, device="meta"), torch.empty(3, 3, device="meta", dtype=torch.float16)]
    out = torch.ops.kseed.project_seeds(ts, [0, 1], torch.zeros(7, dtype=torch.int64), 1)
    assert out.shape == (7,) and out.dtype == torch.float32 and out.device.type == "meta"
