"""The Triton kernels compiled ahead of time for real NVIDIA GPUs (sm_90, sm_80), no GPU needed.

tests/test_triton.py checks the kernels' bits in Triton's interpreter, which never runs the GPU compiler.
Here every kernel variant that kseed_kernels/backends/triton launches is compiled to PTX and to a cubin
(Triton's own ptxas), and the generated code is checked against the spec's arithmetic (docs/SPEC.md):
every float add / sub / mul is one round-to-nearest binary32 operation (``*.rn.f32``: PTX never contracts
an operation with an explicit rounding mode), no fma / mad on floats, square roots are ``sqrt.rn.f32``,
nothing approximate (``.approx``) and no flush-to-zero (``.ftz``).  In the SASS the only FFMAs allowed are
the ones of the correctly rounded square root (MUFU.RSQ, two Newton FFMAs per inline sqrt plus its
out-of-line slow path), and the only MUFU is MUFU.RSQ.

The variants are not listed here: the backend's own entry points run with recorders in place of the
kernels (every dtype, rounding, noise family, short and chunked K, aligned and unaligned tensors,
single and multi-tensor, gaussian, rademacher, noise floor, philox, project) and each recorded launch
is specialised exactly as ``JITFunction.run`` would on a GPU (Triton's binder and ``_pack_args``), then
compiled with ``triton.compile`` for a ``GPUTarget`` given by hand.
``test_fusion_is_detected`` compiles with ``enable_fp_fusion=True`` to show that the checks can fail.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import types

import pytest
import torch

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: the kernels are interpreter objects, nothing to compile",
                allow_module_level=True)

import triton.language as tl  # noqa: E402

from kseed_kernels import _spec as S  # noqa: E402
from kseed_kernels.backends import Update  # noqa: E402
from kseed_kernels.backends.triton import kernels as tk  # noqa: E402
from kseed_kernels.backends import triton as bt  # noqa: E402

ARCHS = (90, 80)
# sm_90 (Hopper: the GPUs the project targets) gets every distinct variant; sm_80 one variant per
# (entry point, dtype, noise family): the others differ from it in rounding mode, accumulator chunking,
# alignment and tensor count, i.e. in code Triton generates the same way for both targets, and each of
# them is checked on sm_90.  This halves the compile time (ptxas dominates it) of the CI's slowest file.
FULL_ARCH = 90
# Entry points of backends/triton/kernels.py (the @triton.jit functions the host launches).
ENTRY_POINTS = ("gaussian_kernel", "rademacher_kernel", "apply_kernel", "apply_multi_kernel",
                "noise_floor_kernel", "philox_kernel", "project_kernel", "project_sum_kernel")
# Kernels that compute normals, hence square roots (their Gaussian variants, NOISE=0).
NORMAL_KERNELS = ("gaussian_kernel", "apply_kernel", "apply_multi_kernel", "noise_floor_kernel",
                  "project_kernel")
# The constexpr of a Rademacher variant in a launch label.
RADEMACHER_VARIANT = f"NOISE={S.NOISE_RADEMACHER}"


# ------------------------------------------------------------------------------ recording launches
class _Recorder:
    """Stands in for a JITFunction: ``rec[grid](*args, **kwargs)`` records the launch, runs nothing."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.fn, args, dict(kwargs)))

        return launch


