"""project_seeds / project_seeds_multi (docs/SPEC.md section 9): the reference against the spec's text
and against a float64 dot product, every CPU path bitwise against the reference (sizes around the block
and lane boundaries, K around the seed groups, every dtype, both noise families, non-contiguous inputs,
several tensors, 1 and 2 threads), the transpose identity with apply, and the argument checks."""
import numpy as np
import pytest
import torch

import kseed_kernels as kk
from kseed_kernels import _spec as S
from kseed_kernels import torch_reference as R

from bitwise import bits, random_seeds, same_bits

NOISES = ["gaussian", "rademacher"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
B = S.PROJECT_BLOCK

needs_cpu = pytest.mark.skipif("cpu" not in kk.backends(), reason="kseed_kernels._C is not built")


def _isas():
    if "cpu" not in kk.backends():
        return []
    from kseed_kernels.backends import cpu as C

    return C.supported_isas()


def _noise(seed, n, stream, noise):
    f = kk.gaussian if noise == "gaussian" else kk.rademacher
    return f(seed, n, stream=stream, backend="reference")


def _u64(seeds):
    return [int(s) & S.MASK64 for s in seeds.tolist()]


# ------------------------------------------------------------------------------ the reference
def _spec_loop(x: np.ndarray, seed: int, stream: int, noise: str) -> np.float32:
    """Section 9.1 read literally: scalar float32 loops per block and lane, the fold, the float64 sum."""
    n = x.size
    z = _noise(seed, n, stream, noise).numpy()
    total = 0.0
    for b0 in range(0, n, B):
        s = [np.float32(0.0)] * S.PROJECT_LANES
        for i in range(b0, min(n, b0 + B)):
            l = i % S.PROJECT_LANES
            s[l] = np.float32(s[l] + np.float32(x[i] * z[i]))
        h = S.PROJECT_LANES // 2
        while h >= 1:
            for l in range(h):
                s[l] = np.float32(s[l] + s[l + h])
            h //= 2
        total = total + float(s[0])
    return np.float32(total)


@pytest.mark.parametrize("noise", NOISES)
def test_reference_is_the_spec_text(gen, noise):
    x = (torch.randn(2 * B + 37, generator=gen) * 3).numpy()
    seeds = random_seeds(gen, 3)
    got = R.project_seeds_multi([torch.from_numpy(x)], [99], _u64(seeds), noise)
    want = np.array([_spec_loop(x, s, 99, noise) for s in _u64(seeds)], np.float32)
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))
    # the check sees a wrong order: a plain float32 sum of the products differs in some bits
    z = _noise(_u64(seeds)[2], x.size, 99, noise).numpy()
    plain = np.float32(0)
    for p in (x * z).astype(np.float32):
        plain = np.float32(plain + p)
    assert plain != want[2]


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("n", [1, 3000, 3 * B + 5])
def test_reference_is_the_dot_product(gen, noise, n):
    """Within the float32 summation bound of the exact float64 dot product."""
    x = torch.randn(n, generator=gen) * 0.1
    seeds = random_seeds(gen, 4)
    got = kk.project_seeds(x, seeds, stream=5, noise=noise, backend="reference").double()
    for k, s in enumerate(_u64(seeds)):
        p = x.double() * _noise(s, n, 5, noise).double()
        exact = p.sum()
        # a lane adds 128 products, the fold 4 more levels, then one rounding to float32
        bound = (128 + 4 + 1) * 2.0 ** -24 * p.abs().sum() + 2.0 ** -24 * abs(exact)
        assert abs(got[k] - exact) <= bound, (k, float(got[k]), float(exact), float(bound))
        # the bound is far below the spread of a wrong seed's result (about the norm of p)
        assert bound < 1e-3 * p.norm()


def test_reference_multi_is_one_float64_sum(gen):
    """The list's block sums are added in one float64 sum before the one rounding (spec 9.2)."""
    ts = [torch.randn(B + 3, generator=gen), torch.randn(17, generator=gen).to(torch.bfloat16)]
    seeds = _u64(random_seeds(gen, 3))
    got = R.project_seeds_multi(ts, [1, 2], seeds)
    sums = torch.cat([R.project_block_sums(t, seeds, st) for t, st in zip(ts, [1, 2])], dim=1).double()
    want = torch.zeros(3, dtype=torch.float64)
    for b in range(sums.shape[1]):
        want = want + sums[:, b]
    assert torch.equal(bits(got), bits(want.float()))


# ------------------------------------------------------------------------------- CPU bitwise
SIZES = (1, 15, 16, 17, 33, 2047, B, B + 1, 3 * B + 100, 5 * B + 4 * 7 + 3)


