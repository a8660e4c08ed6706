"""Issue 24's kernel and op items, each on every backend available here:

* autograd: every op that writes a tensor bumps its version counter (the public ops, the direct
  torch.ops.kseed calls and the Triton launcher), so backward() through a saved tensor that an op then
  changed raises; a direct op refuses to write a leaf that requires grad while grad mode is on;
* subnormals are IEEE whatever the process's flush-to-zero mode (torch.set_flush_denormal(True)), and the
  mode is the process's own again afterwards;
* bad tensors (expanded, sparse) and a coefficient too large for a float get ValueError / TypeError
  before any computation;
* the overlap checks compare elements, not byte spans: disjoint interleaved views of one storage are
  accepted, and ModelSeeds works over a flat parameter buffer;
* a seed read from an int64 tensor is its uint64 bits for every op that takes a seed.

The Triton backend runs in a child process with TRITON_INTERPRET=1 (``python tests/test_ops_review.py
--triton-child``, as tests/test_triton.py does): small sizes.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import kseed_kernels as kk
from kseed_kernels import ModelSeeds
from kseed_kernels._ieee import flushes_subnormals

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bitwise import same_bits  # noqa: E402

BACKENDS = [b for b in kk.backends() if b in ("reference", "cpu")]
HAS_CPU = "cpu" in kk.backends()
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="kseed_kernels._C is not built")
WRITING_OPS = ("gaussian_", "rademacher_", "apply_seeds_", "apply_seeds_multi_", "apply_seeds_out",
               "apply_seeds_multi_out")


# ------------------------------------------------------------------------------------- autograd
def _saved_then_applied(backend, how):
    """The issue's repro: autograd saves w, an op changes w under no_grad, backward() must raise."""
    x = torch.randn(4, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    y = (w * x).sum()
    v = w._version
    with torch.no_grad():
        if how == "inplace":
            kk.apply_seeds_(w, [1], [1.0], backend=backend)
        elif how == "multi":
            kk.apply_seeds_multi_([w, torch.randn(3)], [1, 2], [1], [1.0], backend=backend)
        else:
            kk.apply_seeds(torch.randn(4), [1], [1.0], out=w, backend=backend)
    assert w._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("how", ["inplace", "multi", "out"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_through_applied_weight_raises(backend, how):
    _saved_then_applied(backend, how)


@needs_cpu
def test_direct_ops_bump_written_versions_only():
    ops = torch.ops.kseed
    s, c = torch.tensor([1, -5]), torch.tensor([0.5, -0.25])
    a, b, base = torch.randn(5), torch.randn(3), torch.randn(5)
    ops.gaussian_(a, 1, 0, 0)
    ops.rademacher_(b, 1, 0, 0)
    assert (a._version, b._version) == (1, 1)
    ops.apply_seeds_(a, s, c, 0, 0, 0, 0)
    ops.apply_seeds_multi_([a, b], [0, 1], s, c, 0, 0, 1)
    assert (a._version, b._version) == (3, 2)
    out = torch.empty(5)
    ops.apply_seeds_out(base, out, s, c, 0, 0, 0, 0)
    ops.apply_seeds_multi_out([base, base], [out, a], [0, 1], s, c, 0, 0, 0)
    assert (out._version, a._version, base._version, b._version) == (2, 4, 0, 2)
    # a failing call changes nothing, its version included
    with pytest.raises(ValueError, match="noise"):
        ops.apply_seeds_(a, s, c, 0, 0, 0, 7)
    assert a._version == 4
    # inference tensors have no version counter: written inside inference_mode as before
    with torch.inference_mode():
        t = torch.zeros(3)
        ops.apply_seeds_(t, s, c, 0, 0, 0, 0)
    assert t.abs().sum() > 0


@needs_cpu
@pytest.mark.parametrize("op", WRITING_OPS)
def test_direct_op_refuses_tensors_requiring_grad_in_grad_mode(op):
    s, c = torch.tensor([1]), torch.tensor([1.0])
    leaf = torch.randn(4, requires_grad=True)
    nonleaf = torch.randn(4, requires_grad=True) * 2
    f = getattr(torch.ops.kseed, op)

    def call(t, base=None):
        base = torch.randn(4) if base is None else base
        return {"gaussian_": lambda: f(t, 1, 0, 0), "rademacher_": lambda: f(t, 1, 0, 0),
                "apply_seeds_": lambda: f(t, s, c, 0, 0, 0, 0),
                "apply_seeds_multi_": lambda: f([t], [0], s, c, 0, 0, 0),
                "apply_seeds_out": lambda: f(base, t, s, c, 0, 0, 0, 0),
                "apply_seeds_multi_out": lambda: f([base], [t], [0], s, c, 0, 0, 0)}[op]()

    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        call(leaf)
    assert torch.equal(leaf.detach(), before) and leaf._version == 0
    with pytest.raises(RuntimeError, match="not differentiable"):
        call(nonleaf)
    if op.endswith("_out"):  # a base that requires grad: torch refuses out= ops the same way
        with pytest.raises(RuntimeError, match="not differentiable"):
            call(torch.empty(4), base=torch.randn(4, requires_grad=True))
    with torch.no_grad():
        call(leaf)
    assert leaf._version == 1 and not torch.equal(leaf.detach(), before)


# ------------------------------------------------------------------------------- flush-to-zero
class _FlushDenormal:
    """torch.set_flush_denormal(True) for the block (skips where the CPU has no such mode); checks that
    the mode is still on at the end (the op restored it), then turns it off."""

    def __enter__(self):
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU has no flush-to-zero mode")
        assert flushes_subnormals()
        return self

    def __exit__(self, *exc):
        still = flushes_subnormals()
        torch.set_flush_denormal(False)
        assert not flushes_subnormals()
        if exc[0] is None:
            assert still, "the op did not restore the process's flush-to-zero mode"


def _f32(x: float) -> float:
    """x rounded to float32 (call it with the mode off)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _spec_subnormals(seeds, coefs, n, stream=0):
    """The spec's values of 0 + sum_k coefs[k] z_k for tiny coefs, by exact float64 arithmetic rounded
    once to float32 per operation (numpy, with the mode off): c * z of two float32 values is exact in
    float64, and so is the sum of two float32 values."""
    assert not flushes_subnormals()
    acc = np.zeros(n, dtype=np.float32)
    for s, c in zip(seeds, coefs):
        z = kk.gaussian(s, n, stream=stream, backend="reference").numpy().astype(np.float64)
        term = (np.float64(np.float32(c)) * z).astype(np.float32)
        acc = (acc.astype(np.float64) + term.astype(np.float64)).astype(np.float32)
    return torch.from_numpy(acc)


def test_flush_probe_reads_the_mode():
    assert not flushes_subnormals()
    with _FlushDenormal():
        pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_subnormals_whatever_the_flush_mode(backend, gen):
    seeds = [1, 2**64 - 5, 77]
    coefs = [1e-40, -3e-39, 2.5e-41]
    want = _spec_subnormals(seeds, coefs, 300, stream=5)
    sub = (want != 0) & (want.abs() < 2.0 ** -126)
    assert int(sub.sum()) > 250  # the case is about subnormals
    wbf = (torch.randn(300, generator=gen) * 1e-39).to(torch.bfloat16)  # subnormal bf16 weights
    with torch.no_grad():
        want_bf = kk.apply_seeds_(wbf.clone(), seeds, coefs, stream=5, backend="reference")
        want_sr = kk.apply_seeds_(wbf.clone(), seeds, coefs, stream=5, backend="reference",
                                  rounding="stochastic")
    with _FlushDenormal():
        a = kk.apply_seeds_(torch.zeros(300), seeds, coefs, stream=5, backend=backend)
        b = kk.apply_seeds(torch.zeros(300), seeds, torch.tensor(coefs, dtype=torch.float64),
                           stream=5, backend=backend)
        m = kk.apply_seeds_multi_([torch.zeros(300), torch.zeros(10)], [5, 6], seeds, coefs,
                                  backend=backend)
        c = kk.apply_seeds_(wbf.clone(), seeds, coefs, stream=5, backend=backend)
        d = kk.apply_seeds_(wbf.clone(), seeds, coefs, stream=5, backend=backend,
                            rounding="stochastic")
        e = kk.apply_seeds_(torch.zeros(8), [1], [1e-40], backend=backend)  # the repro
    assert same_bits(a, want) and same_bits(b, want) and same_bits(m[0], want)
    assert same_bits(c, want_bf) and same_bits(d, want_sr)
    assert same_bits(e, _spec_subnormals([1], [1e-40], 8)) and bool((e != 0).all())


@needs_cpu
def test_direct_cpu_op_subnormals_whatever_the_flush_mode():
    s, c = torch.tensor([3, 4]), torch.tensor([1e-40, 2e-39], dtype=torch.float32)
    n = 20000  # several tiles, possibly several threads
    want = _spec_subnormals([3, 4], [1e-40, 2e-39], n)
    with _FlushDenormal():
        t = torch.zeros(n)
        torch.ops.kseed.apply_seeds_(t, s, c, 0, 0, 0, 0)
    assert same_bits(t, want)


def test_coefs_round_to_float32_subnormals_in_flush_mode():
    with _FlushDenormal():
        c = kk.ops.normalize_coefs([1e-40, -2.5e-41, 1.0], 3)
        d = kk.ops.normalize_coefs(torch.tensor([1e-40, -2.5e-41, 1.0], dtype=torch.float64), 3)
    want = torch.tensor([_f32(1e-40), _f32(-2.5e-41), 1.0], dtype=torch.float32)
    assert same_bits(c, want) and same_bits(d, want) and want[0] != 0


# ------------------------------------------------------------------------------------ bad tensors
@pytest.fixture
def no_compute(monkeypatch):
    """Makes any backend call fail the test: the refusals come before any computation."""
    def boom(*a, **k):
        raise AssertionError("a backend ran before the bad input was refused")
    monkeypatch.setattr(kk.ops, "_run", boom)


def test_expanded_tensor_refused_up_front(no_compute):
    e = torch.randn(3, 1).expand(3, 4)
    with pytest.raises(ValueError, match=r"tensor has elements that share memory"):
        kk.apply_seeds_(e, [1], [1.0])
    with pytest.raises(ValueError, match=r"tensors\[1\] has elements that share memory"):
        kk.apply_seeds_multi_([torch.randn(4), e], [0, 1], [1], [1.0])
    with pytest.raises(ValueError, match=r"out has elements that share memory"):
        kk.apply_seeds(torch.randn(3, 4), [1], [1.0], out=e)
    # an as_strided view whose elements overlap is refused too; a non-separable one that does not
    # overlap (offsets 0, 2, 3, 5) is accepted
    with pytest.raises(ValueError, match="share memory"):
        kk.apply_seeds_(torch.randn(20).as_strided((3, 3), (2, 1)), [1], [1.0])


def test_expanded_base_is_fine(gen):
    base = torch.randn(3, 1, generator=gen).expand(3, 4)  # only read
    out = kk.apply_seeds(base, [1], [0.5])
    assert same_bits(out, kk.apply_seeds(base.contiguous(), [1], [0.5], backend="reference"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_nonoverlapping_strided_write(backend, gen):
    flat = torch.randn(20, generator=gen)
    v = flat.as_strided((2, 2), (3, 2))  # offsets 0, 2, 3, 5: no two elements meet
    want = kk.apply_seeds_(v.contiguous(), [1], [0.5], backend="reference")
    kk.apply_seeds_(v, [1], [0.5], backend=backend)
    assert same_bits(v, want)


def test_sparse_tensors_refused_by_name(no_compute):
    sp = torch.randn(4).to_sparse()
    with pytest.raises(TypeError, match="tensor must be a dense.*sparse"):
        kk.apply_seeds_(sp, [1], [1.0])
    with pytest.raises(TypeError, match="base must be a dense.*sparse"):
        kk.apply_seeds(sp, [1], [1.0])
    with pytest.raises(TypeError, match=r"tensors\[0\] must be a dense.*sparse"):
        kk.apply_seeds_multi_([sp], [0], [1], [1.0])
    with pytest.raises(TypeError, match="seeds must be a dense"):
        kk.apply_seeds_(torch.randn(4), torch.tensor([1]).to_sparse(), [1.0])
    with pytest.raises(TypeError, match="coefs must be a dense"):
        kk.apply_seeds_(torch.randn(4), [1], torch.tensor([1.0]).to_sparse())


def test_huge_integer_coefficient_refused(no_compute):
    w = torch.randn(4)
    with pytest.raises(ValueError, match=r"coefs\[1\]"):
        kk.apply_seeds_(w, [1, 2], [1.0, 10**400])
    with pytest.raises(ValueError, match="coefs"):
        kk.apply_seeds(w, [1], [-10**400])


# ---------------------------------------------------------------------------------- overlap check
@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_strided_views_of_one_storage(backend, gen):
    w = torch.randn(6, 8, generator=gen)
    ref = w.clone()
    cols = [(slice(None), 0), (slice(None), 1)]
    kk.apply_seeds_multi_([w[cols[0]], w[cols[1]]], [3, 4], [5, 6], [0.5, -1.0], backend=backend)
    for st, ix in zip((3, 4), cols):
        ref[ix] = kk.apply_seeds_(ref[ix].clone(), [5, 6], [0.5, -1.0], stream=st, backend="reference")
    assert same_bits(w, ref)
    # even and odd columns, column blocks, out= into another column
    kk.apply_seeds_multi_([w[:, 0::2], w[:, 1::2], ], [1, 2], [7], [0.25], backend=backend)
    kk.apply_seeds_multi_([w[:, :3], w[:, 3:5], w[:, 5:]], [1, 2, 3], [7], [0.25], backend=backend)
    for ix, st in (((slice(None), slice(0, None, 2)), 1), ((slice(None), slice(1, None, 2)), 2)):
        ref[ix] = kk.apply_seeds_(ref[ix].clone(), [7], [0.25], stream=st, backend="reference")
    for ix, st in (((slice(None), slice(0, 3)), 1), ((slice(None), slice(3, 5)), 2),
                   ((slice(None), slice(5, None)), 3)):
        ref[ix] = kk.apply_seeds_(ref[ix].clone(), [7], [0.25], stream=st, backend="reference")
    assert same_bits(w, ref)
    kk.apply_seeds(w[:, 0], [9], [2.0], out=w[:, 1], backend=backend)
    ref[:, 1] = kk.apply_seeds(ref[:, 0].clone(), [9], [2.0], backend="reference")
    assert same_bits(w, ref)


def test_overlapping_views_still_refused():
    w = torch.randn(6, 8)
    for a, b in ((w[:, 0:3], w[:, 2:4]), (w[:, 0::2], w[:, 0::3]), (w[1:], w[:, 1]),
                 (w.view(-1)[1::2], w[:, 3])):
        with pytest.raises(ValueError, match="overlap"):
            kk.apply_seeds_multi_([a, b], [0, 1], [1], [1.0])
        with pytest.raises(ValueError, match="overlap"):  # out= a view that meets a base
            kk.apply_seeds_multi([a.clone(), b], [0, 1], [1], [1.0], outs=[a, b.clone()])
    # a bfloat16 view and a float32 view of one storage, disjoint by bytes or not
    raw = torch.zeros(16)
    lo, hi = raw[:8], raw[8:].view(torch.bfloat16)
    kk.apply_seeds_multi_([lo, hi], [0, 1], [1], [1.0])
    with pytest.raises(ValueError, match="overlap"):
        kk.apply_seeds_multi_([raw[:9], hi], [0, 1], [1], [1.0])


def _flat_model(gen, dtype):
    shapes = {"emb": (7, 5), "l0.w": (5, 5), "l0.b": (5,), "l1.w": (3, 5), "head": (4,)}
    flat = torch.randn(sum(int(np.prod(s)) for s in shapes.values()), generator=gen).to(dtype)
    views, o = [], 0
    for name, s in shapes.items():
        n = int(np.prod(s))
        views.append((name, flat[o:o + n].view(s)))
        o += n
    return flat, views


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_seeds_over_a_flat_buffer(backend, dtype, gen):
    flat, views = _flat_model(gen, dtype)
    sep = [(n, t.clone()) for n, t in views]  # the same weights in separate tensors
    ms = ModelSeeds(views, backend=backend, rounding="stochastic")
    ref = ModelSeeds(sep, backend="reference", rounding="stochastic")
    bases = [(torch.randn(t.shape, generator=gen) * 0.1).to(dtype) for _, t in sep]
    for m in (ms, ref):
        m.perturb(2**64 - 3, 0.01)
        m.apply([5, 6], [0.5, -0.25])
        m.zo_step(11, lambda: float(sum(p.float().sum() for p in m.params)), eps=1e-3, lr=1e-2,
                  next_seed=12)
        m.apply([8], [0.5])
        m.apply_from(bases, [7], [0.125])
    for (_, v), (_, s) in zip(views, sep):
        assert same_bits(v, s)
    assert same_bits(flat, torch.cat([s.reshape(-1) for _, s in sep]))


def test_model_seeds_refuses_overlapping_views():
    big = torch.randn(10)
    with pytest.raises(ValueError, match="overlap"):
        ModelSeeds([("x", big[:5]), ("y", big[4:])])
    flat = torch.randn(12)
    ms = ModelSeeds([("x", flat[:6]), ("y", flat[6:])])
    with pytest.raises(ValueError, match="overlap"):
        ms.apply_from([flat[6:].clone(), flat[:6]], [1], [1.0])  # a base that is a parameter


# ------------------------------------------------------------------------------------ seeds
@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_from_int64_tensor_is_its_uint64_bits(backend):
    st = torch.tensor([-5, 3], dtype=torch.int64)
    u = 2**64 - 5
    assert torch.equal(kk.gaussian(st[0], 9, backend=backend), kk.gaussian(u, 9, backend=backend))
    assert torch.equal(kk.rademacher(st[0], 40, backend=backend),
                       kk.rademacher(u, 40, backend=backend))
    assert torch.equal(kk.gaussian(np.int64(-5), 9, backend=backend),
                       kk.gaussian(u, 9, backend=backend))
    a, b, c = torch.zeros(6), torch.zeros(6), torch.zeros(6)
    ModelSeeds([("w", a)], backend=backend).perturb(st[0], 1.0)
    ModelSeeds([("w", b)], backend=backend).apply(st[:1], [1.0])
    ModelSeeds([("w", c)], backend=backend).apply(np.array([-5], dtype=np.int64), [1.0])
    assert torch.equal(a, b) and torch.equal(a, c) and a.abs().sum() > 0
    d, e = torch.zeros(6), torch.zeros(6)
    ModelSeeds([("w", d)], backend=backend).zo_step(st[0], lambda: float(d.sum()), eps=0.1, lr=0.1,
                                                    next_seed=st[1])
    ModelSeeds([("w", e)], backend=backend).zo_step(u, lambda: float(e.sum()), eps=0.1, lr=0.1,
                                                    next_seed=3)
    assert torch.equal(d, e)
    # the documented refusals stay: a negative Python int, a negative int32 tensor value
    with pytest.raises(ValueError, match=r"2\^64"):
        kk.gaussian(-5, 3)
    with pytest.raises(ValueError, match=r"2\^64"):
        kk.gaussian(torch.tensor(-5, dtype=torch.int32), 3)
    with pytest.raises(TypeError, match="seed"):
        kk.gaussian(torch.tensor(1.0), 3)


# ------------------------------------------------------------------------- Triton (interpreter)
def _triton_child() -> dict:
    import kseed_kernels as kk  # noqa: F811  (TRITON_INTERPRET=1 is set before triton loads)

    out = {}

    def case(name, fn):
        try:
            fn()
            out[name] = "ok"
        except BaseException as exc:  # noqa: BLE001  (reported to the parent)
            out[name] = f"{type(exc).__name__}: {exc}"

    def versions():
        for how in ("inplace", "multi", "out"):
            _saved_then_applied("triton", how)

    def subnormals():
        seeds, coefs = [1, 2**64 - 5], [1e-40, -3e-39]
        want = _spec_subnormals(seeds, coefs, 64, stream=5)
        with _FlushDenormal():
            a = kk.apply_seeds_(torch.zeros(64), seeds, coefs, stream=5, backend="triton")
        assert same_bits(a, want), "subnormals flushed"

    def flat_buffer():
        gen = torch.Generator().manual_seed(5)
        flat, views = _flat_model(gen, torch.float32)
        sep = [(n, t.clone()) for n, t in views]
        ms, ref = ModelSeeds(views, backend="triton"), ModelSeeds(sep, backend="reference")
        for m in (ms, ref):
            m.perturb(2**64 - 3, 0.01)
            m.apply([5, 6], [0.5, -0.25])
        assert all(same_bits(v, s) for (_, v), (_, s) in zip(views, sep)), "flat buffer differs"

    case("versions", versions)
    case("subnormals", subnormals)
    case("flat_buffer", flat_buffer)
    return out


@pytest.fixture(scope="module")
def triton_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"), HERE,
                                           os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--triton-child"], env=env,
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["versions", "subnormals", "flat_buffer"])
def test_triton_interpreter(triton_results, name):
    assert triton_results[name] == "ok", triton_results[name]


if __name__ == "__main__" and sys.argv[1:] == ["--triton-child"]:
    print(json.dumps(_triton_child()))


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_project_subnormals_whatever_the_flush_mode(backend, noise, gen):
    """project_seeds reads subnormal inputs and makes subnormal sums (products of subnormal x with z,
    and the final float32 rounding): the spec's bits whatever the process's flush-to-zero mode."""
    seeds = [3, 2**64 - 9, 12345]
    x = torch.randn(5000, generator=gen) * 1e-41  # subnormal float32, and so are the sums
    y = torch.randn(70, generator=gen) * 1e-41
    want = kk.project_seeds_multi([x, y], [5, 6], seeds, noise=noise, backend="reference")
    assert bool((want != 0).all()) and bool((want.abs() < 2.0 ** -126).all())  # subnormal results
    with _FlushDenormal():
        got = kk.project_seeds_multi([x, y], [5, 6], seeds, noise=noise, backend=backend)
        ref = kk.project_seeds_multi([x, y], [5, 6], seeds, noise=noise, backend="reference")
    assert same_bits(got, want) and same_bits(ref, want)