def _record_launches():
    """Every launch the backend makes for the configurations it supports (CPU tensors as stand-ins)."""
    log = []
    jit_type = triton.runtime.jit.JITFunction
    fake = types.SimpleNamespace(**{name: _Recorder(obj, log) for name, obj in vars(tk).items()
                                    if isinstance(obj, jit_type)})
    saved = bt._tk
    bt._tk = fake
    try:
        k_long = 2 * bt.K_CHUNK + 1  # first, middle and last chunk: every (ACC_IN, FINAL) pair
        seeds = torch.arange(k_long, dtype=torch.int64) * 0x9E3779B97F4A7C15
        coefs = torch.full((k_long,), 1e-3)
        bt.gaussian(5, 100, 3, 7, "cpu")
        bt.rademacher(5, 1000, 3, 7, "cpu")
        for noise in S.NOISES:
            for dtype in bt._DTYPE_CODE:
                for rounding in S.ROUNDING_CODES:
                    for k in (3, k_long):
                        upd = Update(seeds[:k], coefs[:k], rounding, 9, noise)
                        bt.apply([torch.zeros(100, dtype=dtype)], [1], upd)
                        # out of place: a source and a destination
                        bt.apply([torch.zeros(100, dtype=dtype)], [1], upd,
                                 [torch.ones(100, dtype=dtype)])
                    upd = Update(seeds[:3], coefs[:3], rounding, 9, noise)
                    # a view that is not 16-byte aligned: the pointer loses its divisibility attribute
                    bt.apply([torch.zeros(101, dtype=dtype)[1:]], [1], upd)
                    bt.apply([torch.zeros(100, dtype=dtype)], [1], upd,
                             [torch.ones(101, dtype=dtype)[1:]])
                    for n_tensors in (2, 3):  # SEARCH_STEPS 1 and 2
                        ts = [torch.zeros(10 + i, dtype=dtype) for i in range(n_tensors)]
                        bt.apply(ts, list(range(n_tensors)), upd)
                        bt.apply(ts, list(range(n_tensors)), upd, [t + 1 for t in ts])
            bt.noise_floor(4096, seeds[:3], coefs[:3], 1, "cpu", noise=noise)
            # project_seeds: every dtype, and a scratch of one block so that the float64 sum runs in
            # chunks (FINAL False, then True)
            old = bt.PROJECT_SCRATCH
            bt.PROJECT_SCRATCH = 3
            try:
                bt.project([torch.zeros(3000, dtype=d) for d in bt._DTYPE_CODE], [1, 2, 3], seeds[:3], noise)
            finally:
                bt.PROJECT_SCRATCH = old
        bt.philox4x32_10(torch.zeros(8, 4, dtype=torch.int64), torch.zeros(8, 2, dtype=torch.int64))
    finally:
        bt._tk = saved
    return log


def _specialize(fn, args, kwargs, target):
    """(options, signature, constexprs, attrs) of a launch, as JITFunction.run computes them."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound_args, specialization, options)


def _compile(fn, args, kwargs, arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    options, signature, constexprs, attrs = _specialize(fn, args, kwargs, target)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def _label(fn, args, kwargs, arch):
    from triton.backends.compiler import GPUTarget

    _, signature, constexprs, attrs = _specialize(fn, args, kwargs, GPUTarget("cuda", arch, 32))
    names = fn.arg_names
    cx = ",".join(f"{names[p[0]]}={v}" for p, v in sorted(constexprs.items()))
    sig = ",".join(v for v in signature.values() if v != "constexpr")
    return f"sm_{arch}:{fn.__name__}[{cx}]({sig}){sorted(attrs.items())}"


@triton.jit
def _probe_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i) * 2.0)


def _probe_cuda():
    """None if Triton can compile (PTX and cubin) for sm_90 here, else the reason why not."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"}
        k = triton.compile(ASTSource(_probe_kernel, sig, {"BLOCK": 32}), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 1, "enable_fp_fusion": False})
        assert k.asm["cubin"][:4] == b"\x7fELF"
        _specialize(_probe_kernel, (torch.zeros(32), torch.zeros(32)),
                    {"BLOCK": 32, "enable_fp_fusion": False}, GPUTarget("cuda", 90, 32))
    except Exception as e:  # noqa: BLE001  (any failure here means: no CUDA toolchain / API)
        return f"triton {triton.__version__} cannot compile for CUDA here: {type(e).__name__}: {e}"
    return None


@contextlib.contextmanager
def _fresh_cache():
    """A throw-away Triton cache: every compile really runs (ptxas included); ~/.triton is untouched."""
    with triton.knobs.cache.scope():
        tmp = tempfile.mkdtemp(prefix="kseed-aot-")
        triton.knobs.cache.dir = tmp
        try:
            yield
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def launches():
    return _record_launches()


@pytest.fixture(scope="module")
def cuda_compiler():
    reason = _probe_cuda()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def compiled(launches, cuda_compiler):
    """{arch: {label: CompiledKernel}}: on FULL_ARCH every distinct recorded launch, on the others
    the first launch of each (entry point, dtype, noise family)."""
    out = {}
    with _fresh_cache():
        for arch in ARCHS:
            kernels, families = {}, set()
            for fn, args, kwargs in launches:
                family = (fn.__name__, kwargs.get("DTYPE"), kwargs.get("NOISE"))
                if arch != FULL_ARCH and family in families:
                    continue
                families.add(family)
                label = _label(fn, args, kwargs, arch)
                if label not in kernels:
                    kernels[label] = _compile(fn, args, kwargs, arch)
            out[arch] = kernels
    return out


