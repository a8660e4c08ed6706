// Torch-free scalar core of the kseed noise spec (docs/SPEC.md): Philox4x32-10, the exact-reduction
// Box-Muller transform and stochastic rounding.  Host and device code share it: under nvcc every
// function is __host__ __device__.  All float arithmetic is single IEEE operations in the spec's order;
// build with -ffp-contract=off (host) and --fmad=false (nvcc) so nothing is contracted into an fma.
#pragma once
#include <cstdint>
#include <cstring>

#include "kseed_spec.h"

#if defined(__CUDACC__)
#define KSEED_HD __host__ __device__ __forceinline__
#else
#define KSEED_HD inline
#endif

namespace kseed {

KSEED_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

KSEED_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

// Explicitly rounded float ops: on the device these are the _rn intrinsics, which nvcc never fuses.
KSEED_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
KSEED_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
KSEED_HD float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
KSEED_HD float fsqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}

struct Key {
  uint32_t k0, k1;
};
struct Block {
  uint32_t x0, x1, x2, x3;
};

KSEED_HD Key key_of(uint64_t seed) { return Key{uint32_t(seed), uint32_t(seed >> 32)}; }

// Philox4x32-10 of counter (c0, c1, c2, c3) and key (k0, k1).
KSEED_HD Block philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < spec::PHILOX_ROUNDS; ++r) {
    const uint64_t p0 = uint64_t(spec::PHILOX_M0) * c0;
    const uint64_t p1 = uint64_t(spec::PHILOX_M1) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += spec::PHILOX_W0;
    k1 += spec::PHILOX_W1;
  }
  return Block{c0, c1, c2, c3};
}

// The block that element indices 4b .. 4b+3 draw from (counter word 3 = purpose).
KSEED_HD Block philox_block(Key key, uint64_t block, uint32_t stream, uint32_t word3) {
  return philox(uint32_t(block), uint32_t(block >> 32), stream, word3, key.k0, key.k1);
}

// log(u1) for u1 = (2 * (xa >> 9) + 1) * 2^-24 (spec 3.2).
KSEED_HD float log_uniform(uint32_t xa) {
  const uint32_t n1 = ((xa >> 9) << 1) | 1u;
  const uint32_t bits = float_to_bits(float(n1));  // exact: n1 < 2^24
  const uint32_t mant = bits & 0x7FFFFFu;
  const bool big = mant > spec::SQRT2_MANT;
  const int e = int(bits >> 23) - 127 - 24 + (big ? 1 : 0);
  float f = bits_to_float(mant | 0x3F800000u);
  f = big ? fmul(f, 0.5f) : f;
  const float t = fsub(f, 1.0f);
  using namespace spec;
  float p = bits_to_float(LOG_C9);
  p = fadd(fmul(p, t), bits_to_float(LOG_C8));
  p = fadd(fmul(p, t), bits_to_float(LOG_C7));
  p = fadd(fmul(p, t), bits_to_float(LOG_C6));
  p = fadd(fmul(p, t), bits_to_float(LOG_C5));
  p = fadd(fmul(p, t), bits_to_float(LOG_C4));
  p = fadd(fmul(p, t), bits_to_float(LOG_C3));
  p = fadd(fmul(p, t), bits_to_float(LOG_C2));
  p = fadd(fmul(p, t), bits_to_float(LOG_C1));
  p = fadd(fmul(p, t), bits_to_float(LOG_C0));
  const float logf_ = fmul(t, p);
  const float ef = float(e);
  return fadd(fmul(ef, bits_to_float(spec::LN2_HI_BITS)),
              fadd(fmul(ef, bits_to_float(spec::LN2_LO_BITS)), logf_));
}

// (cos, sin) of 2 pi u2 for u2 = (2 * (xb >> 9) + 1) * 2^-24 (spec 3.3).
KSEED_HD void sincos_uniform(uint32_t xb, float* cos_out, float* sin_out) {
  const int32_t m2 = int32_t(xb >> 9);
  const int32_t k = (m2 + (1 << 20)) >> 21;
  const int32_t j = ((m2 << 1) | 1) - (k << 22);
  const float y = fmul(float(j), 4.76837158203125e-07f);  // 2^-21, exact
  const float w = fmul(y, y);
  using namespace spec;
  float s = bits_to_float(SIN_C4);
  s = fadd(fmul(s, w), bits_to_float(SIN_C3));
  s = fadd(fmul(s, w), bits_to_float(SIN_C2));
  s = fadd(fmul(s, w), bits_to_float(SIN_C1));
  s = fadd(fmul(s, w), bits_to_float(SIN_C0));
  float c = bits_to_float(COS_C4);
  c = fadd(fmul(c, w), bits_to_float(COS_C3));
  c = fadd(fmul(c, w), bits_to_float(COS_C2));
  c = fadd(fmul(c, w), bits_to_float(COS_C1));
  c = fadd(fmul(c, w), bits_to_float(COS_C0));
  s = fmul(y, s);
  const int q = k & 3;
  *cos_out = q == 0 ? c : q == 1 ? -s : q == 2 ? -c : s;
  *sin_out = q == 0 ? s : q == 1 ? c : q == 2 ? -s : -c;
}

// The spec's two normals from the word pair (xa, xb).
KSEED_HD void box_muller(uint32_t xa, uint32_t xb, float* za, float* zb) {
  const float r = fsqrt(fmul(log_uniform(xa), -2.0f));
  float c, s;
  sincos_uniform(xb, &c, &s);
  *za = fmul(r, c);
  *zb = fmul(r, s);
}

