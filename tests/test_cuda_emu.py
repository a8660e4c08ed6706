"""The CUDA kernels themselves (csrc/cuda/kseed_cuda_kernels.cu), run on the CPU and checked bit for bit.

No GPU is needed: tests/cuda_emu/ compiles the kernel source with the host C++ compiler under a small
emulation of the CUDA execution model (one OS thread per CUDA thread, real barriers for __syncthreads,
shared memory shared by a block's threads), so the kernels' own logic runs: the tiling and the binary
search of the device-side tensor table, seed staging in shared memory across seed tiles, the K loop with
precomputed round keys and round-0 products, 16-byte / 8-byte vector I/O and the scalar path for
unaligned tensors, the tails, nearest and stochastic rounding, both noise families (the Rademacher
batches of Philox words in shared memory), the gaussian and rademacher offsets and the benchmark-floor
reduction.  Results are compared with the CPU backend, itself bitwise equal to the
reference (tests/test_cpu_backend.py).  What this cannot see, the device arithmetic intrinsics and the
absence of fma in the real build, is checked on the PTX by tests/test_cuda_compile.py; on a GPU,
tests/test_cuda.py runs the real thing.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

import kseed_kernels as kk
from kseed_kernels import _spec as S
from kseed_kernels import ops

from bitwise import bits, random_seeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU_DIR = os.path.join(ROOT, "tests", "cuda_emu")
TILE = 2048   # kTileElems of csrc/cuda/kseed_cuda.cuh
THREADS = 256  # kThreads
SEED_TILE = 256  # kSeedTile
DT_CODE = {getattr(torch, name): code for name, code in S.DTYPE_CODES.items()}


def _cuda_include():
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "include", "cuda_fp16.h")):
            return os.path.join(cand, "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        inc = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
        if os.path.exists(os.path.join(inc, "cuda_fp16.h")):
            return inc
    return None


CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
CUDA_INC = _cuda_include()
pytestmark = [
    pytest.mark.skipif(CXX is None, reason="no host C++ compiler"),
    pytest.mark.skipif(CUDA_INC is None, reason="CUDA headers (cuda_fp16.h) not found"),
    pytest.mark.skipif("cpu" not in kk.backends(), reason="the cpu backend is not built"),
]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("cuda_emu") / "cuda_emu")
    cmd = [CXX, "-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-pthread", "-Wall",
           "-Werror", "-Wno-unknown-pragmas", f"-I{CUDA_INC}", f"-I{os.path.join(ROOT, 'csrc')}",
           os.path.join(EMU_DIR, "cuda_emu_main.cpp"), "-o", exe]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"building the CUDA emulation failed:\n{proc.stderr[-6000:]}"

    def run(job: bytes, tmp) -> bytes:
        jf, of = str(tmp / "job.bin"), str(tmp / "out.bin")
        with open(jf, "wb") as f:
            f.write(b"KSEEDEMU" + job)
        p = subprocess.run([exe, jf, of], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"cuda_emu failed ({p.returncode}): {p.stderr}"
        with open(of, "rb") as f:
            return f.read()

    return run


def _coefs(gen, k):
    return (torch.randn(k, generator=gen) * torch.rand(k, generator=gen) * 1e-2).float()


def _streams(gen, n):
    return [int(x) for x in torch.randint(0, 2**32, (n,), dtype=torch.int64, generator=gen)]


def _apply_job(tensors, streams, seeds, coefs, rounding, shifts, out_shifts=None, noise="gaussian"):
    """In place (op 0), or out of place (op 3) with each out placed out_shifts[i] elements past an
    aligned address."""
    code = S.ROUNDING_CODES[rounding]
    key = ops._sr_key(seeds, coefs, rounding, [t.dtype for t in tensors if t.numel()])
    job = struct.pack("<iqiQii", 0 if out_shifts is None else 3, seeds.numel(), code, key,
                      S.NOISE_CODES[noise], len(tensors))
    job += seeds.numpy().tobytes() + coefs.numpy().tobytes()
    for i, (t, st, sh) in enumerate(zip(tensors, streams, shifts)):
        job += struct.pack("<iIqq", DT_CODE[t.dtype], st, t.numel(), sh)
        if out_shifts is not None:
            job += struct.pack("<q", out_shifts[i])
        job += t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return job


def _unpack(raw, like):
    out, at = [], 0
    for t in like:
        nb = t.numel() * t.element_size()
        buf = bytearray(raw[at:at + nb])
        out.append(torch.frombuffer(buf, dtype=torch.uint8).view(t.dtype).reshape(t.shape)
                   if nb else t.clone())
        at += nb
    assert at == len(raw)
    return out


def _weights(gen, sizes, dtypes):
    return [(torch.randn(n, generator=gen) * 0.05).to(dt) for n, dt in zip(sizes, dtypes)]


# Sizes: a single element, tails of every length mod 4, exact tiles, a tile plus one, several tiles.
SIZES = (1, 3, 6, 7, 2048, 2049, 4 * 1000 + 2, 2 * TILE + 5)


NOISES = ["gaussian", "rademacher"]


# K: one seed, a partial Rademacher batch (16 seeds), several batches with a partial one, and more than
# a seed tile.
@pytest.mark.parametrize("k", [1, 3, 37, SEED_TILE + 44])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("noise", NOISES)
def test_apply_multi_matches_cpu(emu, tmp_path, gen, k, rounding, noise):
    if noise == "gaussian" and k == 37:
        pytest.skip("the Rademacher batch boundary; the Gaussian has none")
    dtypes = [(torch.float32, torch.bfloat16, torch.float16)[i % 3] for i in range(len(SIZES))]
    ws = _weights(gen, SIZES, dtypes)
    streams = _streams(gen, len(ws))
    seeds, coefs = random_seeds(gen, k), _coefs(gen, k)
    got = _unpack(emu(_apply_job(ws, streams, seeds, coefs, rounding, [0] * len(ws), noise=noise),
                      tmp_path), ws)
    want = [w.clone() for w in ws]
    kk.apply_seeds_multi_(want, streams, seeds, coefs, rounding=rounding, backend="cpu", noise=noise)
    for i, (g, w, orig) in enumerate(zip(got, want, ws)):
        assert not torch.equal(bits(w), bits(orig)) or w.numel() < 8, f"tensor {i} did not move"
        assert torch.equal(bits(g), bits(w)), (
            f"tensor {i} ({w.dtype}, {w.numel()} elements, K={k}, {rounding}): "
            f"{int((bits(g) != bits(w)).sum())} elements differ")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noise", NOISES)
def test_apply_unaligned_path_matches_cpu(emu, tmp_path, gen, dtype, noise):
    """A tensor off the vector alignment sends its whole dtype group down the scalar I/O path."""
    sizes = (2049, 37, 4 * TILE)
    ws = _weights(gen, sizes, [dtype] * 3)
    streams = _streams(gen, 3)
    seeds, coefs = random_seeds(gen, 5), _coefs(gen, 5)
    rounding = "stochastic" if dtype != torch.float32 else "nearest"
    for shifts in ([1, 0, 0], [0, 0, 3]):
        got = _unpack(emu(_apply_job(ws, streams, seeds, coefs, rounding, shifts, noise=noise),
                          tmp_path), ws)
        want = [w.clone() for w in ws]
        kk.apply_seeds_multi_(want, streams, seeds, coefs, rounding=rounding, backend="cpu",
                              noise=noise)
        for g, w in zip(got, want):
            assert torch.equal(bits(g), bits(w)), f"shifts {shifts}: results differ"


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("noise", NOISES)
def test_apply_out_of_place_matches_cpu(emu, tmp_path, gen, rounding, noise):
    """The kernels' source and destination pointers: out = round(base + acc) into separate memory, the
    base unchanged (the emulation fails the run if it is written), with aligned and misaligned bases and
    outs (the vector path needs both aligned)."""
    dtypes = [(torch.float32, torch.bfloat16, torch.float16)[i % 3] for i in range(len(SIZES))]
    ws = _weights(gen, SIZES, dtypes)
    streams = _streams(gen, len(ws))
    seeds, coefs = random_seeds(gen, 3), _coefs(gen, 3)
    want = kk.apply_seeds_multi(ws, streams, seeds, coefs, rounding=rounding, backend="cpu",
                                noise=noise)
    n = len(ws)
    for shifts, out_shifts in (([0] * n, [0] * n), ([0] * n, [1] * n), ([3] * n, [0] * n)):
        got = _unpack(emu(_apply_job(ws, streams, seeds, coefs, rounding, shifts, out_shifts,
                                     noise=noise), tmp_path), ws)
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(bits(g), bits(w)), (
                f"tensor {i} ({w.dtype}, {w.numel()} elements, shifts {shifts[i]}/{out_shifts[i]}, "
                f"{rounding}): {int((bits(g) != bits(w)).sum())} elements differ")


@pytest.mark.parametrize("noise", NOISES)
def test_apply_can_fail(emu, tmp_path, gen, noise):
    """The comparison sees a one-seed change and the other family (the check is not vacuous)."""
    ws = _weights(gen, (3000,), [torch.bfloat16])
    seeds, coefs = random_seeds(gen, 4), _coefs(gen, 4)
    got = _unpack(emu(_apply_job(ws, [7], seeds, coefs, "nearest", [0], noise=noise), tmp_path), ws)[0]
    other = seeds.clone()
    other[2] ^= 1
    want = ws[0].clone()
    kk.apply_seeds_(want, other, coefs, stream=7, backend="cpu", noise=noise)
    assert not torch.equal(bits(got), bits(want))
    same = ws[0].clone()
    kk.apply_seeds_(same, seeds, coefs, stream=7, backend="cpu", noise=noise)
    assert torch.equal(bits(got), bits(same))
    kk.apply_seeds_(ws[0], seeds, coefs, stream=7, backend="cpu",
                    noise=[x for x in NOISES if x != noise][0])
    assert not torch.equal(bits(got), bits(ws[0]))


@pytest.mark.parametrize("seed,stream,offset,numel", [
    (0, 0, 0, 4096 + 3),
    (2**64 - 1, 2**32 - 1, 1, 1),
    (0x0123456789ABCDEF, 123456, 2, 2 * THREADS * 4 + 1),
    (0xDEADBEEF, 77, (1 << 33) + 3, 1001),  # the block index's high word is nonzero
])
def test_gaussian_matches_cpu(emu, tmp_path, seed, stream, offset, numel):
    job = struct.pack("<iQIQq", 1, seed, stream, offset, numel)
    got = np.frombuffer(emu(job, tmp_path), dtype=np.float32)
    want = kk.gaussian(seed, numel, stream=stream, offset=offset, backend="cpu").numpy()
    assert got.shape == want.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("seed,stream,offset,numel", [
    (0, 0, 0, 4096 + 3),
    (2**64 - 1, 2**32 - 1, 1, 1),
    (0x0123456789ABCDEF, 123456, 127, 32 * THREADS + 70),
    (0xDEADBEEF, 77, (1 << 40) + 31, 1001),  # the block index's high word is nonzero
    (5, 3, 3 * 128 + 5, 2 * 32 * THREADS + 300),  # three CTAs (32 * THREADS elements each), mid-block
])
def test_rademacher_matches_cpu(emu, tmp_path, seed, stream, offset, numel):
    job = struct.pack("<iQIQq", 4, seed, stream, offset, numel)
    got = np.frombuffer(emu(job, tmp_path), dtype=np.float32)
    want = kk.rademacher(seed, numel, stream=stream, offset=offset, backend="cpu").numpy()
    assert got.shape == want.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def _floor_reference(acc_flat, numel):
    """The floor kernel's sum per tile, in its exact float32 order: per thread over its 2 blocks x 4
    lanes, then the xor butterfly within each warp, then the warps' sums in order."""
    tiles = -(-numel // TILE)
    a = acc_flat[:tiles * TILE].reshape(tiles, 2, THREADS, 4)  # [tile, v, thread, lane]
    s = np.zeros((tiles, THREADS), np.float32)
    for v in range(2):
        for lane in range(4):
            s = (s + a[:, v, :, lane]).astype(np.float32)
    idx = np.arange(THREADS)
    for o in (16, 8, 4, 2, 1):
        s = (s + s[:, idx ^ o]).astype(np.float32)
    t = np.zeros(tiles, np.float32)
    for w in range(THREADS // 32):
        t = (t + s[:, 32 * w]).astype(np.float32)
    return t


@pytest.mark.parametrize("k", [2, SEED_TILE + 3])
@pytest.mark.parametrize("noise", NOISES)
def test_noise_floor_matches_reference_order(emu, tmp_path, gen, k, noise):
    numel, stream = 3 * TILE - 10, 4242
    seeds, coefs = random_seeds(gen, k), _coefs(gen, k)
    job = struct.pack("<iqIqi", 2, k, stream, numel, S.NOISE_CODES[noise])
    job += seeds.numpy().tobytes() + coefs.numpy().tobytes()
    got = np.frombuffer(emu(job, tmp_path), dtype=np.float32)
    # The floor generates every element of every tile (no bounds check): the accumulators of the padded
    # length are the update of a zero tensor.
    acc = torch.zeros(-(-numel // TILE) * TILE)
    kk.apply_seeds_(acc, seeds, coefs, stream=stream, backend="cpu", noise=noise)
    want = _floor_reference(acc.numpy(), numel)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


PROJ_SEEDS = THREADS // 4  # kProjSeeds: seeds per CTA of the project kernel


def _project_job(tensors, streams, seeds, noise, chunk_blocks, shifts):
    job = struct.pack("<iqiqi", 5, seeds.numel(), S.NOISE_CODES[noise], chunk_blocks, len(tensors))
    job += seeds.numpy().tobytes()
    for t, st, sh in zip(tensors, streams, shifts):
        job += struct.pack("<iIqq", DT_CODE[t.dtype], st, t.numel(), sh)
        job += t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return job


# K: one seed, a CTA's seeds plus one (two seed tiles).  chunk_blocks: one block at a time (the float64
# totals carried across sum launches), or the whole call.
@pytest.mark.parametrize("k", [1, PROJ_SEEDS + 1])
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("chunk", [1, 1000])
def test_project_matches_cpu(emu, tmp_path, gen, k, noise, chunk):
    """project_seeds (docs/SPEC.md section 9) through the CUDA kernels: the block's elements staged in
    shared memory, four lanes a thread, the fold by shuffles, the float64 block-order sum in chunks;
    tensors of every dtype in list order (an empty one skipped), whole and partial blocks."""
    sizes = (2 * S.PROJECT_BLOCK + 37, 0, 100, S.PROJECT_BLOCK)
    dtypes = (torch.float32, torch.float32, torch.bfloat16, torch.float16)
    ws = [torch.randn(n, generator=gen).to(dt) for n, dt in zip(sizes, dtypes)]
    streams = _streams(gen, len(ws))
    seeds = random_seeds(gen, k)
    raw = emu(_project_job(ws, streams, seeds, noise, chunk, [0, 0, 1, 3]), tmp_path)
    got = torch.frombuffer(bytearray(raw), dtype=torch.float32)
    want = kk.project_seeds_multi(ws, streams, seeds, noise=noise, backend="cpu")
    assert torch.equal(bits(got), bits(want)), f"{int((bits(got) != bits(want)).sum())} of {k} differ"
    other = seeds.clone()
    other[0] ^= 1
    other = kk.project_seeds_multi(ws, streams, other, noise=noise, backend="cpu")
    assert bits(got)[0] != bits(other)[0]  # the comparison sees a one-bit change of a seed
