"""Triton kernels of the kseed noise spec (docs/SPEC.md): Philox4x32-10, the exact-reduction Box-Muller
transform, the Rademacher signs (section 8), the fused K-seed update of either family with nearest /
stochastic rounding, and its multi-tensor form.

Every float operation is one IEEE binary32 operation in the spec's order.  Launch these kernels with
``enable_fp_fusion=False`` (the launcher, kseed_kernels/backends/triton/__init__.py, does): otherwise Triton contracts a*b + c into
an fma on the GPU and the bits change.  Square roots use ``tl.sqrt_rn`` (``tl.sqrt`` may be approximate);
no fma, no libdevice transcendental is used.  Under TRITON_INTERPRET=1 the same kernels run on CPU
tensors through numpy, which is how the test suite checks them without a GPU.

Layout of the work: a program owns BLOCK consecutive Philox blocks (4 * BLOCK consecutive elements of
one tensor).  Each program reads its source elements (the base; the tensor itself for the in-place
update) and writes its destination elements once.  For each seed it loads the seed's two key words and its coefficient once (scalars: the
per-round key bumps are scalar work, once per seed per program, never per element), runs Philox once
per block and adds c_k * z to four float32 accumulators (one per lane).  The accumulators stay in fp32
registers across the whole K loop; the tensor is read and written once, after the loop.

The Rademacher family (constexpr NOISE == S.NOISE_RADEMACHER) runs Philox once per seed per 128
elements: a program's 4 * BLOCK elements are BLOCK / 32 whole Rademacher blocks (its first element is a
multiple of 128), whose 4 * 32 bits unpack in element order; each term is the coefficient with its sign
bit flipped by the element's bit (no multiply), added to one float32 accumulator per element.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ... import _spec as S

# Spec constants as compile-time values (Python floats are the exact float32 values; Triton rounds a
# float literal to float32, which leaves them unchanged).
_M0 = tl.constexpr(S.PHILOX_M0)
_M1 = tl.constexpr(S.PHILOX_M1)
_W0 = tl.constexpr(S.PHILOX_W0)
_W1 = tl.constexpr(S.PHILOX_W1)
_SQRT2_MANT = tl.constexpr(S.SQRT2_MANT)
_LOG_C0, _LOG_C1, _LOG_C2, _LOG_C3, _LOG_C4, _LOG_C5, _LOG_C6, _LOG_C7, _LOG_C8, _LOG_C9 = (
    tl.constexpr(c) for c in S.LOG_COEFS)
_SIN_C0, _SIN_C1, _SIN_C2, _SIN_C3, _SIN_C4 = (tl.constexpr(c) for c in S.SIN_COEFS)
_COS_C0, _COS_C1, _COS_C2, _COS_C3, _COS_C4 = (tl.constexpr(c) for c in S.COS_COEFS)
_LN2_HI = tl.constexpr(S.LN2_HI)
_LN2_LO = tl.constexpr(S.LN2_LO)
_TWO_M21 = tl.constexpr(2.0 ** -21)
_TWO_M24 = tl.constexpr(2.0 ** -24)

# The constexpr DTYPE and ROUNDING of the apply kernels are the shared codes of _spec.py (S.DTYPE_*,
# S.ROUND_*; bfloat16 is handled through its 16-bit pattern, an int16 pointer).  The multi-tensor table
# has the rows S.PLAN_FIELDS.
_DT_F32 = tl.constexpr(S.DTYPE_F32)
_DT_BF16 = tl.constexpr(S.DTYPE_BF16)
_RN_SR = tl.constexpr(S.ROUND_STOCHASTIC)
_NZ_RAD = tl.constexpr(S.NOISE_RADEMACHER)
_CTR_GAUSS = tl.constexpr(S.COUNTER_GAUSSIAN)
_CTR_RAD = tl.constexpr(S.COUNTER_RADEMACHER)
_RAD_BLOCK = tl.constexpr(S.RADEMACHER_BLOCK)
_PLAN_SRC = tl.constexpr(S.PLAN_SRC)
_PLAN_DST = tl.constexpr(S.PLAN_DST)
_PLAN_NUMEL = tl.constexpr(S.PLAN_NUMEL)
_PLAN_STREAM = tl.constexpr(S.PLAN_STREAM)
_PLAN_FIRST_TILE = tl.constexpr(S.PLAN_FIRST_TILE)


# ------------------------------------------------------------------------------------------ Philox
@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of uint32 counter words (tensors) and key words (uint32 scalars or tensors)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _M0)
        lo0 = c0 * _M0
        hi1 = tl.umulhi(c2, _M1)
        lo1 = c2 * _M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + _W0
        k1 = k1 + _W1
    return c0, c1, c2, c3


@triton.jit
def _u32(x):
    """A signed int32 scalar (how the host passes 32-bit words) as its uint32 bit pattern."""
    return x.to(tl.uint32, bitcast=True)


@triton.jit
def _i64(lo, hi):
    """The int64 whose two 32-bit words the host passed as signed int32 scalars (lo, hi).

    64-bit quantities always travel as two int32 words: a Python int argument's Triton type depends on
    its value (int32, uint32 or int64), which would otherwise change the kernel's arithmetic."""
    return (hi.to(tl.int64) << 32) | lo.to(tl.uint32, bitcast=True).to(tl.int64)


