"""Constants of the kseed noise spec (docs/SPEC.md), as exact float32 bit patterns, and the small codes
every backend shares (dtype and rounding codes, the multi-tensor plan's table layout).

Every backend uses exactly these numbers.  csrc/kseed_spec.h holds the same spec values for C++ and CUDA
(LOG_C0.., SIN_C0.., COS_C0..), csrc/kseed_types.h the same dtype and rounding codes, csrc/kseed_plan.h
the same plan row; tests/test_spec_constants.py checks that the copies agree.
"""
import struct


def _f32(bits: int) -> float:
    """The float32 whose bit pattern is ``bits``, as a Python float (exact)."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


# Philox4x32-10 (Random123).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

# Counter word 3 selects the purpose of the Philox block.
COUNTER_GAUSSIAN = 0
COUNTER_STOCHASTIC_ROUNDING = 1
COUNTER_RADEMACHER = 2
# Elements per Philox block: the Gaussian uses one 32-bit word per element (4 a block), the Rademacher
# family one bit (128 a block).
GAUSSIAN_BLOCK = 4
RADEMACHER_BLOCK = 128
# project_seeds (docs/SPEC.md section 9): elements per block of the fixed summation order, and lanes per
# block (element i goes to lane i mod PROJECT_LANES).
PROJECT_BLOCK = 2048
PROJECT_LANES = 16
# The noise families of the public API, and their codes in the compiled ops (csrc/kseed_types.h: enum
# Noise).
NOISES = ("gaussian", "rademacher")
NOISE_GAUSSIAN = 0
NOISE_RADEMACHER = 1
NOISE_CODES = {"gaussian": NOISE_GAUSSIAN, "rademacher": NOISE_RADEMACHER}

# log(1 + t) = t * P(t), P(t) = sum_k LOG_COEFS[k] t^k, t in [sqrt(1/2) - 1, sqrt(2) - 1].
LOG_COEF_BITS = (
    0x3F800000, 0xBEFFFFFC, 0x3EAAAAA8, 0xBE800214, 0x3E4CD23B,
    0xBE2A13D4, 0x3E11343A, 0xBE079613, 0x3E043DB9, 0xBD9C7039,
)
# ln 2 split so that e * LN2_HI is exact for |e| <= 31.
LN2_HI_BITS = 0x3F317180
LN2_LO_BITS = 0x3717F7D1
# Mantissa threshold: f = 1.mant > sqrt(2)  <=>  mant bits > SQRT2_MANT.
SQRT2_MANT = 0x3504F3

# sin(pi/4 * y) = y * S(y^2), cos(pi/4 * y) = C(y^2), y in (-1, 1).
SIN_COEF_BITS = (0x3F490FDB, 0xBDA55DE7, 0x3B2335DD, 0xB819654F, 0x34A5E43E)
COS_COEF_BITS = (0x3F800000, 0xBE9DE9E6, 0x3C81E0EE, 0xB9AAE2BD, 0x366CE193)

LOG_COEFS = tuple(_f32(b) for b in LOG_COEF_BITS)
SIN_COEFS = tuple(_f32(b) for b in SIN_COEF_BITS)
COS_COEFS = tuple(_f32(b) for b in COS_COEF_BITS)
LN2_HI = _f32(LN2_HI_BITS)
LN2_LO = _f32(LN2_LO_BITS)

# Element types of weight tensors, by torch dtype name (csrc/kseed_types.h: enum class DType).
DTYPE_F32 = 0
DTYPE_BF16 = 1
DTYPE_F16 = 2
DTYPE_CODES = {"float32": DTYPE_F32, "bfloat16": DTYPE_BF16, "float16": DTYPE_F16}

# Rounding of the final write (csrc/kseed_types.h: enum Rounding), by the public API's names.
ROUND_NEAREST = 0
ROUND_STOCHASTIC = 1
ROUNDING_CODES = {"nearest": ROUND_NEAREST, "stochastic": ROUND_STOCHASTIC}

# The multi-tensor plan of an apply call (csrc/kseed_plan.h: struct PlanRow, used by the CPU and CUDA
# kernels): one row per tensor with these fields, in this order.  The Triton backend keeps the same
# layout as an int64 table [len(PLAN_FIELDS), T] whose row f holds field PLAN_FIELDS[f] of every tensor
# (src and dst are data addresses, src == dst for the in-place update).
PLAN_FIELDS = ("src", "dst", "numel", "stream", "first_tile")
PLAN_SRC, PLAN_DST, PLAN_NUMEL, PLAN_STREAM, PLAN_FIRST_TILE = range(len(PLAN_FIELDS))

# Stochastic-rounding key (see docs/SPEC.md, "Stochastic rounding").
SR_KEY_INIT = 0x6B73656564535221
MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF


def splitmix64(x: int) -> int:
    """splitmix64's finaliser on one uint64 (Python int)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _splitmix64_np(z):
    import numpy as np

    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def f32_bits(x: float) -> int:
    """Bit pattern of float32(x) (round to nearest even)."""
    return struct.unpack("<I", struct.pack("<f", x))[0]


def sr_key(seeds_u64, coef_bits_u32) -> int:
    """The 64-bit Philox key of the stochastic-rounding bits of one apply call.

    ``seeds_u64``: numpy uint64 array [K]; ``coef_bits_u32``: numpy uint32 bit patterns of the float32
    coefficients [K].  m_k = splitmix64(s_k ^ splitmix64(cbits_k | k << 32)),
    key = splitmix64(SR_KEY_INIT ^ xor_k m_k).  Vectorised: O(K) with no Python loop.
    """
    import numpy as np

    seeds = np.asarray(seeds_u64, dtype=np.uint64)
    cb = np.asarray(coef_bits_u32, dtype=np.uint32).astype(np.uint64)
    k = np.arange(seeds.shape[0], dtype=np.uint64)
    m = _splitmix64_np(seeds ^ _splitmix64_np(cb | (k << np.uint64(32))))
    acc = int(np.bitwise_xor.reduce(m)) if m.size else 0
    return splitmix64(SR_KEY_INIT ^ acc)
