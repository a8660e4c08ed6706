"""The public API: names, argument checking with clear errors, semantics of edge cases."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import kseed_kernels
from kseed_kernels import apply_seeds_, apply_seeds_multi_, gaussian

from conftest import ROOT, cpu_backends

BACKENDS = ["reference"] + cpu_backends()


def test_public_names():
    for name in ("philox4x32_10", "gaussian", "apply_seeds_", "apply_seeds_multi_", "apply_seeds",
                 "apply_seeds_multi", "stream_id", "backends"):
        assert callable(getattr(kseed_kernels, name))
    b = kseed_kernels.backends()
    assert "reference" in b and isinstance(b, list)


def test_stream_id_is_sha256_prefix_and_process_independent():
    name = "model.layers.0.self_attn.q_proj.weight"
    want = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    assert kseed_kernels.stream_id(name) == want
    assert kseed_kernels.stream_id("é") == int.from_bytes(hashlib.sha256("é".encode()).digest()[:4], "little")
    code = f"import kseed_kernels; print(kseed_kernels.stream_id({name!r}))"
    outs = set()
    for hs in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hs, PYTHONPATH=ROOT)
        outs.add(subprocess.check_output([sys.executable, "-c", code], env=env, text=True).strip())
    assert outs == {str(want)}
    with pytest.raises(TypeError, match="name"):
        kseed_kernels.stream_id(3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k0_is_a_noop(backend):
    w = torch.tensor([-0.0, 1.5, float("nan")])
    before = w.clone()
    out = apply_seeds_(w, [], [], backend=backend)
    assert out is w
    assert torch.equal(w.view(torch.int32), before.view(torch.int32))
    apply_seeds_(w, torch.empty(0, dtype=torch.int64), torch.empty(0), backend=backend)
    assert torch.equal(w.view(torch.int32), before.view(torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_tensor_uses_row_major_index(backend, gen):
    base = torch.randn(6, 10, generator=gen)
    view = base.t()  # 10 x 6, not contiguous
    want = view.contiguous()
    apply_seeds_(want, [3, 4], [0.5, -0.25], stream=2, backend=backend)
    apply_seeds_(view, [3, 4], [0.5, -0.25], stream=2, backend=backend)
    assert torch.equal(view, want)
    assert torch.equal(base, want.t())
    # a strided slice: the other elements stay untouched
    base2 = torch.randn(20, generator=gen)
    keep = base2[1::2].clone()
    want2 = apply_seeds_(base2[::2].clone(), [9], [1.0], backend="reference")
    apply_seeds_(base2[::2], [9], [1.0], backend=backend)
    assert torch.equal(base2[1::2], keep)
    assert torch.equal(base2[::2], want2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_with_grad_is_updated_in_place(backend, gen):
    p = torch.nn.Parameter(torch.randn(7, generator=gen))
    ref = p.detach().clone()
    apply_seeds_(p, [1], [0.1], backend=backend)
    apply_seeds_(ref, [1], [0.1], backend="reference")
    assert torch.equal(p.detach(), ref)


def test_seed_forms_agree(gen):
    w = torch.randn(50, generator=gen)
    big = (1 << 64) - 3
    a = apply_seeds_(w.clone(), [big, 5], [0.1, 0.2])
    b = apply_seeds_(w.clone(), torch.tensor([big - (1 << 64), 5]), torch.tensor([0.1, 0.2]))
    c = apply_seeds_(w.clone(), np.array([big, 5], dtype=np.uint64), np.array([0.1, 0.2]))
    d = apply_seeds_(w.clone(), torch.tensor([big, 5], dtype=torch.uint64), [0.1, 0.2])
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def test_coefs_are_rounded_to_float32(gen):
    w = torch.randn(50, generator=gen)
    a = apply_seeds_(w.clone(), [1], [0.1])
    b = apply_seeds_(w.clone(), [1], torch.tensor([0.1], dtype=torch.float64))
    c = apply_seeds_(w.clone(), [1], torch.tensor([0.1], dtype=torch.float32))
    assert torch.equal(a, b) and torch.equal(a, c)


BAD_APPLY = [
    (dict(seeds=[1.5], coefs=[1.0]), TypeError, "seeds"),
    (dict(seeds=torch.tensor([1.0]), coefs=[1.0]), TypeError, "seeds"),
    (dict(seeds=[True], coefs=[1.0]), TypeError, "seeds"),
    (dict(seeds=[1, 2], coefs=[1.0]), ValueError, "same length"),
    (dict(seeds=torch.tensor([[1, 2]]), coefs=[1.0, 2.0]), ValueError, "1-d"),
    (dict(seeds=[[1, 2]], coefs=[1.0]), ValueError, "1-d"),
    (dict(seeds=[1], coefs=[float("nan")]), ValueError, "finite"),
    (dict(seeds=[1], coefs=[float("inf")]), ValueError, "finite"),
    (dict(seeds=[1], coefs=[1e39]), ValueError, "finite"),  # overflows float32
    (dict(seeds=[1], coefs=torch.tensor([1])), TypeError, "coefs"),
    (dict(seeds=[1], coefs=torch.tensor([[1.0]])), ValueError, "coefs"),
    (dict(seeds=[1], coefs=["a"]), TypeError, "coefs"),
    (dict(seeds=[-1], coefs=[1.0]), ValueError, r"2\^64"),
    (dict(seeds=[1 << 64], coefs=[1.0]), ValueError, r"2\^64"),
    (dict(seeds=torch.tensor([-1], dtype=torch.int32), coefs=[1.0]), ValueError, "negative"),
    (dict(seeds="123", coefs=[1.0]), TypeError, "seeds"),
    (dict(seeds=[1], coefs=[1.0], backend="nope"), ValueError, "unknown backend"),
    (dict(seeds=[1], coefs=[1.0], rounding="up"), ValueError, "rounding"),
    (dict(seeds=[1], coefs=[1.0], stream=-1), ValueError, "stream"),
    (dict(seeds=[1], coefs=[1.0], stream=1 << 32), ValueError, "stream"),
    (dict(seeds=[1], coefs=[1.0], stream=1.0), TypeError, "stream"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD_APPLY)
def test_apply_bad_input(kwargs, exc, msg):
    w = torch.randn(5)
    before = w.clone()
    with pytest.raises(exc, match=msg):
        apply_seeds_(w, **kwargs)
    assert torch.equal(w, before)


@pytest.mark.parametrize("t", [torch.arange(5), torch.ones(3, dtype=torch.float64),
                               torch.ones(2, dtype=torch.bool), [1.0, 2.0]])
def test_apply_bad_tensor(t):
    with pytest.raises(TypeError, match="tensor"):
        apply_seeds_(t, [1], [1.0])


def test_device_the_backend_cannot_serve():
    t = torch.empty(4, device="meta")
    with pytest.raises(ValueError, match="meta"):
        apply_seeds_(t, [1], [1.0], backend="reference")
    with pytest.raises(ValueError, match="meta"):
        apply_seeds_(t, [1], [1.0])
    if "cpu" in kseed_kernels.backends():
        with pytest.raises(ValueError, match="meta"):
            apply_seeds_(t, [1], [1.0], backend="cpu")


def test_unavailable_backend_is_a_clear_error():
    missing = [b for b in ("cuda", "triton") if b not in kseed_kernels.backends()]
    for b in missing:
        with pytest.raises(ValueError, match=b):
            apply_seeds_(torch.ones(3), [1], [1.0], backend=b)


BAD_GAUSSIAN = [
    (dict(seed=1, numel=-1), ValueError, "numel"),
    (dict(seed=1, numel=2.0), TypeError, "numel"),
    (dict(seed=-1, numel=2), ValueError, "seed"),
    (dict(seed=1 << 64, numel=2), ValueError, "seed"),
    (dict(seed=1.0, numel=2), TypeError, "seed"),
    (dict(seed=1, numel=2, offset=-4), ValueError, "offset"),
    (dict(seed=1, numel=2, stream=1 << 32), ValueError, "stream"),
    (dict(seed=1, numel=2, backend="gpu"), ValueError, "unknown backend"),
    (dict(seed=1, numel=4, offset=(1 << 62) - 2), ValueError, "offset"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD_GAUSSIAN)
def test_gaussian_bad_input(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        gaussian(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_basic(backend):
    z = gaussian(2 ** 63 + 11, 10, stream=2 ** 31 + 1, offset=3, backend=backend)
    assert z.dtype == torch.float32 and z.shape == (10,)
    assert gaussian(1, 0, backend=backend).shape == (0,)
    assert torch.equal(z, gaussian(2 ** 63 + 11, 10, stream=2 ** 31 + 1, offset=3, backend="reference"))
    assert torch.equal(gaussian(torch.tensor(5), 3), gaussian(5, 3))


def test_philox_bad_input():
    good_c, good_k = torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="int64"):
        kseed_kernels.philox4x32_10(good_c.int(), good_k)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        kseed_kernels.philox4x32_10(torch.zeros(2, 3, dtype=torch.int64), good_k)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        kseed_kernels.philox4x32_10(good_c, torch.zeros(2, dtype=torch.int64)[None, :1])
    with pytest.raises(ValueError, match="uint32"):
        kseed_kernels.philox4x32_10(good_c - 1, good_k)
    with pytest.raises(ValueError, match="uint32"):
        kseed_kernels.philox4x32_10(good_c, good_k + (1 << 32))
    with pytest.raises(TypeError, match="counter"):
        kseed_kernels.philox4x32_10([0, 0, 0, 0], good_k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_equals_single(backend, gen):
    ts = [torch.randn(s, generator=gen).to(d) for s, d in
          [((3, 5), torch.float32), ((7,), torch.bfloat16), ((0,), torch.float32), ((2, 2, 3), torch.float16),
           ((1,), torch.float32)]]
    streams = [kseed_kernels.stream_id(f"p{i}") for i in range(len(ts))]
    seeds, coefs = [11, 2 ** 63, 13], [0.3, -0.1, 1e-3]
    for rounding in ("nearest", "stochastic"):
        want = [t.clone() for t in ts]
        for t, s in zip(want, streams):
            apply_seeds_(t, seeds, coefs, stream=s, rounding=rounding, backend="reference")
        got = [t.clone() for t in ts]
        # multi uses one stochastic-rounding key for all tensors: the same as the single calls'
        apply_seeds_multi_(got, streams, seeds, coefs, rounding=rounding, backend=backend)
        for a, b in zip(got, want):
            assert torch.equal(a.float(), b.float())


def test_multi_bad_input():
    a, b = torch.randn(3), torch.randn(4)
    with pytest.raises(ValueError, match="same length"):
        apply_seeds_multi_([a, b], [1], [1], [1.0])
    with pytest.raises(ValueError, match="once"):
        apply_seeds_multi_([a, a], [1, 2], [1], [1.0])
    with pytest.raises(TypeError, match="tensors\\[1\\]"):
        apply_seeds_multi_([a, b.long()], [1, 2], [1], [1.0])
    with pytest.raises(ValueError, match="streams\\[0\\]"):
        apply_seeds_multi_([a], [-5], [1], [1.0])
    with pytest.raises(ValueError, match="one device"):
        apply_seeds_multi_([a, torch.empty(2, device="meta")], [1, 2], [1], [1.0])
    with pytest.raises(TypeError, match="sequence"):
        apply_seeds_multi_(a, [1], [1], [1.0])
    assert apply_seeds_multi_([], [], [1], [1.0]) == []