@triton.jit
def _counter(gb, stream, word3):
    """Counter words of the int64 block indices gb: (b & 0xffffffff, b >> 32, stream, word3)."""
    c0 = (gb & 0xFFFFFFFF).to(tl.uint32)
    c1 = (gb >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + stream
    c3 = tl.zeros_like(c0) + word3
    return c0, c1, c2, c3


# ------------------------------------------------------------------------------ normal transform
@triton.jit
def _log_uniform(xa):
    """log(u1), u1 = (2 * (xa >> 9) + 1) * 2^-24, by the spec's exact range reduction (3.2)."""
    n1 = ((xa >> 9) << 1) | 1
    v = n1.to(tl.float32)  # exact: n1 < 2^24
    bits = v.to(tl.uint32, bitcast=True)
    mant = bits & 0x7FFFFF
    big = mant > _SQRT2_MANT
    e = (bits >> 23).to(tl.int32) - 151 + big.to(tl.int32)  # E - 24, in [-24, 0]
    f = (mant | 0x3F800000).to(tl.float32, bitcast=True)
    f = tl.where(big, f * 0.5, f)
    t = f - 1.0
    p = _LOG_C9 * t
    p = p + _LOG_C8
    p = p * t
    p = p + _LOG_C7
    p = p * t
    p = p + _LOG_C6
    p = p * t
    p = p + _LOG_C5
    p = p * t
    p = p + _LOG_C4
    p = p * t
    p = p + _LOG_C3
    p = p * t
    p = p + _LOG_C2
    p = p * t
    p = p + _LOG_C1
    p = p * t
    p = p + _LOG_C0
    logf = t * p
    ef = e.to(tl.float32)
    lo = ef * _LN2_LO
    lo = lo + logf
    hi = ef * _LN2_HI
    return hi + lo


@triton.jit
def _sincos_uniform(xb):
    """(cos, sin) of 2 pi u2, u2 = (2 * (xb >> 9) + 1) * 2^-24, exact quarter-turn reduction (3.3)."""
    m2 = (xb >> 9).to(tl.int32)
    k = (m2 + (1 << 20)) >> 21
    j = ((m2 << 1) | 1) - (k << 22)
    y = j.to(tl.float32) * _TWO_M21  # exact
    w = y * y
    s = _SIN_C4 * w
    s = s + _SIN_C3
    s = s * w
    s = s + _SIN_C2
    s = s * w
    s = s + _SIN_C1
    s = s * w
    s = s + _SIN_C0
    c = _COS_C4 * w
    c = c + _COS_C3
    c = c * w
    c = c + _COS_C2
    c = c * w
    c = c + _COS_C1
    c = c * w
    c = c + _COS_C0
    s = y * s
    q = k & 3
    # Branch-free quadrant select; the negations are exact (s and c are never zero).
    swap = (q & 1) == 1
    cos_t = tl.where(swap, s, c)
    sin_t = tl.where(swap, c, s)
    cos_t = tl.where((q == 1) | (q == 2), -cos_t, cos_t)
    sin_t = tl.where(q >= 2, -sin_t, sin_t)
    return cos_t, sin_t


@triton.jit
def _box_muller(xa, xb):
    lg = _log_uniform(xa)
    r = tl.sqrt_rn(lg * -2.0)
    cos_t, sin_t = _sincos_uniform(xb)
    return r * cos_t, r * sin_t


@triton.jit
def _normals4(c0, c1, c2, c3, k0, k1):
    """The four normals (lanes 0..3) of the Philox blocks with counters (c0, c1, c2, c3)."""
    x0, x1, x2, x3 = _philox(c0, c1, c2, c3, k0, k1)
    z0, z1 = _box_muller(x0, x1)
    z2, z3 = _box_muller(x2, x3)
    return z0, z1, z2, z3


@triton.jit
def _accumulate4(acc0, acc1, acc2, acc3, c0, c1, c2, c3, seeds_ptr, coefs_ptr, k_begin, k_end):
    """acc_l = acc_l + c_k * z_l for seeds k_begin .. k_end - 1 in ascending order (spec 4, step 2):
    the K loop of the apply kernels and of the benchmark floor, so the floor measures the same work.
    Seeds arrive as two int32 words each; each seed's key and coefficient are loaded once."""
    for k in range(k_begin, k_end):
        k0 = tl.load(seeds_ptr + 2 * k).to(tl.uint32, bitcast=True)
        k1 = tl.load(seeds_ptr + 2 * k + 1).to(tl.uint32, bitcast=True)
        cf = tl.load(coefs_ptr + k)
        z0, z1, z2, z3 = _normals4(c0, c1, c2, c3, k0, k1)
        acc0 = acc0 + cf * z0
        acc1 = acc1 + cf * z1
        acc2 = acc2 + cf * z2
        acc3 = acc3 + cf * z3
    return acc0, acc1, acc2, acc3


@triton.jit
def _interleave4(a0, a1, a2, a3, BLOCK: tl.constexpr):
    """[BLOCK] x4 lanes -> [4 * BLOCK] in element order (block-major, lane-minor)."""
    return tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), [4 * BLOCK])