# --------------------------------------------------------------------------------- code checks
_PTX_OP = re.compile(r"^\s*(?:@!?%p\w*\s+)?([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*)", re.M)
_FLOAT_TYPE = re.compile(r"\.(f16|bf16|f32|f64|f16x2|bf16x2)$")
_FLOAT_ARITH = {"add", "sub", "mul", "fma", "mad", "div", "sqrt", "rcp", "rsqrt", "ex2", "lg2", "sin",
                "cos", "tanh"}
# add.rn.f64: project_seeds adds its block sums in float64 (docs/SPEC.md section 9.1, step 4).
_ALLOWED_ARITH = {"add.rn.f32", "sub.rn.f32", "mul.rn.f32", "sqrt.rn.f32", "add.rn.f64"}


def ptx_ops(ptx: str) -> collections.Counter:
    return collections.Counter(_PTX_OP.findall(ptx))


def ptx_violations(ptx: str) -> list:
    """PTX instructions outside the spec's arithmetic: float arithmetic other than add / sub / mul /
    sqrt with explicit .rn on f32 (so fma, mad, contractible ``add.f32``, approximate or ftz forms)."""
    bad = []
    for op, n in ptx_ops(ptx).items():
        parts = op.split(".")
        if ".approx" in op or ".ftz" in op:
            bad.append((op, n))
        elif parts[0] in _FLOAT_ARITH and _FLOAT_TYPE.search(op) and op not in _ALLOWED_ARITH:
            bad.append((op, n))
    return sorted(bad)


