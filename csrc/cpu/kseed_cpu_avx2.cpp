// AVX2 path of the CPU kernels: 8 Philox blocks (32 normals) per step, one block per 32-bit lane.
//
// Only the functions below carry the AVX2 target attribute ("avx2,f16c", deliberately without "fma"),
// so nothing here leaks into code that runs before the run-time CPU check.  Every float operation is
// the spec's single IEEE operation in the spec's order: separate mul and add instructions, never an fma.
#include "kseed_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define KSEED_T256 __attribute__((target("avx2,f16c")))
#define KSEED_I256 KSEED_T256 inline __attribute__((always_inline))

namespace kseed {
namespace cpu {
namespace avx2 {
namespace {

struct RoundKeys {
  uint32_t k0[spec::PHILOX_ROUNDS], k1[spec::PHILOX_ROUNDS];
};

inline RoundKeys round_keys(Key key) {
  RoundKeys rk;
  for (int r = 0; r < spec::PHILOX_ROUNDS; ++r) {
    rk.k0[r] = key.k0;
    rk.k1[r] = key.k1;
    key.k0 += spec::PHILOX_W0;
    key.k1 += spec::PHILOX_W1;
  }
  return rk;
}

KSEED_I256 __m256i c32(uint32_t x) { return _mm256_set1_epi32(int(x)); }
KSEED_I256 __m256 cf(uint32_t bits) { return _mm256_castsi256_ps(_mm256_set1_epi32(int(bits))); }

KSEED_I256 void mulhilo(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i pe = _mm256_mul_epu32(a, m);
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

// Philox4x32-10 of blocks first_block .. first_block + 7.
KSEED_I256 void philox8(const RoundKeys& rk, uint64_t first_block, uint32_t stream, uint32_t word3,
                        __m256i x[4]) {
  const uint32_t lo = uint32_t(first_block), hi = uint32_t(first_block >> 32);
  const __m256i iota = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
  __m256i c0 = _mm256_add_epi32(c32(lo), iota);
  // Unsigned c0 < lo (a carry into the high word) by a signed compare of sign-flipped values.
  const __m256i flip = c32(0x80000000u);
  const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(c32(lo), flip), _mm256_xor_si256(c0, flip));
  __m256i c1 = _mm256_sub_epi32(c32(hi), carry);
  __m256i c2 = c32(stream);
  __m256i c3 = c32(word3);
  const __m256i m0 = c32(spec::PHILOX_M0), m1 = c32(spec::PHILOX_M1);
  for (int r = 0; r < spec::PHILOX_ROUNDS; ++r) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo(c0, m0, &hi0, &lo0);
    mulhilo(c2, m1, &hi1, &lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), c32(rk.k0[r]));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), c32(rk.k1[r]));
    c1 = lo1;
    c3 = lo0;
  }
  x[0] = c0;
  x[1] = c1;
  x[2] = c2;
  x[3] = c3;
}

KSEED_I256 __m256 log_uniform(__m256i xa) {
  const __m256i n1 = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(xa, 9), 1), c32(1));
  const __m256i bits = _mm256_castps_si256(_mm256_cvtepi32_ps(n1));
  const __m256i mant = _mm256_and_si256(bits, c32(0x7FFFFFu));
  const __m256i big = _mm256_cmpgt_epi32(mant, c32(spec::SQRT2_MANT));  // both < 2^31
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), c32(127 + 24));
  e = _mm256_sub_epi32(e, big);  // big is -1 where true
  __m256 f = _mm256_castsi256_ps(_mm256_or_si256(mant, c32(0x3F800000u)));
  f = _mm256_blendv_ps(f, _mm256_mul_ps(f, _mm256_set1_ps(0.5f)), _mm256_castsi256_ps(big));
  const __m256 t = _mm256_sub_ps(f, _mm256_set1_ps(1.0f));
  using namespace spec;
  __m256 p = cf(LOG_C9);
  p = _mm256_add_ps(_mm256_mul_ps(p, t), cf(LOG_C8));
  p = _mm256_add_ps(_mm256_mul_ps(p, t), cf(LOG_C7));
  p = _mm256_add_ps(_mm256_mul_ps(p, t), cf(LOG_C6));
  p = _mm256_add_ps(_mm256_mul_ps(p, t), cf(LOG_C5));
  p = _mm256_add_ps(_mm256_mul_ps(p, t), cf(LOG_C4));
  p = _mm256_add_ps(_mm256_mul_ps(p, t), cf(LOG_C3));
  p = _mm256_add_ps(_mm256_mul_ps(p, t), cf(LOG_C2));
  p = _mm256_add_ps(_mm256_mul_ps(p, t), cf(LOG_C1));
  p = _mm256_add_ps(_mm256_mul_ps(p, t), cf(LOG_C0));
  const __m256 logf_ = _mm256_mul_ps(t, p);
  const __m256 ef = _mm256_cvtepi32_ps(e);
  return _mm256_add_ps(_mm256_mul_ps(ef, cf(LN2_HI_BITS)),
                       _mm256_add_ps(_mm256_mul_ps(ef, cf(LN2_LO_BITS)), logf_));
}