# ---------------------------------------------------------------------------- Rademacher signs
@triton.jit
def _signbits(rb0, stream, k0, k1, NB: tl.constexpr):
    """uint32 [128 * NB]: the sign bits (1 for r = -1) of elements 128 * rb0 + [0, 128 * NB), in order:
    one Philox call per Rademacher block rb0 + [0, NB); element p of a block is bit p & 31 of word
    p >> 5, least significant bit first (spec 8.1)."""
    c0, c1, c2, c3 = _counter(rb0 + tl.arange(0, NB).to(tl.int64), stream, _CTR_RAD)
    x0, x1, x2, x3 = _philox(c0, c1, c2, c3, k0, k1)
    words = _interleave4(x0, x1, x2, x3, NB)  # [4 * NB], word w of block n at 4 n + w
    shifts = tl.arange(0, 32).to(tl.uint32)
    return tl.reshape((words[:, None] >> shifts[None, :]) & 1, [_RAD_BLOCK * NB])


@triton.jit
def _accumulate_signs(acc, rb0, stream, seeds_ptr, coefs_ptr, k_begin, k_end, NB: tl.constexpr):
    """acc = acc + (+-c_k) for seeds k_begin .. k_end - 1 in ascending order (spec 8.2) over the
    elements of Rademacher blocks rb0 + [0, NB): the term is c_k with its sign bit xor the element's
    bit, an exact negation, then one add."""
    for k in range(k_begin, k_end):
        k0 = tl.load(seeds_ptr + 2 * k).to(tl.uint32, bitcast=True)
        k1 = tl.load(seeds_ptr + 2 * k + 1).to(tl.uint32, bitcast=True)
        cbits = tl.load(coefs_ptr + k).to(tl.uint32, bitcast=True)
        b = _signbits(rb0, stream, k0, k1, NB)
        acc = acc + (cbits ^ (b << 31)).to(tl.float32, bitcast=True)
    return acc


@triton.jit(do_not_specialize=["numel_lo", "numel_hi", "seed_lo", "seed_hi", "stream", "off_lo",
                               "off_hi"])