def _cuobjdump():
    from triton.backends.nvidia import compiler as nv

    here = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    for path in (here, shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if path and os.path.exists(path):
            return path
    return None


def sass_ops(cubin: bytes) -> collections.Counter:
    tool = _cuobjdump()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], check=True, capture_output=True, text=True).stdout
    return collections.Counter(
        re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", sass))


def sass_violations(ops: collections.Counter) -> list:
    """FFMAs beyond those of the correctly rounded sqrt (at most 3 per MUFU.RSQ: two Newton steps per
    inline sqrt, three in the shared slow path), and any MUFU other than RSQ (ex2, lg2, sin, rcp...)."""
    bad = [(op, n) for op, n in ops.items() if op.startswith("MUFU") and op != "MUFU.RSQ"]
    ffma = sum(n for op, n in ops.items() if op.split(".")[0] == "FFMA")
    if ffma > 3 * ops["MUFU.RSQ"]:
        bad.append(("FFMA", ffma))
    return bad


# ---------------------------------------------------------------------------------------- tests
def test_launch_coverage(launches):
    """The recorded launches cover every entry point and every constexpr combination the backend uses."""
    seen = collections.defaultdict(set)
    for fn, _, kwargs in launches:
        seen[fn.__name__].add(tuple(sorted((k, v) for k, v in kwargs.items() if k.isupper())))
        assert kwargs.get("enable_fp_fusion") is False, (fn.__name__, kwargs)
    entry = {n for n, o in vars(tk).items() if n.endswith("_kernel") and hasattr(o, "arg_names")}
    assert entry == set(ENTRY_POINTS) == set(seen), (entry, set(seen))
    noises = tuple(S.NOISE_CODES.values())
    apply = {(d["DTYPE"], d["ROUNDING"], d["ACC_IN"], d["FINAL"], d["NOISE"])
             for d in map(dict, seen["apply_kernel"])}
    assert apply == {(d, r, a, f, n) for d in (0, 1, 2) for r in (0, 1) for a in (False, True)
                     for f in (False, True) for n in noises}
    multi = {(d["DTYPE"], d["ROUNDING"], d["SEARCH_STEPS"], d["NOISE"])
             for d in map(dict, seen["apply_multi_kernel"])}
    assert multi == {(d, r, s, n) for d in (0, 1, 2) for r in (0, 1) for s in (1, 2) for n in noises}
    assert {dict(d)["NOISE"] for d in seen["noise_floor_kernel"]} == set(noises)
    project = {(d["DTYPE"], d["NOISE"]) for d in map(dict, seen["project_kernel"])}
    assert project == {(d, n) for d in (0, 1, 2) for n in noises}
    assert {dict(d)["FINAL"] for d in seen["project_sum_kernel"]} == {False, True}


@pytest.mark.parametrize("arch", ARCHS)
def test_ptx_arithmetic(compiled, arch):
    assert {k.metadata.name for k in compiled[arch].values()} == set(ENTRY_POINTS)
    failures = {}
    for label, k in compiled[arch].items():
        ptx = k.asm["ptx"]
        ops = ptx_ops(ptx)
        problems = ptx_violations(ptx)
        name = k.metadata.name
        if RADEMACHER_VARIANT in label:
            # sign flips (integer xor) and float32 adds only: no square root
            if ops["add.rn.f32"] == 0 or ops["sqrt.rn.f32"] != 0:
                problems.append(("rademacher: missing add.rn.f32, or a sqrt", dict(ops)))
        elif name in NORMAL_KERNELS:
            if ops["sqrt.rn.f32"] == 0 or ops["mul.rn.f32"] == 0 or ops["add.rn.f32"] == 0:
                problems.append(("missing sqrt.rn/mul.rn/add.rn.f32", dict(ops)))
        if f".target sm_{arch}" not in ptx:
            problems.append(("target", arch))
        if problems:
            failures[label] = problems
    assert not failures, failures


@pytest.mark.parametrize("arch", ARCHS)
def test_cubin_sass(compiled, arch):
    if _cuobjdump() is None:
        pytest.skip("no cuobjdump (neither Triton's nor CUDA's) to disassemble the cubins")
    kernels = compiled[arch]
    for label, k in kernels.items():
        assert k.asm["cubin"][:4] == b"\x7fELF", label
    with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:  # subprocesses
        all_ops = dict(zip(kernels, pool.map(lambda k: sass_ops(k.asm["cubin"]), kernels.values())))
    failures = {}
    for label, k in kernels.items():
        ops = all_ops[label]
        problems = sass_violations(ops)
        if k.metadata.name in NORMAL_KERNELS and RADEMACHER_VARIANT not in label and ops["MUFU.RSQ"] == 0:
            problems.append(("no MUFU.RSQ", 0))
        if problems:
            failures[label] = problems
    assert not failures, failures


def test_fusion_is_detected(launches, cuda_compiler):
    """With enable_fp_fusion=True the same kernel gets fma.rn.f32 and FFMAs: the checks above can fail."""
    fn, args, kwargs = next((f, a, k) for f, a, k in launches if f.__name__ == "apply_kernel"
                            and k["DTYPE"] == 0 and k["FINAL"] and not k["ACC_IN"])
    with _fresh_cache():
        k = _compile(fn, args, dict(kwargs, enable_fp_fusion=True), 90)
    bad = dict(ptx_violations(k.asm["ptx"]))
    assert bad.get("fma.rn.f32", 0) > 0, bad
    if _cuobjdump() is not None:
        assert any(op == "FFMA" for op, _ in sass_violations(sass_ops(k.asm["cubin"])))


def test_ptx_checker_spellings():
    """The PTX classifier on the spellings that matter (no compiler needed)."""
    ptx = """
        fma.rn.f32 %f1, %f2, %f3, %f4;
        @%p1 mad.f32 %f1, %f2, %f3, %f4;
        add.f32 %f5, %f6, %f7;
        mul.ftz.f32 %f5, %f6, %f7;
        sqrt.approx.f32 %f1, %f2;
        ex2.approx.ftz.f32 %f1, %f2;
        fma.rn.bf16x2 %r1, %r2, %r3, %r4;
        add.rn.f32 %f5, %f6, %f7;
        mul.rn.f32 %f5, %f6, %f7;
        sqrt.rn.f32 %f1, %f2;
        mad.lo.s32 %r1, %r2, %r3, %r4;
        @!%p2 mad.wide.u32 %rd1, %r2, %r3, %rd4;
        cvt.rn.f16.f32 %rs1, %f1;
        neg.f32 %f1, %f2;
    """
    assert [op for op, _ in ptx_violations(ptx)] == sorted(
        ["fma.rn.f32", "mad.f32", "add.f32", "mul.ftz.f32", "sqrt.approx.f32", "ex2.approx.ftz.f32",
         "fma.rn.bf16x2"])
