// AVX-512 path of the CPU kernels: 16 Philox blocks (64 normals) per step, one block per 32-bit lane.
//
// Only the functions below carry the AVX-512 target attribute (the file is compiled without
// -mavx512f), so nothing here leaks into code that runs before the run-time CPU check.  Every float
// operation is the spec's single IEEE operation in the spec's order: separate mul and add instructions,
// never an fma (the build passes -ffp-contract=off so the compiler does not fuse them either).
#include "kseed_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define KSEED_T512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
#define KSEED_I512 KSEED_T512 inline __attribute__((always_inline))

namespace kseed {
namespace cpu {
namespace avx512 {
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

KSEED_I512 __m512i c32(uint32_t x) { return _mm512_set1_epi32(int(x)); }
KSEED_I512 __m512 cf(uint32_t bits) { return _mm512_castsi512_ps(_mm512_set1_epi32(int(bits))); }

// (hi, lo) halves of the 32x32 -> 64-bit products a * m in every lane.
KSEED_I512 void mulhilo(__m512i a, __m512i m, __m512i* hi, __m512i* lo) {
  const __m512i pe = _mm512_mul_epu32(a, m);                          // even lanes, 64-bit
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);   // odd lanes, 64-bit
  // One masked in-lane swap each: lo takes the low halves (pe's even lanes, po's low halves moved to
  // the odd lanes), hi the high halves (pe's high halves moved to the even lanes, po's odd lanes).
  *lo = _mm512_mask_shuffle_epi32(pe, 0xAAAA, po, _MM_PERM_CDAB);
  *hi = _mm512_mask_shuffle_epi32(po, 0x5555, pe, _MM_PERM_CDAB);
}

// Philox4x32-10 of blocks first_block .. first_block + 15 (lane b = block first_block + b).
KSEED_I512 void philox16(const RoundKeys& rk, uint64_t first_block, uint32_t stream, uint32_t word3,
                         __m512i x[4]) {
  const uint32_t lo = uint32_t(first_block), hi = uint32_t(first_block >> 32);
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512i c0 = _mm512_add_epi32(c32(lo), iota);
  const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, c32(lo));
  __m512i c1 = _mm512_mask_add_epi32(c32(hi), carry, c32(hi), c32(1));
  __m512i c2 = c32(stream);
  __m512i c3 = c32(word3);
  const __m512i m0 = c32(spec::PHILOX_M0), m1 = c32(spec::PHILOX_M1);
  for (int r = 0; r < spec::PHILOX_ROUNDS; ++r) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo(c0, m0, &hi0, &lo0);
    mulhilo(c2, m1, &hi1, &lo1);
    c0 = _mm512_ternarylogic_epi32(hi1, c1, c32(rk.k0[r]), 0x96);  // three-way xor
    c2 = _mm512_ternarylogic_epi32(hi0, c3, c32(rk.k1[r]), 0x96);
    c1 = lo1;
    c3 = lo0;
  }
  x[0] = c0;
  x[1] = c1;
  x[2] = c2;
  x[3] = c3;
}

// log(u1), spec 3.2.
KSEED_I512 __m512 log_uniform(__m512i xa) {
  const __m512i n1 = _mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(xa, 9), 1), c32(1));
  const __m512i bits = _mm512_castps_si512(_mm512_cvtepi32_ps(n1));  // exact: n1 < 2^24
  const __m512i mant = _mm512_and_si512(bits, c32(0x7FFFFFu));
  const __mmask16 big = _mm512_cmpgt_epu32_mask(mant, c32(spec::SQRT2_MANT));
  __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(bits, 23), c32(127 + 24));
  e = _mm512_mask_add_epi32(e, big, e, c32(1));
  __m512 f = _mm512_castsi512_ps(_mm512_or_si512(mant, c32(0x3F800000u)));
  f = _mm512_mask_mul_ps(f, big, f, _mm512_set1_ps(0.5f));
  const __m512 t = _mm512_sub_ps(f, _mm512_set1_ps(1.0f));
  using namespace spec;
  __m512 p = cf(LOG_C9);
  p = _mm512_add_ps(_mm512_mul_ps(p, t), cf(LOG_C8));
  p = _mm512_add_ps(_mm512_mul_ps(p, t), cf(LOG_C7));
  p = _mm512_add_ps(_mm512_mul_ps(p, t), cf(LOG_C6));
  p = _mm512_add_ps(_mm512_mul_ps(p, t), cf(LOG_C5));
  p = _mm512_add_ps(_mm512_mul_ps(p, t), cf(LOG_C4));
  p = _mm512_add_ps(_mm512_mul_ps(p, t), cf(LOG_C3));
  p = _mm512_add_ps(_mm512_mul_ps(p, t), cf(LOG_C2));
  p = _mm512_add_ps(_mm512_mul_ps(p, t), cf(LOG_C1));
  p = _mm512_add_ps(_mm512_mul_ps(p, t), cf(LOG_C0));
  const __m512 logf_ = _mm512_mul_ps(t, p);
  const __m512 ef = _mm512_cvtepi32_ps(e);
  return _mm512_add_ps(_mm512_mul_ps(ef, cf(LN2_HI_BITS)),
                       _mm512_add_ps(_mm512_mul_ps(ef, cf(LN2_LO_BITS)), logf_));
}