KSEED_I256 void sincos_uniform(__m256i xb, __m256* cos_out, __m256* sin_out) {
  const __m256i m2 = _mm256_srli_epi32(xb, 9);
  const __m256i k = _mm256_srli_epi32(_mm256_add_epi32(m2, c32(1u << 20)), 21);
  const __m256i j = _mm256_sub_epi32(_mm256_or_si256(_mm256_slli_epi32(m2, 1), c32(1)),
                                     _mm256_slli_epi32(k, 22));
  const __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(j), _mm256_set1_ps(4.76837158203125e-07f));
  const __m256 w = _mm256_mul_ps(y, y);
  using namespace spec;
  __m256 s = cf(SIN_C4);
  s = _mm256_add_ps(_mm256_mul_ps(s, w), cf(SIN_C3));
  s = _mm256_add_ps(_mm256_mul_ps(s, w), cf(SIN_C2));
  s = _mm256_add_ps(_mm256_mul_ps(s, w), cf(SIN_C1));
  s = _mm256_add_ps(_mm256_mul_ps(s, w), cf(SIN_C0));
  __m256 c = cf(COS_C4);
  c = _mm256_add_ps(_mm256_mul_ps(c, w), cf(COS_C3));
  c = _mm256_add_ps(_mm256_mul_ps(c, w), cf(COS_C2));
  c = _mm256_add_ps(_mm256_mul_ps(c, w), cf(COS_C1));
  c = _mm256_add_ps(_mm256_mul_ps(c, w), cf(COS_C0));
  s = _mm256_mul_ps(y, s);
  // q = k & 3: q odd swaps (c, s); cos is negated for q = 1, 2 (bit 1 of k + 1) and sin for q = 2, 3
  // (bit 1 of k).  blendv looks at the sign bit only, so k << 31 is the swap mask.
  const __m256 swap = _mm256_castsi256_ps(_mm256_slli_epi32(k, 31));
  const __m256 cs = _mm256_blendv_ps(c, s, swap);
  const __m256 sn = _mm256_blendv_ps(s, c, swap);
  const __m256i cos_sign = _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(k, c32(1)), c32(2)), 30);
  const __m256i sin_sign = _mm256_slli_epi32(_mm256_and_si256(k, c32(2)), 30);
  *cos_out = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(cs), cos_sign));
  *sin_out = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(sn), sin_sign));
}

KSEED_I256 void box_muller(__m256i xa, __m256i xb, __m256* za, __m256* zb) {
  const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(log_uniform(xa), _mm256_set1_ps(-2.0f)));
  __m256 c, s;
  sincos_uniform(xb, &c, &s);
  *za = _mm256_mul_ps(r, c);
  *zb = _mm256_mul_ps(r, s);
}

// z[l] holds lane l of blocks 0..7; out[g] holds elements 8 g .. 8 g + 7 (blocks 2g, 2g + 1).
KSEED_I256 void transpose(const __m256 z[4], __m256 out[4]) {
  const __m256 t0 = _mm256_unpacklo_ps(z[0], z[1]);
  const __m256 t1 = _mm256_unpackhi_ps(z[0], z[1]);
  const __m256 t2 = _mm256_unpacklo_ps(z[2], z[3]);
  const __m256 t3 = _mm256_unpackhi_ps(z[2], z[3]);
  const __m256 a = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
  const __m256 b = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
  const __m256 c = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
  const __m256 d = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
  // a: blocks 0, 4; b: 1, 5; c: 2, 6; d: 3, 7
  out[0] = _mm256_permute2f128_ps(a, b, 0x20);
  out[1] = _mm256_permute2f128_ps(c, d, 0x20);
  out[2] = _mm256_permute2f128_ps(a, b, 0x31);
  out[3] = _mm256_permute2f128_ps(c, d, 0x31);
}

KSEED_I256 void normals32(const RoundKeys& rk, uint64_t first_block, uint32_t stream, __m256 out[4]) {
  __m256i x[4];
  philox8(rk, first_block, stream, spec::COUNTER_GAUSSIAN, x);
  __m256 z[4];
  box_muller(x[0], x[1], &z[0], &z[1]);
  box_muller(x[2], x[3], &z[2], &z[3]);
  transpose(z, out);
}

