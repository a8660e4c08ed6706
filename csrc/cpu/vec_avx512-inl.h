// The AVX-512 (F, DQ, BW, VL) vector type of kernels-inl.h: 16 lanes, k-register masks.  Included by
// kseed_cpu_avx512.cpp only, inside namespace kseed::cpu::avx512 and its target region.

constexpr int kLanes = 16;
constexpr int kUnroll = 2;  // two independent groups per step (32 zmm registers)
using VF = __m512;
using VU = __m512i;
using VM = __mmask16;

KSEED_INLINE VU set_u(uint32_t x) { return _mm512_set1_epi32(int(x)); }
KSEED_INLINE VF set_f(float x) { return _mm512_set1_ps(x); }
KSEED_INLINE VU iota() { return _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }
KSEED_INLINE VF as_f(VU v) { return _mm512_castsi512_ps(v); }
KSEED_INLINE VU as_u(VF v) { return _mm512_castps_si512(v); }

KSEED_INLINE VU add(VU a, VU b) { return _mm512_add_epi32(a, b); }
KSEED_INLINE VU sub(VU a, VU b) { return _mm512_sub_epi32(a, b); }
KSEED_INLINE VU and_u(VU a, VU b) { return _mm512_and_si512(a, b); }
KSEED_INLINE VU or_u(VU a, VU b) { return _mm512_or_si512(a, b); }
KSEED_INLINE VU xor_u(VU a, VU b) { return _mm512_xor_si512(a, b); }
KSEED_INLINE VU xor3(VU a, VU b, VU c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
template <int k>
KSEED_INLINE VU shl(VU a) { return _mm512_slli_epi32(a, k); }
template <int k>
KSEED_INLINE VU shr(VU a) { return _mm512_srli_epi32(a, k); }
KSEED_INLINE VU max_i32(VU a, VU b) { return _mm512_max_epi32(a, b); }

KSEED_INLINE VF add(VF a, VF b) { return _mm512_add_ps(a, b); }
KSEED_INLINE VF sub(VF a, VF b) { return _mm512_sub_ps(a, b); }
KSEED_INLINE VF mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
KSEED_INLINE VF sqrt_f(VF a) { return _mm512_sqrt_ps(a); }
KSEED_INLINE VF floor_f(VF a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
KSEED_INLINE VF to_f32(VU a) { return _mm512_cvtepi32_ps(a); }

KSEED_INLINE VM gt_i32(VU a, VU b) { return _mm512_cmpgt_epi32_mask(a, b); }
KSEED_INLINE VM lt_u32(VU a, VU b) { return _mm512_cmplt_epu32_mask(a, b); }
KSEED_INLINE VM lt_f(VF a, VF b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
KSEED_INLINE VM is_nan(VF a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
KSEED_INLINE VM lsb_set(VU a) { return _mm512_test_epi32_mask(a, set_u(1)); }
KSEED_INLINE VU inc_where(VU a, VM m) { return _mm512_mask_add_epi32(a, m, a, set_u(1)); }
KSEED_INLINE VF select_f(VM m, VF yes, VF no) { return _mm512_mask_blend_ps(m, no, yes); }
KSEED_INLINE VU select_u(VM m, VU yes, VU no) { return _mm512_mask_blend_epi32(m, no, yes); }
KSEED_INLINE VF zero_unless(VM m, VF a) { return _mm512_maskz_mov_ps(m, a); }

// (hi, lo) halves of the 32x32 -> 64-bit products a * m in every lane.
KSEED_INLINE void mulhilo(VU a, VU m, VU* hi, VU* lo) {
  const VU pe = _mm512_mul_epu32(a, m);                         // even lanes, 64-bit
  const VU po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // odd lanes, 64-bit
  // One masked in-lane swap each: lo takes the low halves (pe's even lanes, po's low halves moved to
  // the odd lanes), hi the high halves (pe's high halves moved to the even lanes, po's odd lanes).
  *lo = _mm512_mask_shuffle_epi32(pe, 0xAAAA, po, _MM_PERM_CDAB);
  *hi = _mm512_mask_shuffle_epi32(po, 0x5555, pe, _MM_PERM_CDAB);
}

// z[l] holds word l of blocks 0..15; out[g] holds elements 16 g .. 16 g + 15 (blocks 4g .. 4g + 3).
KSEED_INLINE void transpose4(const VF z[4], VF out[4]) {
  const VF t0 = _mm512_unpacklo_ps(z[0], z[1]);
  const VF t1 = _mm512_unpackhi_ps(z[0], z[1]);
  const VF t2 = _mm512_unpacklo_ps(z[2], z[3]);
  const VF t3 = _mm512_unpackhi_ps(z[2], z[3]);
  // a: blocks 0, 4, 8, 12 (one per 128-bit lane); b: 1, 5, 9, 13; c: 2, 6, ...; d: 3, 7, ...
  const VF a = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const VF b = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const VF c = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  const VF d = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  const VF u0 = _mm512_shuffle_f32x4(a, b, 0x44);  // 0 4 1 5
  const VF u1 = _mm512_shuffle_f32x4(c, d, 0x44);  // 2 6 3 7
  const VF u2 = _mm512_shuffle_f32x4(a, b, 0xEE);  // 8 12 9 13
  const VF u3 = _mm512_shuffle_f32x4(c, d, 0xEE);  // 10 14 11 15
  out[0] = _mm512_shuffle_f32x4(u0, u1, 0x88);
  out[1] = _mm512_shuffle_f32x4(u0, u1, 0xDD);
  out[2] = _mm512_shuffle_f32x4(u2, u3, 0x88);
  out[3] = _mm512_shuffle_f32x4(u2, u3, 0xDD);
}

KSEED_INLINE VF load_f(const float* p) { return _mm512_loadu_ps(p); }
KSEED_INLINE void store_f(float* p, VF v) { _mm512_storeu_ps(p, v); }
KSEED_INLINE VU load_u(const uint32_t* p) { return _mm512_loadu_si512(static_cast<const void*>(p)); }
KSEED_INLINE void store_u(uint32_t* p, VU v) { _mm512_storeu_si512(static_cast<void*>(p), v); }
KSEED_INLINE VF load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return as_f(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
KSEED_INLINE void store_u16(uint16_t* p, VU v) {  // v: values < 2^16
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(v));
}
KSEED_INLINE VF load_f16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
KSEED_INLINE void store_f16(uint16_t* p, VF v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The Rademacher term (spec 8): select_sign(c, nc, s, q) is nc (= -c) in the lanes whose bit
// q * 16 + lane of the 32-element sign word *s is set, c elsewhere.  Half q of the little-endian word is
// the lane mask as it stands: one kmovw from memory (a load, no ALU port; the compilers would otherwise
// go through a general register and port 5) and one masked blend.  So sign_word keeps the address.
// The Rademacher pass (kernels-inl.h): 8 seeds per pass over the accumulator, a whole sign word (2 zmm
// accumulators) per run, next to the 8 seeds' c and -c.
constexpr int kSignGroup = 8;
constexpr int kSignRun = 2;
using SW = const uint32_t*;
KSEED_INLINE SW sign_word(const uint32_t* word) { return word; }
KSEED_INLINE VF select_sign(VF c, VF nc, SW s, int q) {
  __mmask16 k;
  asm("kmovw %1, %0" : "=Yk"(k) : "m"(*(reinterpret_cast<const uint16_t*>(s) + q)));
  return _mm512_mask_blend_ps(k, c, nc);
}
