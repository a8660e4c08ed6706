"""The pure-PyTorch reference: the executable form of docs/SPEC.md and the tests' oracle.

Everything here is vectorised over elements (the only Python loops run over seeds, tensors or the ten
Philox rounds).  Integers are uint32 values held in int64 tensors; no product ever exceeds 2^63.  Floats
are float32 and every operation is a single IEEE add, sub, mul or sqrt, so the result is bitwise the
same as the C++, CUDA and Triton backends.  The float work runs with IEEE subnormals whatever the
process's flush-to-zero mode (kseed_kernels._ieee).

This module knows nothing of input validation: ``kseed_kernels.ops`` validates and normalises the
arguments, then calls into a backend.
"""
from __future__ import annotations

import torch

from . import _spec as S
from ._ieee import ieee

_M32 = S.MASK32
# Rows per chunk when the reference generates noise for a large tensor (bounds its memory).
_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------- Philox
def _mulhilo(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit halves of the 64-bit product a * m, a uint32 values in int64, m a uint32."""
    a_lo = a & 0xFFFF
    a_hi = a >> 16
    p_lo = a_lo * m  # < 2^48
    p_hi = a_hi * m  # < 2^48
    s = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    lo = s & _M32
    hi = (p_hi >> 16) + (s >> 32)
    return hi & _M32, lo


def philox_rounds(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors (or ints for the key) holding uint32 values."""
    for _ in range(S.PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, S.PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, S.PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + S.PHILOX_W0) & _M32
        k1 = (k1 + S.PHILOX_W1) & _M32
    return c0, c1, c2, c3


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of int64 tensors counter [..., 4] and key [..., 2] (uint32 values)."""
    c = [counter[..., i] for i in range(4)]
    k0, k1 = key[..., 0], key[..., 1]
    out = philox_rounds(*c, k0, k1)
    return torch.stack(out, dim=-1)


def _blocks(seed: int, stream: int, first_block: int, nblocks: int, word3: int, device):
    """The four output words of Philox blocks first_block .. first_block + nblocks - 1."""
    b = torch.arange(first_block, first_block + nblocks, dtype=torch.int64, device=device)
    c0 = b & _M32
    c1 = b >> 32
    c2 = torch.full_like(b, stream & _M32)
    c3 = torch.full_like(b, word3)
    return philox_rounds(c0, c1, c2, c3, seed & _M32, (seed >> 32) & _M32)


# ------------------------------------------------------------------------------ normal transform
def _f32(x: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, device=like.device)


def _horner(coefs, x: torch.Tensor) -> torch.Tensor:
    """sum_k coefs[k] x^k by Horner's rule, one rounded mul then one rounded add per step."""
    acc = torch.full_like(x, coefs[-1])
    for c in reversed(coefs[:-1]):
        acc = acc * x
        acc = acc + c
    return acc


def _log_uniform(xa: torch.Tensor) -> torch.Tensor:
    """log(u1) in float32 for u1 = (2 * (xa >> 9) + 1) * 2^-24, by the spec's exact range reduction."""
    n1 = ((xa >> 9) << 1) | 1  # odd, < 2^24: exact in float32
    v = n1.to(torch.float32)
    bits = v.view(torch.int32).to(torch.int64)
    mant = bits & 0x7FFFFF
    big = mant > S.SQRT2_MANT
    e = ((bits >> 23) - 127 - 24) + big.to(torch.int64)  # in [-24, 0]
    f = (mant | 0x3F800000).to(torch.int32).view(torch.float32)
    f = torch.where(big, f * 0.5, f)
    t = f - 1.0  # exact (Sterbenz)
    logf = t * _horner(S.LOG_COEFS, t)
    ef = e.to(torch.float32)
    return ef * S.LN2_HI + (ef * S.LN2_LO + logf)


def _sincos_uniform(xb: torch.Tensor):
    """(cos, sin) of 2 pi u2 for u2 = (2 * (xb >> 9) + 1) * 2^-24, exact reduction to [-pi/4, pi/4]."""
    m2 = xb >> 9
    k = (m2 + (1 << 20)) >> 21
    j = ((m2 << 1) | 1) - (k << 22)  # odd, |j| < 2^21
    y = j.to(torch.float32) * (2.0 ** -21)  # exact
    w = y * y
    s = y * _horner(S.SIN_COEFS, w)
    c = _horner(S.COS_COEFS, w)
    q = k & 3
    cos_t = torch.where(q == 0, c, torch.where(q == 1, -s, torch.where(q == 2, -c, s)))
    sin_t = torch.where(q == 0, s, torch.where(q == 1, c, torch.where(q == 2, -s, -c)))
    return cos_t, sin_t


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root.

    torch.sqrt on float32 CPU tensors is not correctly rounded (about 0.7 % of results are 1 ulp off on
    torch 2.13), so take it in float64 and round once: the double result is exact enough that rounding
    it to float32 gives the correctly rounded float32 square root.
    """
    return torch.sqrt(x.double()).float()


def box_muller(xa: torch.Tensor, xb: torch.Tensor):
    """The spec's two normals (r cos, r sin) from two uint32 Philox words."""
    log_u = _log_uniform(xa)
    r = sqrt_rn(log_u * -2.0)
    cos_t, sin_t = _sincos_uniform(xb)
    return r * cos_t, r * sin_t


def _normals_of_blocks(x0, x1, x2, x3) -> torch.Tensor:
    """[nblocks, 4] float32 normals: lanes (0, 1) from (x0, x1), lanes (2, 3) from (x2, x3)."""
    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    return torch.stack((z0, z1, z2, z3), dim=-1)


def _element_span(offset: int, numel: int, per: int = S.GAUSSIAN_BLOCK):
    """(first block, block count, elements to skip in the first block) covering elements [offset,
    offset + numel) in blocks of ``per`` elements."""
    first_block = offset // per
    last_block = (offset + numel + per - 1) // per
    return first_block, last_block - first_block, offset - first_block * per


def gaussian(seed: int, numel: int, stream: int = 0, offset: int = 0, device=None) -> torch.Tensor:
    """float32 tensor of z(seed, stream, offset + j) for j in [0, numel)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for start in range(0, numel, _CHUNK * 4):
        n = min(_CHUNK * 4, numel - start)
        fb, nb, skip = _element_span(offset + start, n)
        words = _blocks(seed, stream, fb, nb, S.COUNTER_GAUSSIAN, device)
        out[start:start + n] = _normals_of_blocks(*words).reshape(-1)[skip:skip + n]
    return out


def rademacher_signbits(seed: int, numel: int, stream: int = 0, offset: int = 0,
                        device=None) -> torch.Tensor:
    """int64 tensor of the sign bits of r(seed, stream, offset + j), j in [0, numel) (spec section 8):
    1 where r = -1, 0 where r = +1."""
    device = torch.device("cpu") if device is None else torch.device(device)
    out = torch.empty(numel, dtype=torch.int64, device=device)
    per = S.RADEMACHER_BLOCK
    shifts = torch.arange(32, dtype=torch.int64, device=device)
    for start in range(0, numel, _CHUNK * per):
        n = min(_CHUNK * per, numel - start)
        fb, nb, skip = _element_span(offset + start, n, per)
        words = torch.stack(_blocks(seed, stream, fb, nb, S.COUNTER_RADEMACHER, device), dim=-1)
        # [nb, 4] words -> [nb, 4, 32] bits, least significant first: element p of a block is bit
        # (p & 31) of word p >> 5, which is exactly this row-major order.
        bits = ((words.unsqueeze(-1) >> shifts) & 1).reshape(-1)
        out[start:start + n] = bits[skip:skip + n]
    return out


def rademacher(seed: int, numel: int, stream: int = 0, offset: int = 0, device=None) -> torch.Tensor:
    """float32 tensor of r(seed, stream, offset + j) in {-1, +1}, j in [0, numel) (spec section 8)."""
    b = rademacher_signbits(seed, numel, stream, offset, device)
    return (1 - 2 * b).to(torch.float32)


def random_bits(key: int, numel: int, stream: int = 0, offset: int = 0, device=None) -> torch.Tensor:
    """int64 tensor of the uint32 stochastic-rounding words of elements offset .. offset + numel - 1."""
    device = torch.device("cpu") if device is None else torch.device(device)
    fb, nb, skip = _element_span(offset, numel)
    words = _blocks(key, stream, fb, nb, S.COUNTER_STOCHASTIC_ROUNDING, device)
    return torch.stack(words, dim=-1).reshape(-1)[skip:skip + numel]


# ----------------------------------------------------------------------------------- rounding
@ieee
def round_stochastic(v: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stochastically round float32 ``v`` to ``dtype`` with uint32 random words ``bits`` (spec)."""
    if dtype == torch.bfloat16:
        vb = v.view(torch.int32).to(torch.int64) & _M32
        r = (vb + (bits >> 16)) & 0xFFFF0000  # < 2^32: never carries past the sign bit
        r = torch.where(r >= (1 << 31), r - (1 << 32), r)  # back to the signed int32 range
        out = r.to(torch.int32).view(torch.float32)  # exactly a bfloat16 value
        return torch.where(torch.isnan(v), v, out).to(torch.bfloat16)
    if dtype == torch.float16:
        a = v.abs()
        e = ((a.view(torch.int32).to(torch.int64) >> 23) & 0xFF) - 127
        e = torch.clamp(e, min=-14)
        q = ((e - 10 + 127) << 23).to(torch.int32).view(torch.float32)  # 2^(e - 10)
        inv_q = ((10 - e + 127) << 23).to(torch.int32).view(torch.float32)  # 2^(10 - e)
        y = a * inv_q
        fl = torch.floor(y)
        fr = y - fl
        u = (bits >> 8).to(torch.float32) * (2.0 ** -24)
        up = (u < fr).to(torch.float32)
        res = (fl + up) * q
        return torch.copysign(res, v).to(torch.float16)
    raise ValueError(f"stochastic rounding is defined for bfloat16 and float16, not {dtype}")


# -------------------------------------------------------------------------------------- apply
@ieee
def noise_sum(seeds, coefs: torch.Tensor, numel: int, stream: int, offset: int, device,
              noise: str = "gaussian") -> torch.Tensor:
    """acc = sum_k c_k n_k in float32, ascending k, starting from +0.0: for the Gaussian one mul then
    one add a term; for the Rademacher family one exact sign flip (c_k or -c_k) then one add."""
    acc = torch.zeros(numel, dtype=torch.float32, device=device)
    cf = coefs.to(device=device, dtype=torch.float32)
    for k, s in enumerate(seeds):
        if noise == "rademacher":
            neg = rademacher_signbits(int(s), numel, stream, offset, device).bool()
            acc = acc + torch.where(neg, -cf[k], cf[k])
        else:
            acc = acc + cf[k] * gaussian(int(s), numel, stream, offset, device)
    return acc


@ieee
def apply_flat_(flat: torch.Tensor, seeds, coefs: torch.Tensor, stream: int, rounding: str,
                sr_key: int, base: torch.Tensor | None = None,
                noise: str = "gaussian") -> torch.Tensor:
    """The update of a contiguous 1-d tensor, chunked to bound memory: flat = round(src + acc) with src
    = base (a contiguous 1-d tensor of flat's size and dtype, only read) or flat itself (in place), and
    acc the sum over the seeds of the ``noise`` family (spec sections 4 and 8)."""
    n = flat.numel()
    src = flat if base is None else base
    for start in range(0, n, _CHUNK):
        part = flat[start:start + _CHUNK]
        m = part.numel()
        v = src[start:start + m].to(torch.float32) + noise_sum(seeds, coefs, m, stream, start,
                                                               flat.device, noise)
        if flat.dtype == torch.float32:
            part.copy_(v)
        elif rounding == "stochastic":
            part.copy_(round_stochastic(v, random_bits(sr_key, m, stream, start, flat.device),
                                        flat.dtype))
        else:
            part.copy_(v.to(flat.dtype))
    return flat


def apply_seeds_(tensor: torch.Tensor, seeds, coefs: torch.Tensor, stream: int = 0,
                 rounding: str = "nearest", sr_key: int = 0,
                 base: torch.Tensor | None = None, noise: str = "gaussian") -> torch.Tensor:
    """Reference apply_seeds_ on normalised inputs: seeds a list of uint64 ints, coefs float32 [K].

    With ``base`` (same shape and dtype, only read): tensor = round(base + acc), the out-of-place form.
    K = 0 then copies base into tensor.
    """
    if base is not None and len(seeds) == 0:
        tensor.copy_(base)
        return tensor
    if len(seeds) == 0 or tensor.numel() == 0:
        return tensor
    src = None if base is None else base.contiguous().view(-1)
    if tensor.is_contiguous():
        apply_flat_(tensor.view(-1), seeds, coefs, stream, rounding, sr_key, src, noise)
    else:
        flat = torch.empty(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        if src is None:
            flat.copy_(tensor.reshape(-1))
        apply_flat_(flat, seeds, coefs, stream, rounding, sr_key, src, noise)
        tensor.copy_(flat.view(tensor.shape))
    return tensor



# ------------------------------------------------------------------------------------ project
def project_block_sums(flat: torch.Tensor, seeds, stream: int, noise: str = "gaussian") -> torch.Tensor:
    """float32 [K, nb]: the block sums S_b of docs/SPEC.md section 9.1 of a 1-d tensor (any float
    dtype, read as float32) for each seed, nb = ceil(numel / PROJECT_BLOCK).

    The last block is padded with +0.0 (spec 9.1: the same as skipping the missing elements).  Per seed
    the products x_i * n_i are one float32 multiply each (for the Rademacher family an exact sign flip);
    each of the 16 lanes sums its 128 products in ascending index, a sequential float32 loop (vectorised
    over blocks and lanes); the lanes are then folded, upper half onto lower half."""
    B, L = S.PROJECT_BLOCK, S.PROJECT_LANES
    n = flat.numel()
    nb = -(-n // B)
    x = torch.zeros(nb * B, dtype=torch.float32, device=flat.device)
    x[:n] = flat.to(torch.float32)
    x = x.view(nb, B // L, L)
    out = torch.empty(len(seeds), nb, dtype=torch.float32, device=flat.device)
    for k, s in enumerate(seeds):
        if noise == "rademacher":
            neg = rademacher_signbits(int(s), nb * B, stream, 0, flat.device).bool().view(nb, B // L, L)
            p = torch.where(neg, -x, x)
        else:
            p = x * gaussian(int(s), nb * B, stream, 0, flat.device).view(nb, B // L, L)
        lanes = torch.zeros(nb, L, dtype=torch.float32, device=flat.device)
        for j in range(B // L):
            lanes = lanes + p[:, j, :]
        h = L // 2
        while h >= 1:
            lanes = lanes[:, :h] + lanes[:, h:2 * h]
            h //= 2
        out[k] = lanes[:, 0]
    return out


@ieee
def project_seeds_multi(tensors, streams, seeds, noise: str = "gaussian") -> torch.Tensor:
    """Reference project_seeds_multi on normalised inputs (seeds a list of uint64 ints): float32 [K],
    c_k = float32 of the float64 sum of every tensor's block sums, tensor by tensor in list order and
    block by block (docs/SPEC.md section 9.2), a sequential loop over the blocks."""
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    total = torch.zeros(len(seeds), dtype=torch.float64, device=device)
    for t, st in zip(tensors, streams):
        if t.numel() == 0 or len(seeds) == 0:
            continue
        sums = project_block_sums(t.reshape(-1), seeds, st, noise).double()
        for b in range(sums.shape[1]):
            total = total + sums[:, b]
    return total.to(torch.float32)