// (cos, sin) of 2 pi u2, spec 3.3.
KSEED_I512 void sincos_uniform(__m512i xb, __m512* cos_out, __m512* sin_out) {
  const __m512i m2 = _mm512_srli_epi32(xb, 9);
  const __m512i k = _mm512_srli_epi32(_mm512_add_epi32(m2, c32(1u << 20)), 21);
  const __m512i j = _mm512_sub_epi32(_mm512_or_si512(_mm512_slli_epi32(m2, 1), c32(1)),
                                     _mm512_slli_epi32(k, 22));
  const __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(j), _mm512_set1_ps(4.76837158203125e-07f));
  const __m512 w = _mm512_mul_ps(y, y);
  using namespace spec;
  __m512 s = cf(SIN_C4);
  s = _mm512_add_ps(_mm512_mul_ps(s, w), cf(SIN_C3));
  s = _mm512_add_ps(_mm512_mul_ps(s, w), cf(SIN_C2));
  s = _mm512_add_ps(_mm512_mul_ps(s, w), cf(SIN_C1));
  s = _mm512_add_ps(_mm512_mul_ps(s, w), cf(SIN_C0));
  __m512 c = cf(COS_C4);
  c = _mm512_add_ps(_mm512_mul_ps(c, w), cf(COS_C3));
  c = _mm512_add_ps(_mm512_mul_ps(c, w), cf(COS_C2));
  c = _mm512_add_ps(_mm512_mul_ps(c, w), cf(COS_C1));
  c = _mm512_add_ps(_mm512_mul_ps(c, w), cf(COS_C0));
  s = _mm512_mul_ps(y, s);
  // q = k & 3: q odd swaps (c, s); cos is negated for q = 1, 2 (bit 1 of k + 1) and sin for q = 2, 3
  // (bit 1 of k).  Negation is an exact sign flip.
  const __mmask16 swap = _mm512_test_epi32_mask(k, c32(1));
  const __m512 cs = _mm512_mask_blend_ps(swap, c, s);
  const __m512 sn = _mm512_mask_blend_ps(swap, s, c);
  const __m512i cos_sign = _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(k, c32(1)), c32(2)), 30);
  const __m512i sin_sign = _mm512_slli_epi32(_mm512_and_si512(k, c32(2)), 30);
  *cos_out = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(cs), cos_sign));
  *sin_out = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(sn), sin_sign));
}

KSEED_I512 void box_muller(__m512i xa, __m512i xb, __m512* za, __m512* zb) {
  const __m512 r = _mm512_sqrt_ps(_mm512_mul_ps(log_uniform(xa), _mm512_set1_ps(-2.0f)));
  __m512 c, s;
  sincos_uniform(xb, &c, &s);
  *za = _mm512_mul_ps(r, c);
  *zb = _mm512_mul_ps(r, s);
}