@needs_cpu
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("k", [1, 3, 9, 37])
def test_cpu_matches_reference(gen, isa, noise, k):
    from kseed_kernels.backends import cpu as C

    ts = [(torch.randn(n, generator=gen) * 0.05).to(DTYPES[i % 3]) for i, n in enumerate(SIZES)]
    streams = [int(x) for x in torch.randint(0, 2**32, (len(ts),), generator=gen)]
    seeds = random_seeds(gen, k)
    C.set_isa(isa)
    try:
        for t, st in zip(ts, streams):
            got = kk.project_seeds(t, seeds, stream=st, noise=noise, backend="cpu")
            want = kk.project_seeds(t, seeds, stream=st, noise=noise, backend="reference")
            assert torch.equal(bits(got), bits(want)), (isa, t.dtype, t.numel(), k)
        got = kk.project_seeds_multi(ts, streams, seeds, noise=noise, backend="cpu")
        want = kk.project_seeds_multi(ts, streams, seeds, noise=noise, backend="reference")
        assert torch.equal(bits(got), bits(want)), (isa, "multi", k)
    finally:
        C.set_isa(None)


@needs_cpu
@pytest.mark.parametrize("noise", NOISES)
def test_cpu_non_contiguous_and_special_values(gen, noise):
    base = torch.randn(70, 90, generator=gen)
    views = [base.t(), base[::3, 1::2], base.to(torch.float16).t()[5:]]
    seeds = random_seeds(gen, 5)
    for v in views:
        assert not v.is_contiguous()
        got = kk.project_seeds(v, seeds, stream=3, noise=noise)
        want = kk.project_seeds(v.contiguous(), seeds, stream=3, noise=noise, backend="reference")
        assert torch.equal(bits(got), bits(want))
    # huge, tiny (subnormal products), signed zeros, inf and NaN propagate as in the reference
    x = torch.randn(B + 50, generator=gen)
    x[:10] = torch.tensor([3e38, -3e38, 1e-40, -1e-40, 0.0, -0.0, 1e-30, 2e30, 5.0, -5.0])
    for extra in (None, float("inf"), float("nan")):
        y = x.clone()
        if extra is not None:
            y[B + 7] = extra
        got = kk.project_seeds(y, seeds, stream=4, noise=noise, backend="cpu")
        want = kk.project_seeds(y, seeds, stream=4, noise=noise, backend="reference")
        assert same_bits(got, want)


@needs_cpu
@pytest.mark.parametrize("noise", NOISES)
def test_cpu_threads_and_chunks_do_not_matter(gen, noise):
    """1, 2 or 3 threads, and chunks of 1, 3 or all blocks between the float64 additions (the chunk is
    bounded by the CPU tile setting): the same bits."""
    ops = torch.ops.kseed
    ts = [torch.randn(7 * B + 11, generator=gen), torch.randn(3 * B, generator=gen).to(torch.bfloat16)]
    seeds = random_seeds(gen, 11)
    prev, tile = torch.get_num_threads(), ops.cpu_tile_elems()
    try:
        out = []
        for n, t in ((1, tile), (2, tile), (3, tile), (2, 1), (2, 3)):
            torch.set_num_threads(n)
            ops.set_cpu_tile_elems(t)
            out.append(kk.project_seeds_multi(ts, [8, 9], seeds, noise=noise, backend="cpu"))
    finally:
        torch.set_num_threads(prev)
        ops.set_cpu_tile_elems(tile)
    assert all(torch.equal(bits(o), bits(out[0])) for o in out)
    want = kk.project_seeds_multi(ts, [8, 9], seeds, noise=noise, backend="reference")
    assert torch.equal(bits(out[0]), bits(want))


@needs_cpu
def test_cpu_comparison_can_fail(gen):
    x = torch.randn(3000, generator=gen)
    seeds = random_seeds(gen, 3)
    got = kk.project_seeds(x, seeds, stream=1, backend="cpu")
    other = seeds.clone()
    other[1] ^= 1
    assert not torch.equal(bits(got), bits(kk.project_seeds(x, other, stream=1, backend="reference")))
    assert not torch.equal(bits(got), bits(kk.project_seeds(x, seeds, stream=2, backend="reference")))
    assert not torch.equal(bits(got), bits(kk.project_seeds(x, seeds, stream=1, noise="rademacher",
                                                            backend="reference")))


