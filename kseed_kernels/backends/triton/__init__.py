"""Backend "triton": the launcher of the Triton kernels (kernels.py in this folder).

Serves CUDA tensors when a GPU is present.  Under TRITON_INTERPRET=1 (set before triton is imported) it
also serves CPU tensors: the same kernels then run through Triton's interpreter, which is how the tests
check them bit for bit without a GPU (slow: keep sizes small).

Long histories: one launch sums up to K_CHUNK seeds.  For K > K_CHUNK the tensor is processed in slabs of
at most SLAB elements; each slab's partial sums are kept in a float32 scratch buffer (at most SLAB * 4
bytes) across the K chunks and only the last chunk adds them to the weights and rounds: the running sum
is never rounded to the tensor's dtype in between.
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
except ImportError:  # the backend is then simply unavailable
    triton = None

from ... import _spec as S
from ..._ieee import ieee_subnormals

NAME = "triton"

# Philox blocks per program (4 * BLOCK elements) and warps per program.
BLOCK = 256
NUM_WARPS = 4
GAUSS_BLOCK = 256
# Rademacher blocks (128 elements each) per program of the rademacher generator.
RAD_BLOCKS = 8
# Seeds per launch before chunking, and elements per slab of a chunked tensor.
K_CHUNK = 1 << 16
SLAB = 1 << 20

_tk = None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    global _tk
    if _tk is None:
        from . import kernels

        _tk = kernels
    return _tk


def available() -> bool:
    if triton is None:
        return False
    return torch.cuda.is_available() or _interpret()


def serves(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpret()


# Launch options: never contract a*b + c into an fma (Triton's default on the GPU would); no
# flush-to-zero in libdevice calls (only floor is used, on values that are never subnormal, but the
# option keeps it exact by construction).
def _opts(num_warps: int = NUM_WARPS) -> dict:
    return {"num_warps": num_warps, "enable_fp_fusion": False, "enable_reflect_ftz": False}


def _i32(x: int) -> int:
    """A uint32 value as the signed int32 with the same bits (how 32-bit words are passed)."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= (1 << 31) else x


def _w(x: int):
    """A 64-bit value as its (lo, hi) 32-bit words, each as a signed int32."""
    return _i32(x), _i32(x >> 32)


_DTYPE_CODE = {getattr(torch, name): code for name, code in S.DTYPE_CODES.items()}


def _kernel_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _device_args(seeds: torch.Tensor, coefs: torch.Tensor, device):
    """Seeds as int32 [2K] (lo, hi words, little-endian) and coefs float32 [K] on ``device``."""
    s32 = seeds.contiguous().view(torch.int32)
    return (s32.to(device, non_blocking=True), coefs.to(device=device, dtype=torch.float32,
                                                        non_blocking=True))


def gaussian(seed, numel, stream, offset, device):
    tk = _kernels()
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel == 0:
        return out
    first = offset >> 2
    last = (offset + numel + 3) >> 2
    grid = (triton.cdiv(last - first, GAUSS_BLOCK),)
    with _on(device):
        tk.gaussian_kernel[grid](out, *_w(numel), *_w(seed), _i32(stream), *_w(offset),
                                 BLOCK=GAUSS_BLOCK, **_opts())
    return out


def rademacher(seed, numel, stream, offset, device):
    tk = _kernels()
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel == 0:
        return out
    per = S.RADEMACHER_BLOCK
    first = offset // per
    last = (offset + numel + per - 1) // per
    grid = (triton.cdiv(last - first, RAD_BLOCKS),)
    with _on(device):
        tk.rademacher_kernel[grid](out, *_w(numel), *_w(seed), _i32(stream), *_w(offset),
                                   NB=RAD_BLOCKS, **_opts())
    return out


class _on:
    """torch.cuda.device context for CUDA tensors; nothing for CPU tensors (interpreter)."""

    def __init__(self, device):
        self.ctx = torch.cuda.device(device) if torch.device(device).type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _launch_apply(src, dst, n, elem_base, acc, s32, cf, k_begin, k_end, stream, sr_key, dcode, rcode,
                  ncode, acc_in, final):
    tk = _kernels()
    # The Rademacher tiles start at multiples of 128 noise elements (whole Rademacher blocks).
    assert ncode != S.NOISE_RADEMACHER or elem_base % S.RADEMACHER_BLOCK == 0
    grid = (triton.cdiv(n, 4 * BLOCK),)
    tk.apply_kernel[grid](src, dst, *_w(n), *_w(elem_base), acc, s32, cf, k_begin, k_end,
                          _i32(stream), *_w(sr_key), DTYPE=dcode, ROUNDING=rcode, ACC_IN=acc_in,
                          FINAL=final, BLOCK=BLOCK, NOISE=ncode, **_opts())


