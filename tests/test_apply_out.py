"""The out-of-place apply (apply_seeds, apply_seeds_multi; torch.ops.kseed.apply_seeds_out / _multi_out)
against copy + in-place, bitwise, on the reference and on the cpu backend with every SIMD path; and the
inference-tensor rule shared by every backend.  (Triton: tests/test_triton.py; CUDA kernels:
tests/test_cuda_emu.py, and tests/test_cuda.py on a GPU.)
"""
import pytest
import torch

import kseed_kernels as kk
from kseed_kernels.backends import cpu as CPU

from bitwise import bits

HAS_CPU = "cpu" in kk.backends()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROUNDINGS = ("nearest", "stochastic")


def _isas():
    return CPU.supported_isas() if HAS_CPU else []


def _backends():
    """(backend, isa) pairs: the reference, and the cpu backend on each SIMD path this machine runs."""
    out = [("reference", None)]
    out += [("cpu", isa) for isa in _isas()]
    return out


@pytest.fixture(params=_backends(), ids=lambda p: p[0] + ("-" + p[1] if p[1] else ""))
def backend(request):
    name, isa = request.param
    if isa is not None:
        CPU.set_isa(isa)
    yield name
    if isa is not None:
        CPU.set_isa(None)


def _seeds(gen, k):
    s = [int(x) for x in torch.randint(0, 2**62, (k,), generator=gen)]
    if k > 1:
        s[0] = 2**64 - 1
    return s


def _coefs(gen, k):
    return (torch.randn(k, generator=gen) * 1e-2).tolist()