// z[l] holds lane l of blocks 0..15; out[g] holds elements 16 g .. 16 g + 15 (blocks 4g .. 4g + 3).
KSEED_I512 void transpose(const __m512 z[4], __m512 out[4]) {
  const __m512 t0 = _mm512_unpacklo_ps(z[0], z[1]);
  const __m512 t1 = _mm512_unpackhi_ps(z[0], z[1]);
  const __m512 t2 = _mm512_unpacklo_ps(z[2], z[3]);
  const __m512 t3 = _mm512_unpackhi_ps(z[2], z[3]);
  // a: blocks 0, 4, 8, 12 (one per 128-bit lane); b: 1, 5, 9, 13; c: 2, 6, ...; d: 3, 7, ...
  const __m512 a = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const __m512 b = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const __m512 c = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  const __m512 d = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  const __m512 u0 = _mm512_shuffle_f32x4(a, b, 0x44);  // 0 4 1 5
  const __m512 u1 = _mm512_shuffle_f32x4(c, d, 0x44);  // 2 6 3 7
  const __m512 u2 = _mm512_shuffle_f32x4(a, b, 0xEE);  // 8 12 9 13
  const __m512 u3 = _mm512_shuffle_f32x4(c, d, 0xEE);  // 10 14 11 15
  out[0] = _mm512_shuffle_f32x4(u0, u1, 0x88);
  out[1] = _mm512_shuffle_f32x4(u0, u1, 0xDD);
  out[2] = _mm512_shuffle_f32x4(u2, u3, 0x88);
  out[3] = _mm512_shuffle_f32x4(u2, u3, 0xDD);
}

// The 64 normals of blocks first_block .. first_block + 15, in element order.
KSEED_I512 void normals64(const RoundKeys& rk, uint64_t first_block, uint32_t stream, __m512 out[4]) {
  __m512i x[4];
  philox16(rk, first_block, stream, spec::COUNTER_GAUSSIAN, x);
  __m512 z[4];
  box_muller(x[0], x[1], &z[0], &z[1]);
  box_muller(x[2], x[3], &z[2], &z[3]);
  transpose(z, out);
}

KSEED_I512 __m512 load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
KSEED_I512 void store_16(uint16_t* p, __m512i v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(v));
}

}  // namespace

bool compiled() { return true; }

KSEED_T512 void accumulate_normals(Key key, uint32_t stream, uint64_t first_block, int64_t nblocks,
                                   float c, float* acc) {
  const RoundKeys rk = round_keys(key);
  const __m512 cv = _mm512_set1_ps(c);
  int64_t b = 0;
  for (; b + 32 <= nblocks; b += 32) {  // two independent groups per step, for instruction-level overlap
    __m512 z[8];
    normals64(rk, first_block + uint64_t(b), stream, z);
    normals64(rk, first_block + uint64_t(b + 16), stream, z + 4);
    float* a = acc + 4 * b;
    for (int g = 0; g < 8; ++g) {
      const __m512 av = _mm512_loadu_ps(a + 16 * g);
      _mm512_storeu_ps(a + 16 * g, _mm512_add_ps(av, _mm512_mul_ps(cv, z[g])));
    }
  }
  for (; b < nblocks; b += 16) {
    __m512 z[4];
    normals64(rk, first_block + uint64_t(b), stream, z);
    float* a = acc + 4 * b;
    for (int g = 0; g < 4; ++g) {
      const __m512 av = _mm512_loadu_ps(a + 16 * g);
      _mm512_storeu_ps(a + 16 * g, _mm512_add_ps(av, _mm512_mul_ps(cv, z[g])));
    }
  }
}

KSEED_T512 void normals(Key key, uint32_t stream, uint64_t first_block, int64_t nblocks, float* out) {
  const RoundKeys rk = round_keys(key);
  for (int64_t b = 0; b < nblocks; b += 16) {
    __m512 z[4];
    normals64(rk, first_block + uint64_t(b), stream, z);
    for (int g = 0; g < 4; ++g) _mm512_storeu_ps(out + 4 * b + 16 * g, z[g]);
  }
}

KSEED_T512 void philox_words(Key key, uint32_t stream, uint32_t word3, uint64_t first_block,
                             int64_t nblocks, uint32_t* out) {
  const RoundKeys rk = round_keys(key);
  for (int64_t b = 0; b < nblocks; b += 16) {
    __m512i x[4];
    philox16(rk, first_block + uint64_t(b), stream, word3, x);
    __m512 z[4], o[4];
    for (int l = 0; l < 4; ++l) z[l] = _mm512_castsi512_ps(x[l]);
    transpose(z, o);
    for (int g = 0; g < 4; ++g) {
      _mm512_storeu_si512(reinterpret_cast<void*>(out + 4 * b + 16 * g), _mm512_castps_si512(o[g]));
    }
  }
}