def _apply_one(out, base, s32, cf, K, stream, rcode, ncode, sr_key):
    """out = round(base + acc) for one tensor (base is out in place), K chunked past K_CHUNK."""
    dcode = _DTYPE_CODE[out.dtype]
    dst = _kernel_view(out.view(-1))
    src = dst if base is out else _kernel_view(base.view(-1))
    n = dst.numel()
    if K <= K_CHUNK:
        _launch_apply(src, dst, n, 0, cf, s32, cf, 0, K, stream, sr_key, dcode, rcode, ncode, False,
                      True)
        return
    # Long history: per slab, K chunks accumulate into a float32 scratch, the last one reads the source,
    # adds and rounds into the destination.
    # A slab is a whole number of the family's Philox blocks (4 elements, 128 for the Rademacher).
    per = S.RADEMACHER_BLOCK if ncode == S.NOISE_RADEMACHER else S.GAUSSIAN_BLOCK
    slab = min(-(-SLAB // per) * per, n)
    scratch = torch.empty(slab, dtype=torch.float32, device=out.device)
    for start in range(0, n, slab):  # slab is a multiple of `per` unless it is the whole tensor
        d = dst[start:start + slab]
        sp = src[start:start + slab]
        m = d.numel()
        for kb in range(0, K, K_CHUNK):
            ke = min(K, kb + K_CHUNK)
            _launch_apply(sp, d, m, start, scratch, s32, cf, kb, ke, stream, sr_key, dcode, rcode,
                          ncode, kb > 0, ke == K)


def plan_table(items, per_prog: int) -> tuple:
    """The int64 plan table [len(S.PLAN_FIELDS), T] of (base, out, stream) items of one dtype (the
    layout of csrc/kseed_plan.h's PlanRow, one row per field) and the number of programs it covers."""
    rows = [[] for _ in S.PLAN_FIELDS]
    first = 0
    for base, out, st in items:
        n = out.numel()
        rows[S.PLAN_SRC].append(base.data_ptr())
        rows[S.PLAN_DST].append(out.data_ptr())
        rows[S.PLAN_NUMEL].append(n)
        rows[S.PLAN_STREAM].append(st)
        rows[S.PLAN_FIRST_TILE].append(first)
        first += -(-n // per_prog)
    return torch.tensor(rows, dtype=torch.int64), first


def apply(outs, streams, upd, bases=None):
    """One launch per dtype over all tensors (device-side plan table), or chunked per tensor for K past
    K_CHUNK.  bases None: in place.  The outs' autograd version counters are bumped afterwards, as
    torch's in-place ops do (the compiled ops do it in their ADInplaceOrView kernel).  Under the
    interpreter (CPU tensors) the kernels compute with numpy on this thread: with IEEE subnormals
    whatever the process's flush-to-zero mode, as on the GPU (compiled without flush-to-zero)."""
    if outs[0].device.type == "cpu":
        with ieee_subnormals():
            _apply(outs, streams, upd, bases)
    else:
        _apply(outs, streams, upd, bases)
    torch.autograd.graph.increment_version(outs)


def _apply(outs, streams, upd, bases):
    tk = _kernels()
    device = outs[0].device
    K = upd.K
    rcode = upd.rounding_code
    ncode = upd.noise_code
    bases = outs if bases is None else bases
    s32, cf = _device_args(upd.seeds, upd.coefs, device)
    with _on(device):
        if K > K_CHUNK or len(outs) == 1:
            for b, o, st in zip(bases, outs, streams):
                _apply_one(o, b, s32, cf, K, st, rcode, ncode, upd.sr_key)
            return
        groups: dict = {}
        for b, o, st in zip(bases, outs, streams):
            groups.setdefault(o.dtype, []).append((b, o, st))
        for dtype, items in groups.items():
            T = len(items)
            table, progs = plan_table(items, 4 * BLOCK)
            table = table.to(device, non_blocking=True)
            steps = max(1, math.ceil(math.log2(T))) if T > 1 else 0
            tk.apply_multi_kernel[(progs,)](table, T, s32, cf, K, *_w(upd.sr_key),
                                            DTYPE=_DTYPE_CODE[dtype], ROUNDING=rcode, BLOCK=BLOCK,
                                            SEARCH_STEPS=steps, NOISE=ncode, **_opts())
            # `table` may be freed when this returns: the CUDA caching allocator only hands its block
            # to work queued later on the same stream, after this kernel.


# project_seeds: seeds per program, seeds per program of the float64 sum, and the most block sums
# (float32) held at once before they are added into the float64 totals.
PROJECT_SEEDS = 32
PROJECT_SUM_SEEDS = 128
PROJECT_SCRATCH = 1 << 24


def project(tensors, streams, seeds, noise):
    """docs/SPEC.md section 9 (under the interpreter, with IEEE subnormals: see apply)."""
    if tensors[0].device.type == "cpu":
        with ieee_subnormals():
            return _project(tensors, streams, seeds, noise)
    return _project(tensors, streams, seeds, noise)


def _project(tensors, streams, seeds, noise):
    """docs/SPEC.md section 9: the block sums of the tensors' blocks in list order, in chunks of at most
    PROJECT_SCRATCH / K blocks (a chunk may cut a tensor), each chunk's sums then added in block order
    into float64 totals by project_sum_kernel; the last chunk rounds them to float32."""
    tk = _kernels()
    device = tensors[0].device
    K = seeds.numel()
    s32, _ = _device_args(seeds, seeds.new_zeros(K, dtype=torch.float32), device)
    cap = max(1, PROJECT_SCRATCH // K)
    pieces = []  # (tensor view, stream, first block, blocks) in list order, each within one chunk
    for t, st in zip(tensors, streams):
        nb = -(-t.numel() // S.PROJECT_BLOCK)
        for b0 in range(0, nb, cap):
            pieces.append((t, st, b0, min(cap, nb - b0)))
    sums = torch.empty(min(cap, sum(p[3] for p in pieces)) * K, dtype=torch.float32, device=device)
    acc = torch.zeros(K, dtype=torch.float64, device=device)
    out = torch.empty(K, dtype=torch.float32, device=device)
    ncode = S.NOISE_CODES[noise]
    with _on(device):
        i = 0
        while i < len(pieces):
            rows = 0
            while i < len(pieces) and rows + pieces[i][3] <= cap:
                t, st, b0, nb = pieces[i]
                x = _kernel_view(t.view(-1))
                tk.project_kernel[(nb, triton.cdiv(K, PROJECT_SEEDS))](
                    x, *_w(t.numel()), *_w(b0), sums, *_w(rows), s32, K, _i32(st),
                    DTYPE=_DTYPE_CODE[t.dtype], NOISE=ncode, NS=PROJECT_SEEDS, **_opts())
                rows += nb
                i += 1
            tk.project_sum_kernel[(triton.cdiv(K, PROJECT_SUM_SEEDS),)](
                sums, rows, K, acc, out, FINAL=i == len(pieces), BK=PROJECT_SUM_SEEDS, **_opts())
    return out


def noise_floor(n, seeds, coefs, stream, device, noise="gaussian"):
    """Benchmark helper: the generate-and-sum work of an apply of the ``noise`` family over n elements,
    one float per program."""
    tk = _kernels()
    s32, cf = _device_args(seeds, coefs, device)
    progs = triton.cdiv(n, 4 * BLOCK)
    out = torch.empty(progs, dtype=torch.float32, device=device)
    with _on(device):
        tk.noise_floor_kernel[(progs,)](out, s32, cf, seeds.numel(), _i32(stream), BLOCK=BLOCK,
                                        NOISE=S.NOISE_CODES[noise], **_opts())
    return out


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox of int64 counter [n, 4] / key [n, 2] (uint32 values) through the Triton kernel (tests)."""
    tk = _kernels()
    n = counter.shape[0]
    c = counter.to(torch.int64).view(-1).to(torch.int32)  # wraps to the same low 32 bits
    k = key.to(torch.int64).view(-1).to(torch.int32)
    out = torch.empty(n * 4, dtype=torch.int32, device=counter.device)
    with _on(counter.device):
        tk.philox_kernel[(triton.cdiv(n, 128),)](c, k, out, n, BLOCK=128, **_opts())
    return out.view(n, 4).to(torch.int64) & 0xFFFFFFFF

