"""Backend "triton" checked bit for bit against the reference (and the CPU backend when built).

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1), which must be set
before triton is imported.  Pytest may already have imported triton through another test module, so
every check runs in one child process started with the variable set (``python tests/test_triton.py``);
each test below reports one of its cases (KSEED_TRITON_CASES=a,b: only those run; the others then
fail as "case did not run", so select them with -k too).  Sizes are small: the interpreter is slow.  With a GPU the same
cases also run on CUDA tensors in the child (TRITON_INTERPRET unset), the CPU results as the oracle.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CASES = ("registry", "philox_kat", "spec_vectors", "gaussian", "apply", "special_values", "multi",
         "chunking", "out_of_place", "public_api", "rademacher_signs", "rademacher_apply", "project")


# ----------------------------------------------------------------------------------- the child
def _child_main(device_name: str) -> dict:
    import numpy as np
    import torch

    import kseed_kernels as kk
    from kseed_kernels import _spec as S
    from kseed_kernels import torch_reference as R
    from kseed_kernels.backends import Update
    from kseed_kernels.backends import reference as bref
    from kseed_kernels.backends import triton as bt

    dev = torch.device(device_name)
    gen = torch.Generator().manual_seed(20240611)
    has_cpu = "cpu" in kk.backends()
    results = {}

    from bitwise import bits, same_bits

    def seeds_of(k):
        s = torch.randint(-2**63, 2**63 - 1, (k,), dtype=torch.int64, generator=gen)
        if k >= 2:
            s[0] = -1  # 2^64 - 1
            s[1] = 0
        return s

    def coefs_of(k, scale=1e-2):
        return (torch.randn(k, generator=gen) * scale).float()

    def key(seeds, coefs, rounding):
        if rounding != "stochastic":
            return 0
        return S.sr_key(seeds.numpy().view(np.uint64), coefs.numpy().view(np.uint32))

    def oracle_apply(x_cpu, seeds, coefs, stream, rounding, sk, noise="gaussian"):
        out = x_cpu.clone()
        bref.apply([out], [stream], Update(seeds, coefs, rounding, sk, noise))
        return out

    only = [c for c in os.environ.get("KSEED_TRITON_CASES", "").split(",") if c]

    def case(name):
        def deco(fn):
            if only and name not in only:  # KSEED_TRITON_CASES=a,b runs only those cases
                return fn
            try:
                fn()
                results[name] = "ok"
            except Exception:  # noqa: BLE001  (reported to the parent)
                results[name] = traceback.format_exc()
            return fn
        return deco

    @case("registry")
    def _():
        assert bt.available(), "triton backend not available"
        assert bt.serves(dev), f"triton backend does not serve {dev}"
        assert "triton" in kk.backends(), kk.backends()

    @case("philox_kat")
    def _():
        c = torch.tensor([[0, 0, 0, 0], [0xFFFFFFFF] * 4,
                          [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]], dtype=torch.int64)
        k = torch.tensor([[0, 0], [0xFFFFFFFF] * 2, [0xA4093822, 0x299F31D0]], dtype=torch.int64)
        want = [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8, 0x408F276D, 0x41C83B0E, 0xA20BC7C6,
                0x6D5451FD, 0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
        got = bt.philox4x32_10(c.to(dev, copy=True), k.to(dev, copy=True)).view(-1).tolist()
        assert got == want, [hex(x) for x in got]
        # random counters and keys against the reference
        c = torch.randint(0, 2**32, (300, 4), dtype=torch.int64, generator=gen)
        k = torch.randint(0, 2**32, (300, 2), dtype=torch.int64, generator=gen)
        got = bt.philox4x32_10(c.to(dev, copy=True), k.to(dev, copy=True)).cpu()
        assert torch.equal(got, R.philox4x32_10(c, k))

    @case("spec_vectors")
    def _():
        with open(os.path.join(HERE, "data", "spec_vectors.json")) as f:
            data = json.load(f)
        bad = []
        for v in data["vectors"]:
            n = len(v["bits"])
            z = bt.gaussian(int(v["seed"]), n, v["stream"], v["offset"], dev).cpu()
            got = [format(x & 0xFFFFFFFF, "08x") for x in z.view(torch.int32).tolist()]
            for j, (a, b) in enumerate(zip(got, v["bits"])):
                if a != b:
                    bad.append((v["seed"], v["stream"], v["offset"] + j, a, b))
        assert not bad, f"{len(bad)} spec vectors differ, e.g. {bad[:5]}"

    @case("gaussian")
    def _():
        for seed, stream, offset, n in [(0, 0, 0, 1), (1, 0, 0, 37), (2**64 - 1, 2**32 - 1, 3, 50),
                                        (12345678901234567, 77, 2**33 + 1, 19),
                                        (2**63, 5, 2**31 - 2, 13), (99, 2**31, 2**62 - 9, 9),
                                        (7, 3, 6, 700)]:
            a = bt.gaussian(seed, n, stream, offset, dev)
            assert a.dtype == torch.float32 and a.shape == (n,) and a.device.type == dev.type
            b = R.gaussian(seed, n, stream, offset)
            assert same_bits(a, b), (seed, stream, offset, n)
            if has_cpu:
                assert same_bits(a, kk.gaussian(seed, n, stream=stream, offset=offset, backend="cpu"))

    @case("apply")
    def _():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for rounding in ("nearest", "stochastic"):
                for k, n in [(1, 1), (1, 6), (2, 1029), (5, 333), (3, 4096 + 3)]:
                    seeds, coefs = seeds_of(k), coefs_of(k)
                    x = torch.randn(n, generator=gen).to(dtype)
                    stream = int(torch.randint(0, 2**32, (1,), generator=gen))
                    sk = key(seeds, coefs, rounding)
                    got = x.to(dev, copy=True)
                    bt.apply([got], [stream], Update(seeds, coefs, rounding, sk))
                    want = oracle_apply(x, seeds, coefs, stream, rounding, sk)
                    assert same_bits(got, want), (dtype, rounding, k, n)
                    assert not torch.equal(bits(got), bits(x)) or n == 1, "nothing was written"
                    if has_cpu:
                        c = x.clone()
                        kk.apply_seeds_(c, seeds, coefs, stream=stream, rounding=rounding,
                                        backend="cpu")
                        assert same_bits(got, c), ("cpu", dtype, rounding, k, n)

    @case("special_values")
    def _():
        n = 64
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            fmax = torch.finfo(dtype).max
            tiny = torch.finfo(dtype).tiny
            x = torch.randn(n, generator=gen) * 1e-3
            x[:8] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, fmax, -fmax,
                                  tiny])
            x[8:16] = tiny * torch.rand(8, generator=gen)  # subnormals of the dtype
            x = x.to(dtype)
            for rounding in ("nearest", "stochastic"):
                for scale in (1e-3, 1e-39, 3e4):  # 1e-39: float32 subnormal products and sums
                    seeds, coefs = seeds_of(3), coefs_of(3, scale)
                    sk = key(seeds, coefs, rounding)
                    got = x.to(dev, copy=True)
                    bt.apply([got], [11], Update(seeds, coefs, rounding, sk))
                    want = oracle_apply(x, seeds, coefs, 11, rounding, sk)
                    assert same_bits(got, want), (dtype, rounding, scale)

    @case("multi")
    def _():
        sizes = [1, 3, 4, 5, 1024, 1025, 7, 2100, 16, 2, 300]
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
        for k in (1, 2, 4):
            for rounding in ("nearest", "stochastic"):
                seeds, coefs = seeds_of(k), coefs_of(k)
                xs = [torch.randn(n, generator=gen).to(dtypes[i % 3]) for i, n in enumerate(sizes)]
                streams = [int(s) for s in torch.randint(0, 2**32, (len(xs),), generator=gen)]
                sk = key(seeds, coefs, rounding)
                got = [x.to(dev, copy=True) for x in xs]
                bt.apply(got, streams, Update(seeds, coefs, rounding, sk))
                for g, x, st in zip(got, xs, streams):
                    assert same_bits(g, oracle_apply(x, seeds, coefs, st, rounding, sk)), (k, rounding)
        # one tensor only; and a single dtype
        seeds, coefs = seeds_of(2), coefs_of(2)
        x = torch.randn(77, generator=gen)
        got = [x.to(dev, copy=True)]
        bt.apply(got, [5], Update(seeds, coefs, "nearest", 0))
        assert same_bits(got[0], oracle_apply(x, seeds, coefs, 5, "nearest", 0))

    @case("chunking")
    def _():
        # Force tiny chunks: K split over several launches and the tensor over several slabs; the
        # float32 running sum must never be rounded to the dtype in between.
        old = bt.K_CHUNK, bt.SLAB
        bt.K_CHUNK, bt.SLAB = 3, 8
        try:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for rounding in ("nearest", "stochastic"):
                    seeds, coefs = seeds_of(8), coefs_of(8)
                    x = torch.randn(37, generator=gen).to(dtype)
                    sk = key(seeds, coefs, rounding)
                    got = x.to(dev, copy=True)
                    bt.apply([got], [9], Update(seeds, coefs, rounding, sk))
                    assert same_bits(got, oracle_apply(x, seeds, coefs, 9, rounding, sk)), (dtype, rounding)
                    ys = [torch.randn(n, generator=gen).to(dtype) for n in (5, 19)]
                    got = [y.to(dev, copy=True) for y in ys]
                    bt.apply(got, [1, 2], Update(seeds, coefs, rounding, sk))
                    for g, y, st in zip(got, ys, (1, 2)):
                        assert same_bits(g, oracle_apply(y, seeds, coefs, st, rounding, sk))
        finally:
            bt.K_CHUNK, bt.SLAB = old

    @case("out_of_place")
    def _():
        # out = round(base + acc) into separate memory, base unchanged: one tensor, the multi-tensor
        # table (src and dst rows), the chunked path, misaligned views, and the public API.
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for rounding in ("nearest", "stochastic"):
                seeds, coefs = seeds_of(3), coefs_of(3)
                sk = key(seeds, coefs, rounding)
                xs = [torch.randn(n, generator=gen).to(dtype) for n in (1029, 5, 2100)]
                streams = [int(s) for s in torch.randint(0, 2**32, (3,), generator=gen)]
                wants = [oracle_apply(x, seeds, coefs, st, rounding, sk) for x, st in zip(xs, streams)]
                bases = [x.to(dev, copy=True) for x in xs]
                outs = [torch.full_like(b, 3.0) for b in bases]
                bt.apply(outs[:1], streams[:1], Update(seeds, coefs, rounding, sk), bases[:1])
                assert same_bits(outs[0], wants[0]), ("single", dtype, rounding)
                outs = [torch.full_like(b, 3.0) for b in bases]
                bt.apply(outs, streams, Update(seeds, coefs, rounding, sk), bases)
                for o, w, b, x in zip(outs, wants, bases, xs):
                    assert same_bits(o, w), ("multi", dtype, rounding)
                    assert same_bits(b, x), "base changed"
                base = torch.randn(1031, generator=gen).to(dtype).to(dev, copy=True)[1:]
                out = torch.empty(1031, dtype=dtype, device=dev)[1:]
                got = kk.apply_seeds(base, seeds, coefs, out=out, stream=5, backend="triton",
                                     rounding=rounding)
                want = kk.apply_seeds(base.cpu(), seeds, coefs, stream=5, backend="reference",
                                      rounding=rounding)
                assert got is out and same_bits(got, want), ("misaligned", dtype, rounding)
        old = bt.K_CHUNK, bt.SLAB
        bt.K_CHUNK, bt.SLAB = 3, 8
        try:
            seeds, coefs = seeds_of(8), coefs_of(8)
            x = torch.randn(37, generator=gen).to(torch.bfloat16)
            sk = key(seeds, coefs, "stochastic")
            base = x.to(dev, copy=True)
            out = torch.zeros_like(base)
            bt.apply([out], [9], Update(seeds, coefs, "stochastic", sk), [base])
            assert same_bits(out, oracle_apply(x, seeds, coefs, 9, "stochastic", sk)), "chunked"
            assert same_bits(base, x), "chunked: base changed"
        finally:
            bt.K_CHUNK, bt.SLAB = old
        bs = [torch.randn(9, generator=gen).to(dev, copy=True),
              torch.randn(4, 4, generator=gen).half().to(dev, copy=True).t()]
        got = kk.apply_seeds_multi(bs, [1, 2], [7, 8], [0.1, -0.2], backend="triton")
        want = kk.apply_seeds_multi([b.cpu() for b in bs], [1, 2], [7, 8], [0.1, -0.2],
                                    backend="reference")
        assert all(same_bits(a, b) for a, b in zip(got, want)), "public multi"

    @case("public_api")
    def _():
        seeds = [3, 2**64 - 1, 2**40 + 7]
        coefs = [0.5, -1e-3, 2e-2]
        base = torch.randn(6, 10, generator=gen).to(torch.bfloat16)
        got = base.clone().to(dev, copy=True)
        kk.apply_seeds_(got, seeds, coefs, stream=kk.stream_id("w"), backend="triton",
                        rounding="stochastic")
        want = base.clone()
        kk.apply_seeds_(want, seeds, coefs, stream=kk.stream_id("w"), backend="reference",
                        rounding="stochastic")
        assert same_bits(got, want)
        # non-contiguous tensor: element i is the row-major index
        nc = base.clone().to(dev, copy=True).t()
        kk.apply_seeds_(nc, seeds, coefs, stream=4, backend="triton")
        ref = base.clone().t()
        kk.apply_seeds_(ref, seeds, coefs, stream=4, backend="reference")
        assert same_bits(nc, ref)
        z = kk.gaussian(2**63 + 1, 21, stream=8, offset=5, device=dev, backend="triton")
        assert same_bits(z, kk.gaussian(2**63 + 1, 21, stream=8, offset=5, backend="reference"))
        ts = [torch.randn(9, generator=gen).to(dev, copy=True),
              torch.randn(4, 4, generator=gen).half().to(dev, copy=True)]
        refs = [t.cpu().clone() for t in ts]
        kk.apply_seeds_multi_(ts, [1, 2], seeds, coefs, backend="triton")
        kk.apply_seeds_multi_(refs, [1, 2], seeds, coefs, backend="reference")
        assert all(same_bits(a, b) for a, b in zip(ts, refs))
        # K = 0 is a no-op
        t = base.clone().to(dev, copy=True)
        kk.apply_seeds_(t, [], [], backend="triton")
        assert same_bits(t, base)

    @case("rademacher_signs")
    def _():
        with open(os.path.join(HERE, "data", "spec_vectors_rademacher.json")) as f:
            rows = json.load(f)["vectors"]
        for v in rows[::5]:
            r = bt.rademacher(int(v["seed"]), len(v["signs"]), v["stream"], v["offset"], dev).cpu()
            assert "".join("+" if x > 0 else "-" for x in r.tolist()) == v["signs"], v
        for seed, stream, offset, n in [(0, 0, 0, 1), (2**64 - 1, 2**32 - 1, 127, 2),
                                        (12345678901234567, 77, 2**33 + 100, 300),
                                        (99, 2**31, 2**62 - 1100, 1100), (7, 3, 5, 2500)]:
            a = bt.rademacher(seed, n, stream, offset, dev)
            assert a.dtype == torch.float32 and a.shape == (n,) and a.device.type == dev.type
            assert same_bits(a, R.rademacher(seed, n, stream, offset)), (seed, stream, offset, n)
        r = kk.rademacher(2**63 + 1, 200, stream=8, offset=60, device=dev, backend="triton")
        assert same_bits(r, kk.rademacher(2**63 + 1, 200, stream=8, offset=60, backend="reference"))

    @case("rademacher_apply")
    def _():
        # noise="rademacher": one tensor and the multi-tensor table, in place and out of place, every
        # dtype and rounding, tails and 128-element block crossings, the chunked path (K split, slabs
        # of whole Rademacher blocks), misaligned and non-contiguous views through the public API.
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for rounding in ("nearest", "stochastic"):
                seeds, coefs = seeds_of(4), coefs_of(4)
                sk = key(seeds, coefs, rounding)
                upd = Update(seeds, coefs, rounding, sk, "rademacher")
                xs = [torch.randn(n, generator=gen).to(dtype) for n in (1029, 5, 2100)]
                streams = [int(s) for s in torch.randint(0, 2**32, (3,), generator=gen)]
                wants = [oracle_apply(x, seeds, coefs, st, rounding, sk, "rademacher")
                         for x, st in zip(xs, streams)]
                got = [xs[0].to(dev, copy=True)]
                bt.apply(got, streams[:1], upd)
                assert same_bits(got[0], wants[0]), ("single", dtype, rounding)
                got = [x.to(dev, copy=True) for x in xs]
                bt.apply(got, streams, upd)
                assert all(same_bits(g, w) for g, w in zip(got, wants)), ("multi", dtype, rounding)
                bases = [x.to(dev, copy=True) for x in xs]
                outs = [torch.full_like(b, 3.0) for b in bases]
                bt.apply(outs, streams, upd, bases)
                for o, w, b, x in zip(outs, wants, bases, xs):
                    assert same_bits(o, w) and same_bits(b, x), ("out of place", dtype, rounding)
                base = torch.randn(1031, generator=gen).to(dtype).to(dev, copy=True)[1:]
                got = kk.apply_seeds(base, seeds, coefs, stream=5, backend="triton",
                                     rounding=rounding, noise="rademacher")
                want = kk.apply_seeds(base.cpu(), seeds, coefs, stream=5, backend="reference",
                                      rounding=rounding, noise="rademacher")
                assert same_bits(got, want), ("misaligned", dtype, rounding)
        old = bt.K_CHUNK, bt.SLAB
        bt.K_CHUNK, bt.SLAB = 3, 100  # slabs round up to 128 elements for this family
        try:
            for dtype in (torch.float32, torch.bfloat16):
                seeds, coefs = seeds_of(8), coefs_of(8)
                x = torch.randn(300, generator=gen).to(dtype)
                sk = key(seeds, coefs, "stochastic")
                got = x.to(dev, copy=True)
                bt.apply([got], [9], Update(seeds, coefs, "stochastic", sk, "rademacher"))
                want = oracle_apply(x, seeds, coefs, 9, "stochastic", sk, "rademacher")
                assert same_bits(got, want), ("chunked", dtype)
        finally:
            bt.K_CHUNK, bt.SLAB = old
        nc = torch.randn(6, 50, generator=gen).half().to(dev, copy=True).t()
        ref = nc.cpu().clone()
        kk.apply_seeds_(nc, [3, 2**64 - 1], [0.5, -1e-3], stream=4, backend="triton",
                        noise="rademacher")
        kk.apply_seeds_(ref, [3, 2**64 - 1], [0.5, -1e-3], stream=4, backend="reference",
                        noise="rademacher")
        assert same_bits(nc, ref), "non-contiguous"
        # the floor: the sum of a zero tensor's accumulators per program
        f = bt.noise_floor(3000, seeds, coefs, 5, dev, noise="rademacher").cpu()
        acc = torch.zeros(3072)
        kk.apply_seeds_(acc, seeds, coefs, stream=5, backend="reference", noise="rademacher")
        assert torch.allclose(f, acc.view(3, 1024).sum(1), rtol=1e-4, atol=1e-5)

    @case("project")
    def _():
        # project_seeds (docs/SPEC.md section 9): several tensors of every dtype (whole and partial
        # blocks), K across two programs of seeds, both families; the chunked float64 sum (a chunk of
        # two blocks cuts the first tensor); a non-contiguous view through the public API.
        xs = [torch.randn(2 * S.PROJECT_BLOCK + 37, generator=gen),
              torch.randn(100, generator=gen).to(torch.bfloat16),
              torch.randn(5, 7, generator=gen).to(torch.float16)]
        streams = [int(s) for s in torch.randint(0, 2**32, (3,), generator=gen)]
        oracle = "cpu" if has_cpu else "reference"
        for noise in S.NOISES:
            seeds = seeds_of(bt.PROJECT_SEEDS + 1)
            got = bt.project([x.to(dev) for x in xs], streams, seeds, noise)
            want = kk.project_seeds_multi(xs, streams, seeds, noise=noise, backend=oracle)
            assert torch.equal(bits(got), bits(want)), ("multi", noise)
            old = bt.PROJECT_SCRATCH
            bt.PROJECT_SCRATCH = 2 * 3
            try:
                got = bt.project([x.to(dev) for x in xs], streams, seeds[:3], noise)
            finally:
                bt.PROJECT_SCRATCH = old
            want = kk.project_seeds_multi(xs, streams, seeds[:3], noise=noise, backend=oracle)
            assert torch.equal(bits(got), bits(want)), ("chunked", noise)
            nc = torch.randn(9, 40, generator=gen).to(dev).t()[3:]
            got = kk.project_seeds(nc, [5, 2**64 - 1], stream=8, noise=noise, backend="triton")
            want = kk.project_seeds(nc.cpu(), [5, 2**64 - 1], stream=8, noise=noise, backend=oracle)
            assert torch.equal(bits(got), bits(want)), ("non-contiguous", noise)
            assert got.device == nc.device

    return results


# ---------------------------------------------------------------------------------- the parent
def _run_child(env_extra: dict, device_name: str) -> dict:
    env = dict(os.environ)
    env.update(env_extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), device_name], env=env,
                          capture_output=True, text=True, timeout=1800)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("KSEED_RESULTS "):
            return json.loads(line[len("KSEED_RESULTS "):])
    raise RuntimeError(f"the Triton check process failed (rc {proc.returncode}):\n"
                       f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def _triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


pytestmark = pytest.mark.skipif(not _triton_installed(), reason="triton is not installed")


@pytest.fixture(scope="module")
def interp_results():
    return _run_child({"TRITON_INTERPRET": "1"}, "cpu")


@pytest.mark.parametrize("name", CASES)
def test_interpreter(interp_results, name):
    res = interp_results.get(name, "case did not run")
    assert res == "ok", res


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def gpu_results():
    env = {"TRITON_INTERPRET": "0"}
    return _run_child(env, "cuda")


@pytest.mark.skipif(not _has_gpu(), reason="no CUDA GPU")
@pytest.mark.parametrize("name", CASES)
def test_gpu(gpu_results, name):
    res = gpu_results.get(name, "case did not run")
    assert res == "ok", res


if __name__ == "__main__":
    dev_name = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    out = _child_main(dev_name)
    print("KSEED_RESULTS " + json.dumps(out))