KSEED_I256 __m256 load_bf16(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
KSEED_I256 void store_16(uint16_t* p, __m256i v) {  // v: 8 values < 2^16
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

}  // namespace

bool compiled() { return true; }

KSEED_T256 void accumulate_normals(Key key, uint32_t stream, uint64_t first_block, int64_t nblocks,
                                   float c, float* acc) {
  const RoundKeys rk = round_keys(key);
  const __m256 cv = _mm256_set1_ps(c);
  for (int64_t b = 0; b < nblocks; b += 8) {
    __m256 z[4];
    normals32(rk, first_block + uint64_t(b), stream, z);
    float* a = acc + 4 * b;
    for (int g = 0; g < 4; ++g) {
      const __m256 av = _mm256_loadu_ps(a + 8 * g);
      _mm256_storeu_ps(a + 8 * g, _mm256_add_ps(av, _mm256_mul_ps(cv, z[g])));
    }
  }
}

KSEED_T256 void normals(Key key, uint32_t stream, uint64_t first_block, int64_t nblocks, float* out) {
  const RoundKeys rk = round_keys(key);
  for (int64_t b = 0; b < nblocks; b += 8) {
    __m256 z[4];
    normals32(rk, first_block + uint64_t(b), stream, z);
    for (int g = 0; g < 4; ++g) _mm256_storeu_ps(out + 4 * b + 8 * g, z[g]);
  }
}

KSEED_T256 void philox_words(Key key, uint32_t stream, uint32_t word3, uint64_t first_block,
                             int64_t nblocks, uint32_t* out) {
  const RoundKeys rk = round_keys(key);
  for (int64_t b = 0; b < nblocks; b += 8) {
    __m256i x[4];
    philox8(rk, first_block + uint64_t(b), stream, word3, x);
    __m256 z[4], o[4];
    for (int l = 0; l < 4; ++l) z[l] = _mm256_castsi256_ps(x[l]);
    transpose(z, o);
    for (int g = 0; g < 4; ++g) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 4 * b + 8 * g), _mm256_castps_si256(o[g]));
    }
  }
}

KSEED_T256 void finish(DType dtype, const void* src, void* dst, const float* acc,
                       const uint32_t* r, int64_t n, int rounding) {
  const int64_t nv = n & ~int64_t(7);
  if (dtype == DType::F32) {
    const float* s = static_cast<const float*>(src);
    float* p = static_cast<float*>(dst);
    for (int64_t j = 0; j < nv; j += 8) {
      _mm256_storeu_ps(p + j, _mm256_add_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(acc + j)));
    }
  } else if (dtype == DType::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    uint16_t* p = static_cast<uint16_t*>(dst);
    const __m256i qnan = c32(0x7FC0u);
    for (int64_t j = 0; j < nv; j += 8) {
      const __m256 v = _mm256_add_ps(load_bf16(s + j), _mm256_loadu_ps(acc + j));
      const __m256i vb = _mm256_castps_si256(v);
      __m256i res;
      if (rounding == 1) {
        const __m256i rv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + j));
        res = _mm256_srli_epi32(_mm256_add_epi32(vb, _mm256_srli_epi32(rv, 16)), 16);
      } else {
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(vb, 16), c32(1));
        res = _mm256_srli_epi32(_mm256_add_epi32(vb, _mm256_add_epi32(odd, c32(0x7FFFu))), 16);
      }
      const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
      res = _mm256_castps_si256(
          _mm256_blendv_ps(_mm256_castsi256_ps(res), _mm256_castsi256_ps(qnan), nan));
      store_16(p + j, res);
    }
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    uint16_t* p = static_cast<uint16_t*>(dst);
    for (int64_t j = 0; j < nv; j += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j));
      __m256 v = _mm256_add_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(acc + j));
      if (rounding == 1) {
        const __m256i vb = _mm256_castps_si256(v);
        const __m256 a = _mm256_castsi256_ps(_mm256_and_si256(vb, c32(0x7FFFFFFFu)));
        __m256i e = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(vb, 23), c32(0xFF)), c32(127));
        e = _mm256_max_epi32(e, _mm256_set1_epi32(-14));
        const __m256 q = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, c32(127 - 10)), 23));
        const __m256 inv_q =
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(c32(127 + 10), e), 23));
        const __m256 y = _mm256_mul_ps(a, inv_q);
        const __m256 fl = _mm256_floor_ps(y);
        const __m256 fr = _mm256_sub_ps(y, fl);
        const __m256i rv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + j));
        const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(rv, 8)),
                                       _mm256_set1_ps(5.9604644775390625e-08f));
        const __m256 up = _mm256_cmp_ps(u, fr, _CMP_LT_OQ);
        const __m256 one = _mm256_and_ps(up, _mm256_set1_ps(1.0f));
        const __m256 res = _mm256_mul_ps(_mm256_add_ps(fl, one), q);
        v = _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(res),
                                                _mm256_and_si256(vb, c32(0x80000000u))));
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p + j),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
  if (nv < n) {
    const size_t es = dtype == DType::F32 ? 4 : 2;
    finish_scalar(dtype, static_cast<const char*>(src) + es * size_t(nv),
                  static_cast<char*>(dst) + es * size_t(nv), acc + nv,
                  r == nullptr ? nullptr : r + nv, n - nv, rounding);
  }
}

}  // namespace avx2
}  // namespace cpu
}  // namespace kseed

#else  // not x86-64 GCC/Clang: the path is never selected

namespace kseed {
namespace cpu {
namespace avx2 {
bool compiled() { return false; }
void accumulate_normals(Key, uint32_t, uint64_t, int64_t, float, float*) {}
void normals(Key, uint32_t, uint64_t, int64_t, float*) {}
void philox_words(Key, uint32_t, uint32_t, uint64_t, int64_t, uint32_t*) {}
void finish(DType, const void*, void*, const float*, const uint32_t*, int64_t, int) {}
}  // namespace avx2
}  // namespace cpu
}  // namespace kseed

#endif