// The four normals of one Philox block (lanes 0..3).
KSEED_HD void normals4(Block b, float z[4]) {
  box_muller(b.x0, b.x1, &z[0], &z[1]);
  box_muller(b.x2, b.x3, &z[2], &z[3]);
}

// z(seed, stream, i) for one element (slow path: a whole block per element).
KSEED_HD float gaussian_at(uint64_t seed, uint32_t stream, uint64_t i) {
  float z[4];
  normals4(philox_block(key_of(seed), i >> 2, stream, spec::COUNTER_GAUSSIAN), z);
  return z[i & 3];
}

KSEED_HD uint32_t lane_of(Block b, unsigned lane) {
  return lane == 0 ? b.x0 : lane == 1 ? b.x1 : lane == 2 ? b.x2 : b.x3;
}

// The sign bit of r(seed, stream, i) (spec 8.1): 1 for r = -1, 0 for r = +1 (slow path: a whole block
// per element).  The term of an apply is c with this bit xor'ed into its sign bit.
KSEED_HD uint32_t rademacher_signbit(uint64_t seed, uint32_t stream, uint64_t i) {
  const Block b = philox_block(key_of(seed), i >> 7, stream, spec::COUNTER_RADEMACHER);
  return (lane_of(b, unsigned(i >> 5) & 3u) >> (i & 31u)) & 1u;
}

// Round-to-nearest-even float32 -> bfloat16 bits (NaN -> the canonical quiet NaN 0x7FC0, as torch's
// c10::BFloat16 does).  The one home of bf16 round-to-nearest for every backend.
KSEED_HD uint16_t round_bf16_nearest(float v) {
  const uint32_t b = float_to_bits(v);
  if (v != v) return uint16_t(0x7FC0u);
  return uint16_t((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// Round-to-nearest-even float32 -> float16 bits, overflow to +-inf; a NaN stays a NaN with its sign and
// the top 10 payload bits, quieted (what the x86 F16C and the aarch64 FCVT conversions write; the spec
// leaves the payload open).  The portable form of the hardware conversion.
KSEED_HD uint16_t round_fp16_nearest(float v) {
  const uint32_t w = float_to_bits(v);
  const uint32_t sign = (w >> 16) & 0x8000u;
  const uint32_t a = w & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return uint16_t(sign | 0x7E00u | ((a >> 13) & 0x3FFu));  // NaN, quieted
  if (a >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds to infinity (or is infinite)
  if (a < 0x38800000u) {
    // Below the smallest normal float16 (2^-14): a multiple of 2^-24 after rounding.  Adding 0.5 (bits
    // 0x3F000000) shifts the value to where one float32 ulp is 2^-24, so the float add rounds it to
    // nearest even; the low mantissa bits are then the float16 subnormal (or 0x400 = smallest normal).
    const float s = fadd(bits_to_float(a), 0.5f);
    return uint16_t(sign | (float_to_bits(s) - 0x3F000000u));
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  const uint32_t mant_odd = (a >> 13) & 1u;
  const uint32_t r = a + 0xFFFu + mant_odd - (112u << 23);
  return uint16_t(sign | (r >> 13));
}

// Exact bfloat16 bits -> float32.
KSEED_HD float bf16_bits_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Exact float16 bits -> float32 (a NaN keeps its payload, quieted).
KSEED_HD float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu;
  const uint32_t m = h & 0x3FFu;
  uint32_t bits;
  if (e == 0x1F) {
    bits = 0x7F800000u | (m << 13) | (m ? 0x400000u : 0u);
  } else if (e != 0) {
    bits = ((e + 112u) << 23) | (m << 13);
  } else {
    // Subnormal (or zero): m * 2^-24, exact in float32.
    bits = float_to_bits(fmul(float(m), 5.9604644775390625e-08f));
  }
  return bits_to_float(sign | bits);
}

// Stochastic rounding of float32 v to bfloat16 (spec 5.3); returns the bfloat16's 16 bits.
KSEED_HD uint16_t round_bf16_stochastic(float v, uint32_t rbits) {
  const uint32_t vb = float_to_bits(v);
  if (v != v) {  // NaN: written as the canonical quiet NaN (payload unspecified by the spec)
    return uint16_t(0x7FC0u);
  }
  return uint16_t((vb + (rbits >> 16)) >> 16);
}

// Stochastic rounding of float32 v to float16 (spec 5.4); returns the float32 value (exactly a float16
// value, or +-inf / NaN) that the caller converts to float16.
KSEED_HD float round_fp16_stochastic_value(float v, uint32_t rbits) {
  const uint32_t vb = float_to_bits(v);
  const float a = bits_to_float(vb & 0x7FFFFFFFu);
  int e = int((vb >> 23) & 0xFFu) - 127;
  e = e < -14 ? -14 : e;
  const float q = bits_to_float(uint32_t(e - 10 + 127) << 23);
  const float inv_q = bits_to_float(uint32_t(10 - e + 127) << 23);
  const float y = fmul(a, inv_q);
#if defined(__CUDA_ARCH__)
  const float fl = floorf(y);
#else
  const float fl = __builtin_floorf(y);
#endif
  const float fr = fsub(y, fl);
  const float u = fmul(float(rbits >> 8), 5.9604644775390625e-08f);  // 2^-24
  const float res = fmul(fadd(fl, u < fr ? 1.0f : 0.0f), q);
  return bits_to_float(float_to_bits(res) | (vb & 0x80000000u));
}

}  // namespace kseed