def rademacher_kernel(out_ptr, numel_lo, numel_hi, seed_lo, seed_hi, stream, off_lo, off_hi,
                      NB: tl.constexpr):
    """out[j] = r(seed, stream, offset + j) (+-1.0) for j < numel: NB Rademacher blocks per program."""
    pid = tl.program_id(0).to(tl.int64)
    numel = _i64(numel_lo, numel_hi)
    offset = _i64(off_lo, off_hi)
    rb0 = (offset >> 7) + pid * NB
    b = _signbits(rb0, _u32(stream), _u32(seed_lo), _u32(seed_hi), NB)
    idx = rb0 * _RAD_BLOCK + tl.arange(0, _RAD_BLOCK * NB).to(tl.int64) - offset
    mask = (idx >= 0) & (idx < numel)
    tl.store(out_ptr + idx, tl.where(b != 0, -1.0, 1.0), mask=mask)


# ------------------------------------------------------------------------------------ gaussian
@triton.jit(do_not_specialize=["numel_lo", "numel_hi", "seed_lo", "seed_hi", "stream", "off_lo",
                               "off_hi"])
def gaussian_kernel(out_ptr, numel_lo, numel_hi, seed_lo, seed_hi, stream, off_lo, off_hi,
                    BLOCK: tl.constexpr):
    """out[j] = z(seed, stream, offset + j) for j < numel (float32 out)."""
    pid = tl.program_id(0).to(tl.int64)
    numel = _i64(numel_lo, numel_hi)
    offset = _i64(off_lo, off_hi)
    gb = (offset >> 2) + pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    c0, c1, c2, c3 = _counter(gb, _u32(stream), _CTR_GAUSS)
    z0, z1, z2, z3 = _normals4(c0, c1, c2, c3, _u32(seed_lo), _u32(seed_hi))
    z = _interleave4(z0, z1, z2, z3, BLOCK)
    idx = ((offset >> 2) + pid * BLOCK) * 4 + tl.arange(0, 4 * BLOCK).to(tl.int64) - offset
    mask = (idx >= 0) & (idx < numel)
    tl.store(out_ptr + idx, z, mask=mask)


