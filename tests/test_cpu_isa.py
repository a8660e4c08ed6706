"""Every SIMD path of the CPU kernels (scalar, AVX2, AVX-512, NEON: those this CPU runs) against the reference.

The path is forced with kseed_kernels.backends.cpu.set_isa and with the KSEED_CPU_ISA environment
variable; all paths must write bitwise the same results.
"""
import pytest
import torch

import kseed_kernels as kk
from kseed_kernels import torch_reference as R

from bitwise import bits

pytestmark = pytest.mark.skipif("cpu" not in kk.backends(), reason="kseed_kernels._C is not built")

if "cpu" in kk.backends():
    from kseed_kernels.backends import cpu as CPU

    ISAS = CPU.supported_isas()
else:
    CPU, ISAS = None, []

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture
def isa(request):
    CPU.set_isa(request.param)
    try:
        assert CPU.isa() == request.param
        yield request.param
    finally:
        CPU.set_isa(None)


def _u64(gen):
    hi, lo = torch.randint(0, 2**32, (2,), generator=gen).tolist()
    return (hi << 32) | lo


def test_scalar_always_supported():
    assert "scalar" in ISAS
    assert CPU.isa() in ISAS


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_gaussian_per_isa(gen, isa):
    for stream, offset, n in [(0, 0, 4099), (2**31 + 3, 2**32 - 5, 300), (2**32 - 1, 2**41 + 2, 77),
                              (11, 1, 1)]:
        seed = _u64(gen)
        got = kk.gaussian(seed, n, stream=stream, offset=offset, backend="cpu")
        want = R.gaussian(seed, n, stream, offset)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (isa, seed, stream, offset)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_apply_per_isa(gen, isa, dtype, rounding):
    for shape, k in [((5,), 3), ((4101,), 2), ((3, 17), 17), ((1,), 1)]:
        w = (torch.randn(shape, generator=gen) * 2).to(dtype)
        seeds = [_u64(gen) for _ in range(k)]
        coefs = torch.randn(k, generator=gen) * 0.1
        stream = _u64(gen) >> 32
        got, want = w.clone(), w.clone()
        kk.apply_seeds_(got, seeds, coefs, stream=stream, backend="cpu", rounding=rounding)
        kk.apply_seeds_(want, seeds, coefs, stream=stream, backend="reference", rounding=rounding)
        assert torch.equal(bits(got), bits(want)), (isa, dtype, shape, k)


def test_isas_agree_on_large_inputs(gen):
    """All paths bitwise equal on a larger input (cheap: no reference), special values included."""
    _check_isas_agree(gen, 3)


def _check_isas_agree(gen, k, noise="gaussian"):
    """Every path's apply (each dtype and rounding, K = k, the ``noise`` family) and noise sample on a
    200003-element input, bitwise equal."""
    sample = kk.rademacher if noise == "rademacher" else kk.gaussian
    n = 200_003
    seeds = [_u64(gen) for _ in range(k)]
    coefs = torch.randn(k, generator=gen)
    base = torch.randn(n, generator=gen) * 10
    base[:8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40, 65504.0, 7e4])
    results = {}
    try:
        for isa in ISAS:
            CPU.set_isa(isa)
            out = []
            for dtype in DTYPES:
                for rounding in ("nearest", "stochastic"):
                    w = base.to(dtype, copy=True)
                    kk.apply_seeds_(w, seeds, coefs, stream=5, backend="cpu", rounding=rounding, noise=noise)
                    out.append(bits(w))
            out.append(sample(seeds[0], n, stream=2, offset=3, backend="cpu").view(torch.int32))
            results[isa] = out
    finally:
        CPU.set_isa(None)
    first = results[ISAS[0]]
    for isa in ISAS[1:]:
        for i, (a, b) in enumerate(zip(results[isa], first)):
            assert torch.equal(a, b), (isa, i)


