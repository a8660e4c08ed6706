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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding", [0, 1])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_apply_seeds(gen, dtype, rounding, device):
    w = torch.randn(3, 11, generator=gen).to(device=device, dtype=dtype)
    seeds, coefs = _args(gen)
    torch.library.opcheck(torch.ops.kseed.apply_seeds_.default,
                          (w, seeds, coefs, 12345, rounding, -77))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_apply_seeds_multi(gen, device):
    ts = [torch.randn(9, generator=gen).to(device),
          torch.randn(2, 5, generator=gen).to(device=device, dtype=torch.bfloat16)]
    seeds, coefs = _args(gen)
    torch.library.opcheck(torch.ops.kseed.apply_seeds_multi_.default,
                          (ts, [1, 2**32 - 1], seeds, coefs, 1, 99))


def test_meta_shapes():
    c = torch.empty(2, 3, 4, dtype=torch.int64, device="meta")
    k = torch.empty(2, 3, 2, dtype=torch.int64, device="meta")
    out = torch.ops.kseed.philox4x32_10(c, k)
    assert out.shape == (2, 3, 4) and out.dtype == torch.int64 and out.device.type == "meta"