def _same(a, b, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(bits(a), bits(b)), what


def _copy_then_apply(base, seeds, coefs, stream, backend, rounding):
    want = base.detach().clone()
    kk.apply_seeds_(want, seeds, coefs, stream=stream, backend=backend, rounding=rounding)
    return want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("k,n", [(1, 1), (3, 1029), (5, 4096 + 5), (2, 9001)])
def test_equals_copy_then_in_place(backend, gen, dtype, rounding, k, n):
    base = (torch.randn(n, generator=gen) * 3).to(dtype)
    keep = base.clone()
    seeds, coefs = _seeds(gen, k), _coefs(gen, k)
    stream = int(torch.randint(0, 2**32, (1,), generator=gen))
    want = _copy_then_apply(base, seeds, coefs, stream, "reference", rounding)
    out = kk.apply_seeds(base, seeds, coefs, stream=stream, backend=backend, rounding=rounding)
    _same(out, want, "out=None")
    assert out.data_ptr() != base.data_ptr() and out.is_contiguous()
    given = torch.full_like(base, 7.0)
    assert kk.apply_seeds(base, seeds, coefs, out=given, stream=stream, backend=backend,
                          rounding=rounding) is given
    _same(given, want, "out given")
    _same(base, keep, "base unchanged")


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_misaligned(backend, gen, dtype):
    seeds, coefs = _seeds(gen, 3), _coefs(gen, 3)
    cases = [
        (torch.randn(40, 33, generator=gen).to(dtype).t(), None),          # transposed base
        (torch.randn(5000, generator=gen).to(dtype)[1:], None),            # misaligned base
        (torch.randn(64, 70, generator=gen).to(dtype)[:, 3:67], None),     # strided rows
        (torch.randn(5001, generator=gen).to(dtype)[1:],
         torch.empty(5001, dtype=dtype)[1:]),                              # both misaligned
        (torch.randn(4099, generator=gen).to(dtype),
         torch.empty(4100, dtype=dtype)[1:]),                              # misaligned out
        (torch.randn(30, 20, generator=gen).to(dtype),
         torch.empty(20, 30, dtype=dtype).t()),                            # transposed out
    ]
    for rounding in ROUNDINGS:
        for base, out in cases:
            keep = base.clone()
            want = _copy_then_apply(base, seeds, coefs, 77, "reference", rounding)
            got = kk.apply_seeds(base, seeds, coefs, out=out, stream=77, backend=backend,
                                 rounding=rounding)
            _same(got.contiguous(), want.contiguous(), (tuple(base.shape), rounding))
            _same(base, keep, "base unchanged")


def test_k0_copies(backend, gen):
    base = torch.randn(3, 7, generator=gen).to(torch.bfloat16)
    out = kk.apply_seeds(base, [], [], backend=backend)
    _same(out, base)
    assert out.data_ptr() != base.data_ptr()
    outs = kk.apply_seeds_multi([base, base.float()], [1, 2], [], [], backend=backend)
    _same(outs[0], base)
    _same(outs[1], base.float())
    empty = kk.apply_seeds(torch.empty(0, 4), [1], [1.0], backend=backend)
    assert empty.shape == (0, 4)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_multi_equals_copy_then_in_place(backend, gen, rounding):
    sizes = [1, 5, 2048, 2049, 4097, 0, 333, 7]
    bases = [(torch.randn(n, generator=gen) * 2).to(DTYPES[i % 3]) for i, n in enumerate(sizes)]
    bases.append(torch.randn(12, 9, generator=gen).to(torch.float16).t())  # non-contiguous
    keep = [b.clone() for b in bases]
    streams = [int(s) for s in torch.randint(0, 2**32, (len(bases),), generator=gen)]
    seeds, coefs = _seeds(gen, 4), _coefs(gen, 4)
    want = [b.clone() for b in bases]
    kk.apply_seeds_multi_(want, streams, seeds, coefs, backend="reference", rounding=rounding)
    outs = kk.apply_seeds_multi(bases, streams, seeds, coefs, backend=backend, rounding=rounding)
    for o, w, b, k in zip(outs, want, bases, keep):
        _same(o, w, "multi out=None")
        _same(b, k, "base unchanged")
    given = [torch.empty_like(b) for b in bases]
    got = kk.apply_seeds_multi(bases, streams, seeds, coefs, outs=given, backend=backend,
                               rounding=rounding)
    assert all(g is h for g, h in zip(got, given))
    for o, w in zip(given, want):
        _same(o, w, "multi outs given")


def test_stochastic_key_is_the_in_place_key(gen):
    """The same (seeds, coefs) round the same way in and out of place, also when the out list mixes
    float32 (whose rounding needs no key) with 16-bit tensors."""
    bases = [torch.randn(100, generator=gen), torch.randn(100, generator=gen).to(torch.bfloat16)]
    seeds, coefs = _seeds(gen, 3), _coefs(gen, 3)
    outs = kk.apply_seeds_multi(bases, [1, 2], seeds, coefs, backend="reference",
                                rounding="stochastic")
    want = [b.clone() for b in bases]
    kk.apply_seeds_multi_(want, [1, 2], seeds, coefs, backend="reference", rounding="stochastic")
    for o, w in zip(outs, want):
        _same(o, w)


# ------------------------------------------------------------------------------------ bad input
def test_bad_out_arguments():
    b = torch.randn(4, 5)
    with pytest.raises(TypeError, match="base must be a torch.Tensor"):
        kk.apply_seeds([1.0], [1], [1.0])
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        kk.apply_seeds(b, [1], [1.0], out=[0.0])
    with pytest.raises(ValueError, match="shape"):
        kk.apply_seeds(b, [1], [1.0], out=torch.empty(5, 4))
    with pytest.raises(TypeError, match="dtype"):
        kk.apply_seeds(b, [1], [1.0], out=torch.empty(4, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match="device"):
        kk.apply_seeds(b, [1], [1.0], out=torch.empty(4, 5, device="meta"))
    with pytest.raises(ValueError, match="overlap"):
        kk.apply_seeds(b, [1], [1.0], out=b)
    with pytest.raises(ValueError, match="overlap"):
        kk.apply_seeds(b[:, :4], [1], [1.0], out=b[:, 1:])
    with pytest.raises(ValueError, match="coefs must be finite"):
        kk.apply_seeds(b, [1], [float("nan")], out=torch.empty(4, 5))


def test_bad_multi_out_arguments():
    a, c = torch.randn(6), torch.randn(6)
    with pytest.raises(ValueError, match="same length"):
        kk.apply_seeds_multi([a, c], [1, 2], [1], [1.0], outs=[torch.empty(6)])
    with pytest.raises(ValueError, match="same length"):
        kk.apply_seeds_multi([a, c], [1], [1], [1.0])
    with pytest.raises(TypeError, match="bases must be a sequence"):
        kk.apply_seeds_multi(a, [1], [1], [1.0])
    o = torch.empty(6)
    with pytest.raises(ValueError, match=r"outs\[0\] and outs\[1\] overlap"):
        kk.apply_seeds_multi([a, c], [1, 2], [1], [1.0], outs=[o, o])
    with pytest.raises(ValueError, match="overlap"):
        kk.apply_seeds_multi([a, c], [1, 2], [1], [1.0], outs=[torch.empty(6), a])
    with pytest.raises(ValueError, match="one device"):
        kk.apply_seeds_multi([a, torch.empty(6, device="meta")], [1, 2], [1], [1.0])
    with pytest.raises(TypeError, match="dtype"):
        kk.apply_seeds_multi([a], [1], [1], [1.0], outs=[torch.empty(6, dtype=torch.bfloat16)])
    # a base read twice is fine
    outs = kk.apply_seeds_multi([a, a], [1, 1], [1], [1.0])
    _same(outs[0], outs[1])


@pytest.mark.skipif(not HAS_CPU, reason="kseed_kernels._C is not built")
def test_direct_out_op_checks():
    s, c = torch.tensor([1, 2]), torch.tensor([1.0, -1.0])
    b = torch.randn(8)
    ops = torch.ops.kseed
    with pytest.raises(ValueError, match="overlap"):
        ops.apply_seeds_out(b, b, s, c, 0, 0, 0)
    with pytest.raises(ValueError, match="overlap"):
        ops.apply_seeds_out(b[:6], b[2:], s, c, 0, 0, 0)
    with pytest.raises(ValueError, match="shape"):
        ops.apply_seeds_out(b, torch.empty(2, 4), s, c, 0, 0, 0)
    with pytest.raises(TypeError):
        ops.apply_seeds_out(b, torch.empty(8, dtype=torch.float16), s, c, 0, 0, 0)
    with pytest.raises(ValueError, match="contiguous"):
        ops.apply_seeds_out(torch.randn(4, 4).t(), torch.empty(4, 4), s, c, 0, 0, 0)
    with pytest.raises(ValueError, match="same length"):
        ops.apply_seeds_multi_out([b], [], [0], s, c, 0, 0)
    o = torch.empty(8)
    with pytest.raises(ValueError, match="overlap"):
        ops.apply_seeds_multi_out([b, b], [o, o], [0, 1], s, c, 0, 0)
    out = torch.empty(8)
    ops.apply_seeds_out(b, out, s, c, 5, 1, 0)
    want = b.clone()
    ops.apply_seeds_(want, s, c, 5, 1, 0)
    _same(out, want)


# ---------------------------------------------------------------------------- inference tensors
def _inference_tensor(gen, dtype=torch.float32):
    x = torch.randn(50, generator=gen).to(dtype)
    with torch.inference_mode():
        t = x.clone()
    assert t.is_inference()
    return t


def test_inference_tensor_written_only_inside_inference_mode(backend, gen):
    """Every backend follows torch's rule for in-place ops: an inference tensor is refused outside
    torch.inference_mode (ValueError, nothing written) and updated inside it."""
    t = _inference_tensor(gen, torch.bfloat16)
    before = t.clone()
    with pytest.raises(ValueError, match="inference tensor"):
        kk.apply_seeds_(t, [1, 2], [0.1, 0.2], stream=3, backend=backend)
    with pytest.raises(ValueError, match="inference tensor"):
        kk.apply_seeds_multi_([torch.randn(3), t], [1, 3], [1, 2], [0.1, 0.2], backend=backend)
    with pytest.raises(ValueError, match="inference tensor"):
        kk.apply_seeds(torch.randn(50).to(torch.bfloat16), [1], [0.1], out=t, backend=backend)
    _same(t, before, "nothing written")
    want = _copy_then_apply(before, [1, 2], [0.1, 0.2], 3, "reference", "nearest")
    with torch.inference_mode():
        kk.apply_seeds_(t, [1, 2], [0.1, 0.2], stream=3, backend=backend)
        normal = before.clone()
        kk.apply_seeds_(normal, [1, 2], [0.1, 0.2], stream=3, backend=backend)
        out = kk.apply_seeds(before, [1, 2], [0.1, 0.2], stream=3, backend=backend)
    _same(t, want, "inside inference_mode")
    _same(normal, want, "a normal tensor inside inference_mode")
    _same(out, want, "out of place inside inference_mode")
    # An inference tensor is fine as a base: it is only read.
    _same(kk.apply_seeds(t.clone(), [], [], backend=backend), want)


@pytest.mark.skipif(not HAS_CPU, reason="kseed_kernels._C is not built")
def test_direct_ops_refuse_inference_tensors(gen):
    t = _inference_tensor(gen)
    s, c = torch.tensor([1]), torch.tensor([1.0])
    with pytest.raises(ValueError, match="inference tensor"):
        torch.ops.kseed.apply_seeds_(t, s, c, 0, 0, 0)
    with pytest.raises(ValueError, match="inference tensor"):
        torch.ops.kseed.apply_seeds_out(torch.randn(50), t, s, c, 0, 0, 0)
    with pytest.raises(ValueError, match="inference tensor"):
        torch.ops.kseed.gaussian_(t, 0, 0, 0)
    with torch.inference_mode():
        torch.ops.kseed.apply_seeds_(t, s, c, 0, 0, 0)