KSEED_T512 void finish(DType dtype, const void* src, void* dst, const float* acc,
                       const uint32_t* r, int64_t n, int rounding) {
  const int64_t nv = n & ~int64_t(15);
  if (dtype == DType::F32) {
    const float* s = static_cast<const float*>(src);
    float* p = static_cast<float*>(dst);
    for (int64_t j = 0; j < nv; j += 16) {
      _mm512_storeu_ps(p + j, _mm512_add_ps(_mm512_loadu_ps(s + j), _mm512_loadu_ps(acc + j)));
    }
  } else if (dtype == DType::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    uint16_t* p = static_cast<uint16_t*>(dst);
    const __m512i qnan = c32(0x7FC0u);
    for (int64_t j = 0; j < nv; j += 16) {
      const __m512 v = _mm512_add_ps(load_bf16(s + j), _mm512_loadu_ps(acc + j));
      const __m512i vb = _mm512_castps_si512(v);
      __m512i res;
      if (rounding == 1) {
        const __m512i rv = _mm512_loadu_si512(reinterpret_cast<const void*>(r + j));
        res = _mm512_srli_epi32(_mm512_add_epi32(vb, _mm512_srli_epi32(rv, 16)), 16);
      } else {
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(vb, 16), c32(1));
        res = _mm512_srli_epi32(_mm512_add_epi32(vb, _mm512_add_epi32(odd, c32(0x7FFFu))), 16);
      }
      const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      store_16(p + j, _mm512_mask_blend_epi32(nan, res, qnan));
    }
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    uint16_t* p = static_cast<uint16_t*>(dst);
    for (int64_t j = 0; j < nv; j += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + j));
      __m512 v = _mm512_add_ps(_mm512_cvtph_ps(h), _mm512_loadu_ps(acc + j));
      if (rounding == 1) {
        // spec 5.4, as round_fp16_stochastic_value in kseed_core.h
        const __m512i vb = _mm512_castps_si512(v);
        const __m512 a = _mm512_castsi512_ps(_mm512_and_si512(vb, c32(0x7FFFFFFFu)));
        __m512i e = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(vb, 23), c32(0xFF)), c32(127));
        e = _mm512_max_epi32(e, _mm512_set1_epi32(-14));
        const __m512 q = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e, c32(127 - 10)), 23));
        const __m512 inv_q =
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(c32(127 + 10), e), 23));
        const __m512 y = _mm512_mul_ps(a, inv_q);
        const __m512 fl = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        const __m512 fr = _mm512_sub_ps(y, fl);
        const __m512i rv = _mm512_loadu_si512(reinterpret_cast<const void*>(r + j));
        const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(rv, 8)),
                                       _mm512_set1_ps(5.9604644775390625e-08f));
        const __mmask16 up = _mm512_cmp_ps_mask(u, fr, _CMP_LT_OQ);
        const __m512 one = _mm512_maskz_mov_ps(up, _mm512_set1_ps(1.0f));
        const __m512 res = _mm512_mul_ps(_mm512_add_ps(fl, one), q);
        v = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(res),
                                                _mm512_and_si512(vb, c32(0x80000000u))));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j),
                          _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
  if (nv < n) {
    const size_t es = dtype == DType::F32 ? 4 : 2;
    finish_scalar(dtype, static_cast<const char*>(src) + es * size_t(nv),
                  static_cast<char*>(dst) + es * size_t(nv), acc + nv,
                  r == nullptr ? nullptr : r + nv, n - nv, rounding);
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace kseed

#else  // not x86-64 GCC/Clang: the path is never selected

namespace kseed {
namespace cpu {
namespace avx512 {
bool compiled() { return false; }
void accumulate_normals(Key, uint32_t, uint64_t, int64_t, float, float*) {}
void normals(Key, uint32_t, uint64_t, int64_t, float*) {}
void philox_words(Key, uint32_t, uint32_t, uint64_t, int64_t, uint32_t*) {}
void finish(DType, const void*, void*, const float*, const uint32_t*, int64_t, int) {}
}  // namespace avx512
}  // namespace cpu
}  // namespace kseed

#endif