def test_nan_weights_stay_nan():
    for isa in ISAS:
        CPU.set_isa(isa)
        try:
            for dtype in DTYPES:
                for rounding in ("nearest", "stochastic"):
                    w = torch.tensor([float("nan")] * 21).to(dtype)
                    kk.apply_seeds_(w, [1, 2], [0.5, 0.25], backend="cpu", rounding=rounding)
                    assert torch.isnan(w).all(), (isa, dtype, rounding)
        finally:
            CPU.set_isa(None)


def test_env_var_selects_isa(monkeypatch):
    for isa in ISAS:
        monkeypatch.setenv("KSEED_CPU_ISA", isa)
        assert CPU.isa() == isa
    monkeypatch.setenv("KSEED_CPU_ISA", "auto")
    assert CPU.isa() == ISAS[-1]
    monkeypatch.setenv("KSEED_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="KSEED_CPU_ISA"):
        kk.gaussian(1, 8, backend="cpu")
    monkeypatch.delenv("KSEED_CPU_ISA")
    assert CPU.isa() == ISAS[-1]


def test_set_isa_rejects_bad_names():
    with pytest.raises(ValueError):
        CPU.set_isa("avx9000")
    with pytest.raises(TypeError):
        CPU.set_isa(3)
    for name in ("scalar", "avx2", "avx512", "neon"):
        if name not in ISAS:
            with pytest.raises(ValueError, match="not supported"):
                CPU.set_isa(name)
    CPU.set_isa(None)


def test_paths_of_this_machine(monkeypatch):
    """The build offers the paths of its architecture (AVX2 / AVX-512 on x86-64, NEON on aarch64) and
    picks the fastest by itself."""
    import platform

    monkeypatch.delenv("KSEED_CPU_ISA", raising=False)
    CPU.set_isa(None)
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        assert "neon" in ISAS and CPU.isa() == "neon"
        assert not {"avx2", "avx512"} & set(ISAS)
    elif machine in ("x86_64", "amd64"):
        assert "neon" not in ISAS
        monkeypatch.setenv("KSEED_CPU_ISA", "neon")
        with pytest.raises(ValueError, match="KSEED_CPU_ISA"):
            kk.gaussian(1, 8, backend="cpu")
        monkeypatch.delenv("KSEED_CPU_ISA")
    assert CPU.isa() == ISAS[-1]


# ------------------------------------------------------------------------ the Rademacher family
# The CPU kernels have it on every path (tests/cpp checks them bitwise); here through the ops.
@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_rademacher_per_isa(gen, isa):
    # offsets and lengths crossing 32- and 128-element boundaries, block carries into counter word 1
    for stream, offset, n in [(0, 0, 4099), (2**31 + 3, 2**32 * 128 - 45, 300), (2**32 - 1, 2**41 + 2, 77),
                              (11, 1, 1), (7, 95, 33), (3, 127, 129)]:
        seed = _u64(gen)
        got = kk.rademacher(seed, n, stream=stream, offset=offset, backend="cpu")
        want = R.rademacher(seed, n, stream, offset)
        assert got.dtype == torch.float32
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (isa, seed, stream, offset)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_apply_rademacher_per_isa(gen, isa, dtype, rounding):
    # K across the kernels' groups of seeds (4 or 8 per pass over the accumulator)
    for shape, k in [((5,), 3), ((4101,), 9), ((3, 17), 17), ((1,), 1), ((4096 + 33,), 8), ((130,), 4)]:
        w = (torch.randn(shape, generator=gen) * 2).to(dtype)
        seeds = [_u64(gen) for _ in range(k)]
        coefs = torch.randn(k, generator=gen) * 0.1
        stream = _u64(gen) >> 32
        got, want = w.clone(), w.clone()
        kk.apply_seeds_(got, seeds, coefs, stream=stream, backend="cpu", rounding=rounding, noise="rademacher")
        kk.apply_seeds_(want, seeds, coefs, stream=stream, backend="reference", rounding=rounding,
                        noise="rademacher")
        assert torch.equal(bits(got), bits(want)), (isa, dtype, shape, k)


def test_rademacher_isas_agree_on_large_inputs(gen):
    """All paths bitwise equal on a larger input with the Rademacher family (K = 11: across the groups of
    seeds), special values included."""
    _check_isas_agree(gen, 11, "rademacher")
