"""Exhaustive accuracy of the spec's transform over every value of each 23-bit uniform."""
import math

import torch

from kseed_kernels import torch_reference as R


def test_radius_all_uniforms():
    m = torch.arange(1 << 23, dtype=torch.int64)
    r = R.sqrt_rn(R._log_uniform(m << 9) * -2.0).double()
    u = (2 * m + 1).double() * 2.0 ** -24
    exact = torch.sqrt(-2.0 * torch.log(u))
    err = (r - exact).abs().max().item()
    assert err < 3.6e-7, err
    assert r.min().item() > 0.0  # u1 < 1: no zero radius, no log(0) at the other end
    assert abs(r.max().item() - math.sqrt(-2 * math.log(2.0 ** -24))) < 1e-6


def test_sincos_all_uniforms():
    m = torch.arange(1 << 23, dtype=torch.int64)
    c, s = R._sincos_uniform(m << 9)
    theta = 2 * math.pi * (2 * m + 1).double() * 2.0 ** -24
    assert (c.double() - torch.cos(theta)).abs().max().item() < 9e-8
    assert (s.double() - torch.sin(theta)).abs().max().item() < 9e-8


def test_box_muller_within_2e6(gen):
    words = torch.randint(0, 1 << 32, (2, 1 << 20), generator=gen, dtype=torch.int64)
    # include the extremes of both uniforms
    words[0, :4] = torch.tensor([0, 0xFFFFFFFF, 0, 0xFFFFFFFF])
    words[1, :4] = torch.tensor([0, 0, 0xFFFFFFFF, 0xFFFFFFFF])
    za, zb = R.box_muller(words[0], words[1])
    u1 = (2 * (words[0] >> 9) + 1).double() * 2.0 ** -24
    u2 = (2 * (words[1] >> 9) + 1).double() * 2.0 ** -24
    r = torch.sqrt(-2 * torch.log(u1))
    ea = r * torch.cos(2 * math.pi * u2)
    eb = r * torch.sin(2 * math.pi * u2)
    assert (za.double() - ea).abs().max().item() < 2e-6
    assert (zb.double() - eb).abs().max().item() < 2e-6


def test_reference_sqrt_is_correctly_rounded(gen):
    """numpy's float32 sqrt is the hardware's IEEE square root; the reference must agree with it."""
    import numpy as np

    x = torch.rand(1 << 20, generator=gen) * 40
    x[:3] = torch.tensor([0.0, 33.27106857299805, 2.0 ** -20])
    x[3] = torch.tensor([0x3F11C37A], dtype=torch.int32).view(torch.float32)
    want = torch.from_numpy(np.sqrt(x.numpy()))
    assert torch.equal(R.sqrt_rn(x).view(torch.int32), want.view(torch.int32))