# --------------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
@pytest.mark.parametrize("noise", NOISES)
def test_transpose_identity(gen, backend, noise):
    """<apply(0, seeds, c), x> = sum_k c_k project(x)_k, within float tolerance."""
    n, k = 3 * B + 77, 6
    x = torch.randn(n, generator=gen)
    seeds = random_seeds(gen, k)
    c = torch.randn(k, generator=gen)
    u = kk.apply_seeds(torch.zeros(n), seeds, c, stream=12, noise=noise, backend=backend)
    lhs = (u.double() * x.double()).sum()
    p = kk.project_seeds(x, seeds, stream=12, noise=noise, backend=backend)
    rhs = (c.double() * p.double()).sum()
    scale = (u.double().abs() * x.double().abs()).sum()
    assert abs(lhs - rhs) <= 1e-5 * scale
    assert abs(lhs) > 1e-3 * scale or abs(lhs - (c.double() * p.double().flip(0)).sum()) > 1e-5 * scale


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
def test_single_is_multi_and_edge_cases(gen, backend):
    x = torch.randn(2 * B + 1, generator=gen).to(torch.bfloat16)
    seeds = random_seeds(gen, 4)
    one = kk.project_seeds(x, seeds, stream=77, backend=backend)
    multi = kk.project_seeds_multi([x], [77], seeds, backend=backend)
    assert one.dtype == torch.float32 and one.shape == (4,) and torch.equal(bits(one), bits(multi))
    # int seeds in [0, 2^64) and the int64 tensor of the same bits agree
    assert torch.equal(bits(kk.project_seeds(x, _u64(seeds), stream=77, backend=backend)), bits(one))
    # empty tensors contribute nothing; K = 0, an empty list or only empty tensors
    e = torch.empty(0)
    assert torch.equal(bits(kk.project_seeds_multi([e, x, e], [1, 77, 2], seeds, backend=backend)),
                       bits(one))
    assert kk.project_seeds(x, [], backend=backend).shape == (0,)
    assert torch.equal(kk.project_seeds(e, seeds, backend=backend), torch.zeros(4))
    assert torch.equal(kk.project_seeds_multi([], [], seeds, backend=backend), torch.zeros(4))
    # only read: an inference tensor, a tensor that requires grad, tensors sharing memory
    with torch.inference_mode():
        xi = x.clone()
    assert torch.equal(bits(kk.project_seeds(xi, seeds, stream=77, backend=backend)), bits(one))
    xg = x.float().requires_grad_()
    assert not kk.project_seeds(xg, seeds, stream=77, backend=backend).requires_grad
    both = kk.project_seeds_multi([x, x[:5]], [77, 3], seeds, backend=backend)
    assert both.shape == (4,)


def test_bad_arguments():
    x = torch.randn(10)
    with pytest.raises(TypeError, match="tensor must be a torch.Tensor"):
        kk.project_seeds([1.0, 2.0], [1])
    with pytest.raises(TypeError, match="tensor must be float32, bfloat16 or float16"):
        kk.project_seeds(torch.ones(3, dtype=torch.int32), [1])
    with pytest.raises(TypeError, match=r"seeds\[0\] must be an int"):
        kk.project_seeds(x, [1.5])
    with pytest.raises(ValueError, match=r"seeds\[0\] = -1 is outside"):
        kk.project_seeds(x, [-1])
    with pytest.raises(ValueError, match="seeds must be 1-d"):
        kk.project_seeds(x, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="stream must be in"):
        kk.project_seeds(x, [1], stream=2**32)
    with pytest.raises(ValueError, match="noise must be one of"):
        kk.project_seeds(x, [1], noise="uniform")
    with pytest.raises(ValueError, match="unknown backend"):
        kk.project_seeds(x, [1], backend="nope")
    with pytest.raises(TypeError, match="tensors must be a sequence of tensors"):
        kk.project_seeds_multi(x, [1], [1])
    with pytest.raises(TypeError, match=r"tensors\[1\] must be a torch.Tensor"):
        kk.project_seeds_multi([x, 3], [1, 2], [1])
    with pytest.raises(ValueError, match="tensors and streams must have the same length"):
        kk.project_seeds_multi([x, x], [1], [1])
    with pytest.raises(ValueError, match=r"streams\[1\] must be in"):
        kk.project_seeds_multi([x, x], [1, -2], [1])
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        kk.project_seeds_multi([x, x.to("meta")], [1, 2], [1])


@needs_cpu
def test_op_errors_are_python_errors():
    """A direct torch.ops.kseed.project_seeds call gets clear TypeError / ValueError too."""
    op = torch.ops.kseed.project_seeds
    s = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(TypeError, match="seeds must be an int64 tensor"):
        op([torch.randn(3)], [0], s.float())
    with pytest.raises(TypeError, match=r"tensors\[0\] must be float32"):
        op([torch.ones(3, dtype=torch.int64)], [0], s)
    with pytest.raises(ValueError, match=r"tensors\[0\] must be contiguous"):
        op([torch.randn(4, 4).t()], [0], s)
    with pytest.raises(ValueError, match="tensors and streams must have the same length"):
        op([torch.randn(3)], [0, 1], s)
    with pytest.raises(ValueError, match=r"streams\[0\] must be in"):
        op([torch.randn(3)], [2**32], s)
    with pytest.raises(ValueError, match="noise must be"):
        op([torch.randn(3)], [0], s, 2)


@pytest.mark.skipif("cuda" not in kk.backends(), reason="no CUDA GPU, or kseed_kernels._C has no CUDA kernels")
@pytest.mark.parametrize("noise", NOISES)
def test_cuda_matches_cpu(gen, noise):
    """On a GPU: the CUDA kernels bitwise against the CPU backend, the result on the tensors' device."""
    ts = [(torch.randn(n, generator=gen) * 0.05).to(DTYPES[i % 3]) for i, n in enumerate(SIZES)]
    streams = [int(x) for x in torch.randint(0, 2**32, (len(ts),), generator=gen)]
    for k in (1, 65, 300):
        seeds = random_seeds(gen, k)
        want = kk.project_seeds_multi(ts, streams, seeds, noise=noise, backend="cpu")
        got = kk.project_seeds_multi([t.cuda() for t in ts], streams, seeds, noise=noise, backend="cuda")
        assert got.device.type == "cuda" and torch.equal(bits(got), bits(want)), k