# ------------------------------------------------------------------------------------ apply tile
@triton.jit
def _load_f32(ptr, offs, mask, DTYPE: tl.constexpr):
    if DTYPE == _DT_BF16:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True)
        v = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        v = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _round_store(ptr, offs, mask, v, gb0, stream, sr0, sr1, DTYPE: tl.constexpr,
                 ROUNDING: tl.constexpr, BLOCK: tl.constexpr):
    """Round the float32 values v (elements of the Philox blocks gb0 + [0, BLOCK)) and store them."""
    if DTYPE == _DT_F32:
        tl.store(ptr + offs, v, mask=mask)
    else:
        vb = v.to(tl.uint32, bitcast=True)
        if ROUNDING == _RN_SR:
            gb = gb0 + tl.arange(0, BLOCK).to(tl.int64)
            c0, c1, c2, c3 = _counter(gb, stream, 1)
            r0, r1, r2, r3 = _philox(c0, c1, c2, c3, sr0, sr1)
            rb = _interleave4(r0, r1, r2, r3, BLOCK)
            if DTYPE == _DT_BF16:
                out = (vb + (rb >> 16)) >> 16
                out = tl.where(v != v, 0x7FC0, out)
                tl.store(ptr + offs, out.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
            else:
                sign = vb & 0x80000000
                a = (vb & 0x7FFFFFFF).to(tl.float32, bitcast=True)
                e = ((vb >> 23) & 0xFF).to(tl.int32) - 127
                e = tl.maximum(e, -14)
                q = ((e + 117) << 23).to(tl.float32, bitcast=True)  # 2^(e - 10)
                inv_q = ((137 - e) << 23).to(tl.float32, bitcast=True)  # 2^(10 - e)
                y = a * inv_q
                fl = tl.floor(y)
                fr = y - fl
                u = (rb >> 8).to(tl.float32) * _TWO_M24
                up = tl.where(u < fr, 1.0, 0.0)
                res = fl + up
                res = res * q
                res = (res.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
                tl.store(ptr + offs, res.to(tl.float16), mask=mask)
        else:
            if DTYPE == _DT_BF16:
                out = (vb + 0x7FFF + ((vb >> 16) & 1)) >> 16
                out = tl.where(v != v, 0x7FC0, out)
                tl.store(ptr + offs, out.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
            else:
                tl.store(ptr + offs, v.to(tl.float16), mask=mask)


@triton.jit
def _apply_tile(src_ptr, dst_ptr, n, tile, elem_base, acc_ptr, seeds_ptr, coefs_ptr, k_begin, k_end, stream,
                sr0, sr1, DTYPE: tl.constexpr, ROUNDING: tl.constexpr, ACC_IN: tl.constexpr,
                FINAL: tl.constexpr, BLOCK: tl.constexpr, NOISE: tl.constexpr):
    """One program's tile: elements [4 * BLOCK * tile, +4 * BLOCK) of a tensor of n elements; the noise
    index of local element e is elem_base + e (elem_base a multiple of 128).  Seeds k_begin .. k_end - 1;
    NOISE the family (S.NOISE_*).

    ACC_IN: start from the float32 partial sums in acc_ptr (instead of +0.0).  FINAL: dst = round(src +
    acc) (src == dst in place); otherwise store the partial sums to acc_ptr (never rounded to the dtype).
    """
    tile = tile.to(tl.int64)
    gb0 = (elem_base >> 2) + tile * BLOCK  # first Gaussian-sized block (also the rounding bits' block)
    if NOISE == _NZ_RAD:
        tl.static_assert((4 * BLOCK) % 128 == 0)
        offs = tile * (4 * BLOCK) + tl.arange(0, 4 * BLOCK).to(tl.int64)
        mask = offs < n
        if ACC_IN:
            acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
        else:
            acc = tl.zeros([4 * BLOCK], tl.float32)
        acc = _accumulate_signs(acc, (elem_base + tile * (4 * BLOCK)) >> 7, stream, seeds_ptr,
                                coefs_ptr, k_begin, k_end, (4 * BLOCK) // _RAD_BLOCK)
        if FINAL:
            v = _load_f32(src_ptr, offs, mask, DTYPE) + acc
            _round_store(dst_ptr, offs, mask, v, gb0, stream, sr0, sr1, DTYPE, ROUNDING, BLOCK)
        else:
            tl.store(acc_ptr + offs, acc, mask=mask)
    else:
        _apply_tile_gaussian(src_ptr, dst_ptr, n, tile, gb0, acc_ptr, seeds_ptr, coefs_ptr, k_begin,
                             k_end, stream, sr0, sr1, DTYPE, ROUNDING, ACC_IN, FINAL, BLOCK)


@triton.jit
def _apply_tile_gaussian(src_ptr, dst_ptr, n, tile, gb0, acc_ptr, seeds_ptr, coefs_ptr, k_begin,
                         k_end, stream, sr0, sr1, DTYPE: tl.constexpr, ROUNDING: tl.constexpr,
                         ACC_IN: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr):
    """_apply_tile for the Gaussian family: four lane accumulators [BLOCK], one Philox call per block."""
    lb = tile * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # local Philox block
    c0, c1, c2, c3 = _counter(gb0 + tl.arange(0, BLOCK).to(tl.int64), stream, _CTR_GAUSS)
    if ACC_IN:
        e0 = lb * 4
        acc0 = tl.load(acc_ptr + e0, mask=e0 < n, other=0.0)
        acc1 = tl.load(acc_ptr + e0 + 1, mask=e0 + 1 < n, other=0.0)
        acc2 = tl.load(acc_ptr + e0 + 2, mask=e0 + 2 < n, other=0.0)
        acc3 = tl.load(acc_ptr + e0 + 3, mask=e0 + 3 < n, other=0.0)
    else:
        acc0 = tl.zeros([BLOCK], tl.float32)
        acc1 = tl.zeros([BLOCK], tl.float32)
        acc2 = tl.zeros([BLOCK], tl.float32)
        acc3 = tl.zeros([BLOCK], tl.float32)
    acc0, acc1, acc2, acc3 = _accumulate4(acc0, acc1, acc2, acc3, c0, c1, c2, c3, seeds_ptr,
                                          coefs_ptr, k_begin, k_end)
    if FINAL:
        offs = tile * (4 * BLOCK) + tl.arange(0, 4 * BLOCK).to(tl.int64)
        mask = offs < n
        acc = _interleave4(acc0, acc1, acc2, acc3, BLOCK)
        v = _load_f32(src_ptr, offs, mask, DTYPE) + acc
        _round_store(dst_ptr, offs, mask, v, gb0, stream, sr0, sr1, DTYPE, ROUNDING, BLOCK)
    else:
        e0 = lb * 4
        tl.store(acc_ptr + e0, acc0, mask=e0 < n)
        tl.store(acc_ptr + e0 + 1, acc1, mask=e0 + 1 < n)
        tl.store(acc_ptr + e0 + 2, acc2, mask=e0 + 2 < n)
        tl.store(acc_ptr + e0 + 3, acc3, mask=e0 + 3 < n)


@triton.jit(do_not_specialize=["n_lo", "n_hi", "base_lo", "base_hi", "k_begin", "k_end", "stream",
                               "sr_lo", "sr_hi"])
def apply_kernel(src_ptr, dst_ptr, n_lo, n_hi, base_lo, base_hi, acc_ptr, seeds_ptr, coefs_ptr,
                 k_begin, k_end, stream, sr_lo, sr_hi, DTYPE: tl.constexpr, ROUNDING: tl.constexpr,
                 ACC_IN: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr,
                 NOISE: tl.constexpr):
    """One tensor of n elements: dst = round(src + acc) (the same pointer in place; bf16 passed as
    int16).  seeds_ptr: int32 [2K] (lo, hi words)."""
    _apply_tile(src_ptr, dst_ptr, _i64(n_lo, n_hi), tl.program_id(0), _i64(base_lo, base_hi), acc_ptr, seeds_ptr,
                coefs_ptr, k_begin, k_end, _u32(stream), _u32(sr_lo), _u32(sr_hi), DTYPE, ROUNDING, ACC_IN,
                FINAL, BLOCK, NOISE)


@triton.jit(do_not_specialize=["T", "K", "sr_lo", "sr_hi"])
def apply_multi_kernel(table_ptr, T, seeds_ptr, coefs_ptr, K, sr_lo, sr_hi, DTYPE: tl.constexpr,
                       ROUNDING: tl.constexpr, BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                       NOISE: tl.constexpr):
    """Many tensors of one dtype in one launch, through the device-side int64 plan table
    [len(PLAN_FIELDS), T]: row PLAN_SRC the source addresses, PLAN_DST the destination addresses (the
    same in place), PLAN_NUMEL the element counts, PLAN_STREAM the stream ids, PLAN_FIRST_TILE the first
    program of each tensor (ascending, starting at 0).  Program pid finds its tensor by binary search."""
    pid = tl.program_id(0).to(tl.int64)
    lo = pid * 0
    size = pid * 0 + T
    for _ in tl.static_range(SEARCH_STEPS):
        half = size // 2
        first = tl.load(table_ptr + _PLAN_FIRST_TILE * T + lo + half)
        lo = tl.where(first <= pid, lo + half, lo)
        size = size - half
    src = tl.load(table_ptr + _PLAN_SRC * T + lo)
    dst = tl.load(table_ptr + _PLAN_DST * T + lo)
    n = tl.load(table_ptr + _PLAN_NUMEL * T + lo)
    stream = tl.load(table_ptr + _PLAN_STREAM * T + lo).to(tl.uint32)
    tile = pid - tl.load(table_ptr + _PLAN_FIRST_TILE * T + lo)
    if DTYPE == _DT_F32:
        src_ptr = src.to(tl.pointer_type(tl.float32))
        dst_ptr = dst.to(tl.pointer_type(tl.float32))
    elif DTYPE == _DT_BF16:
        src_ptr = src.to(tl.pointer_type(tl.int16))
        dst_ptr = dst.to(tl.pointer_type(tl.int16))
    else:
        src_ptr = src.to(tl.pointer_type(tl.float16))
        dst_ptr = dst.to(tl.pointer_type(tl.float16))
    _apply_tile(src_ptr, dst_ptr, n, tile, n * 0, coefs_ptr, seeds_ptr, coefs_ptr, 0, K, stream,
                _u32(sr_lo), _u32(sr_hi), DTYPE, ROUNDING, False, True, BLOCK, NOISE)


@triton.jit(do_not_specialize=["K", "stream"])
def noise_floor_kernel(out_ptr, seeds_ptr, coefs_ptr, K, stream, BLOCK: tl.constexpr,
                       NOISE: tl.constexpr):
    """Benchmark floor: generate and sum the K terms (of the NOISE family) of n elements like
    apply_kernel, but read no tensor and write one float per program (so the work cannot be optimised
    away)."""
    pid = tl.program_id(0).to(tl.int64)
    if NOISE == _NZ_RAD:
        acc = tl.zeros([4 * BLOCK], tl.float32)
        acc = _accumulate_signs(acc, pid * ((4 * BLOCK) // _RAD_BLOCK), _u32(stream), seeds_ptr,
                                coefs_ptr, 0, K, (4 * BLOCK) // _RAD_BLOCK)
        tot = tl.sum(acc, axis=0)
    else:
        gb = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        c0, c1, c2, c3 = _counter(gb, _u32(stream), _CTR_GAUSS)
        acc0 = tl.zeros([BLOCK], tl.float32)
        acc1 = tl.zeros([BLOCK], tl.float32)
        acc2 = tl.zeros([BLOCK], tl.float32)
        acc3 = tl.zeros([BLOCK], tl.float32)
        acc0, acc1, acc2, acc3 = _accumulate4(acc0, acc1, acc2, acc3, c0, c1, c2, c3, seeds_ptr,
                                              coefs_ptr, 0, K)
        tot = tl.sum(acc0 + acc1 + acc2 + acc3, axis=0)
    tl.store(out_ptr + pid, tot)


@triton.jit
def philox_kernel(ctr_ptr, key_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Philox4x32-10 of n counters (int32 [n, 4]) and keys (int32 [n, 2]) -> int32 [n, 4] (tests)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    c0 = tl.load(ctr_ptr + 4 * i, mask=m, other=0).to(tl.uint32, bitcast=True)
    c1 = tl.load(ctr_ptr + 4 * i + 1, mask=m, other=0).to(tl.uint32, bitcast=True)
    c2 = tl.load(ctr_ptr + 4 * i + 2, mask=m, other=0).to(tl.uint32, bitcast=True)
    c3 = tl.load(ctr_ptr + 4 * i + 3, mask=m, other=0).to(tl.uint32, bitcast=True)
    k0 = tl.load(key_ptr + 2 * i, mask=m, other=0).to(tl.uint32, bitcast=True)
    k1 = tl.load(key_ptr + 2 * i + 1, mask=m, other=0).to(tl.uint32, bitcast=True)
    x0, x1, x2, x3 = _philox(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + 4 * i, x0.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 4 * i + 1, x1.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 4 * i + 2, x2.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 4 * i + 3, x3.to(tl.int32, bitcast=True), mask=m)


# ------------------------------------------------------------------------------ project (spec 9)
_PROJ_B = tl.constexpr(S.PROJECT_BLOCK)
_PROJ_L = tl.constexpr(S.PROJECT_LANES)


@triton.jit
def _fold_half(acc, NS: tl.constexpr, H: tl.constexpr):
    """[NS, 2 H] -> [NS, H]: lane l + lane l + H (spec 9.1 step 3, one level)."""
    a, b = tl.split(tl.permute(tl.reshape(acc, [NS, 2, H]), (0, 2, 1)))
    return a + b


@triton.jit
def _fold16(acc, NS: tl.constexpr):
    """The fold of 16 float32 lane sums [NS, 16] (upper half onto lower, h = 8, 4, 2, 1) -> [NS]."""
    acc = _fold_half(acc, NS, 8)
    acc = _fold_half(acc, NS, 4)
    acc = _fold_half(acc, NS, 2)
    acc = _fold_half(acc, NS, 1)
    return tl.reshape(acc, [NS])


@triton.jit(do_not_specialize=["n_lo", "n_hi", "b_lo", "b_hi", "o_lo", "o_hi", "K", "stream"])
def project_kernel(x_ptr, n_lo, n_hi, b_lo, b_hi, sums_ptr, o_lo, o_hi, seeds_ptr, K, stream,
                   DTYPE: tl.constexpr, NOISE: tl.constexpr, NS: tl.constexpr):
    """Block sums (docs/SPEC.md section 9.1) of one tensor of n elements: program (p, q) takes block
    b = first + p (elements 2048 b + [0, 2048)) and seeds q * NS + [0, NS), and writes
    sums[(o + p) * K + k].  A seed's 16 lanes are a row of the [NS, 16] accumulator (the Gaussian keeps
    them as four [NS, 4] columns, lane 4 q + w in column w), each adding its products in ascending index
    (a sequential loop over the block's 128 rows of 16 elements)."""
    p = tl.program_id(0).to(tl.int64)
    n = _i64(n_lo, n_hi)
    b = _i64(b_lo, b_hi) + p
    row = _i64(o_lo, o_hi) + p
    st = _u32(stream)
    ks = tl.program_id(1) * NS + tl.arange(0, NS)
    kmask = ks < K
    k0 = tl.load(seeds_ptr + 2 * ks, mask=kmask, other=0).to(tl.uint32, bitcast=True)[:, None]
    k1 = tl.load(seeds_ptr + 2 * ks + 1, mask=kmask, other=0).to(tl.uint32, bitcast=True)[:, None]
    e_blk = b * _PROJ_B
    if NOISE == _NZ_RAD:
        lanes = tl.arange(0, 16)
        acc = tl.zeros([NS, 16], tl.float32)
        for rb in range(_PROJ_B // _RAD_BLOCK):  # the block's 16 Rademacher Philox blocks
            gb = tl.zeros([1, 1], tl.int64) + (b * (_PROJ_B // _RAD_BLOCK) + rb)
            c0, c1, c2, c3 = _counter(gb, st, _CTR_RAD)
            x0, x1, x2, x3 = _philox(c0, c1, c2, c3, k0, k1)
            for jj in tl.static_range(8):  # rows of 16 elements: word jj // 2, bits 16 (jj % 2) + l
                if jj // 2 == 0:
                    w = x0
                elif jj // 2 == 1:
                    w = x1
                elif jj // 2 == 2:
                    w = x2
                else:
                    w = x3
                offs = e_blk + rb * _RAD_BLOCK + jj * 16 + lanes
                xv = _load_f32(x_ptr, offs, offs < n, DTYPE)[None, :]
                bit = (w >> (16 * (jj % 2) + lanes.to(tl.uint32))[None, :]) & 1
                acc = acc + (xv.to(tl.uint32, bitcast=True) ^ (bit << 31)).to(tl.float32, bitcast=True)
        tot = _fold16(acc, NS)
    else:
        q = tl.arange(0, 4)
        a0 = tl.zeros([NS, 4], tl.float32)
        a1 = tl.zeros([NS, 4], tl.float32)
        a2 = tl.zeros([NS, 4], tl.float32)
        a3 = tl.zeros([NS, 4], tl.float32)
        for j in range(_PROJ_B // 16):  # row j: elements 16 j + 4 q + w, Philox block 4 j + q
            gb = (b * (_PROJ_B // 4) + 4 * j + q).to(tl.int64)[None, :]
            c0, c1, c2, c3 = _counter(gb, st, _CTR_GAUSS)
            z0, z1, z2, z3 = _normals4(c0, c1, c2, c3, k0, k1)
            offs = e_blk + 16 * j + 4 * q
            a0 = a0 + _load_f32(x_ptr, offs, offs < n, DTYPE)[None, :] * z0
            a1 = a1 + _load_f32(x_ptr, offs + 1, offs + 1 < n, DTYPE)[None, :] * z1
            a2 = a2 + _load_f32(x_ptr, offs + 2, offs + 2 < n, DTYPE)[None, :] * z2
            a3 = a3 + _load_f32(x_ptr, offs + 3, offs + 3 < n, DTYPE)[None, :] * z3
        tot = _fold16(tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), [NS, 16]), NS)
    tl.store(sums_ptr + row * K + ks, tot, mask=kmask)


@triton.jit(do_not_specialize=["nblocks", "K"])
def project_sum_kernel(sums_ptr, nblocks, K, acc_ptr, out_ptr, FINAL: tl.constexpr, BK: tl.constexpr):
    """Spec 9.1 step 4 for seeds pid * BK + [0, BK): acc (float64 [K], read and written) plus the block
    sums sums[b * K + k] of blocks b = 0 .. nblocks - 1 in order, in float64; FINAL: out = float32(acc)."""
    ks = tl.program_id(0) * BK + tl.arange(0, BK)
    m = ks < K
    acc = tl.load(acc_ptr + ks, mask=m, other=0.0)
    ptrs = sums_ptr + ks
    for _ in range(nblocks):  # block b's sums at sums_ptr + b * K (pointer arithmetic: 64-bit)
        acc = acc + tl.load(ptrs, mask=m, other=0.0).to(tl.float64)
        ptrs += K
    tl.store(acc_ptr + ks, acc, mask=m)
    if FINAL:
        tl.store(out_ptr + ks, acc.to(tl.float32), mask=m)
