// The AVX2 (+F16C) vector type of kernels-inl.h: 8 lanes.  Included by kseed_cpu_avx2.cpp only, inside
// namespace kseed::cpu::avx2 and its target region ("avx2,f16c", deliberately without "fma").
// Masks are full lanes (all ones where true).

constexpr int kLanes = 8;
constexpr int kUnroll = 1;  // the Box-Muller chain already fills the 16 ymm registers
using VF = __m256;
using VU = __m256i;
using VM = __m256i;

KSEED_INLINE VU set_u(uint32_t x) { return _mm256_set1_epi32(int(x)); }
KSEED_INLINE VF set_f(float x) { return _mm256_set1_ps(x); }
KSEED_INLINE VU iota() { return _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0); }
KSEED_INLINE VF as_f(VU v) { return _mm256_castsi256_ps(v); }
KSEED_INLINE VU as_u(VF v) { return _mm256_castps_si256(v); }

KSEED_INLINE VU add(VU a, VU b) { return _mm256_add_epi32(a, b); }
KSEED_INLINE VU sub(VU a, VU b) { return _mm256_sub_epi32(a, b); }
KSEED_INLINE VU and_u(VU a, VU b) { return _mm256_and_si256(a, b); }
KSEED_INLINE VU or_u(VU a, VU b) { return _mm256_or_si256(a, b); }
KSEED_INLINE VU xor_u(VU a, VU b) { return _mm256_xor_si256(a, b); }
KSEED_INLINE VU xor3(VU a, VU b, VU c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
template <int k>
KSEED_INLINE VU shl(VU a) { return _mm256_slli_epi32(a, k); }
template <int k>
KSEED_INLINE VU shr(VU a) { return _mm256_srli_epi32(a, k); }
KSEED_INLINE VU max_i32(VU a, VU b) { return _mm256_max_epi32(a, b); }

KSEED_INLINE VF add(VF a, VF b) { return _mm256_add_ps(a, b); }
KSEED_INLINE VF sub(VF a, VF b) { return _mm256_sub_ps(a, b); }
KSEED_INLINE VF mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
KSEED_INLINE VF sqrt_f(VF a) { return _mm256_sqrt_ps(a); }
KSEED_INLINE VF floor_f(VF a) { return _mm256_floor_ps(a); }
KSEED_INLINE VF to_f32(VU a) { return _mm256_cvtepi32_ps(a); }

KSEED_INLINE VM gt_i32(VU a, VU b) { return _mm256_cmpgt_epi32(a, b); }
KSEED_INLINE VM lt_u32(VU a, VU b) {  // unsigned, by a signed compare of sign-flipped values
  const VU flip = set_u(0x80000000u);
  return _mm256_cmpgt_epi32(xor_u(b, flip), xor_u(a, flip));
}
KSEED_INLINE VM lt_f(VF a, VF b) { return as_u(_mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
KSEED_INLINE VM is_nan(VF a) { return as_u(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)); }
KSEED_INLINE VM lsb_set(VU a) { return _mm256_srai_epi32(_mm256_slli_epi32(a, 31), 31); }
KSEED_INLINE VU inc_where(VU a, VM m) { return _mm256_sub_epi32(a, m); }  // m is -1 where true
KSEED_INLINE VF select_f(VM m, VF yes, VF no) { return _mm256_blendv_ps(no, yes, as_f(m)); }
KSEED_INLINE VU select_u(VM m, VU yes, VU no) { return as_u(select_f(m, as_f(yes), as_f(no))); }
KSEED_INLINE VF zero_unless(VM m, VF a) { return _mm256_and_ps(as_f(m), a); }

// (hi, lo) halves of the 32x32 -> 64-bit products a * m in every lane.
KSEED_INLINE void mulhilo(VU a, VU m, VU* hi, VU* lo) {
  const VU pe = _mm256_mul_epu32(a, m);                         // even lanes, 64-bit
  const VU po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // odd lanes, 64-bit
  *lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

// z[l] holds word l of blocks 0..7; out[g] holds elements 8 g .. 8 g + 7 (blocks 2g, 2g + 1).
KSEED_INLINE void transpose4(const VF z[4], VF out[4]) {
  const VF t0 = _mm256_unpacklo_ps(z[0], z[1]);
  const VF t1 = _mm256_unpackhi_ps(z[0], z[1]);
  const VF t2 = _mm256_unpacklo_ps(z[2], z[3]);
  const VF t3 = _mm256_unpackhi_ps(z[2], z[3]);
  const VF a = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
  const VF b = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
  const VF c = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
  const VF d = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
  // a: blocks 0, 4; b: 1, 5; c: 2, 6; d: 3, 7
  out[0] = _mm256_permute2f128_ps(a, b, 0x20);
  out[1] = _mm256_permute2f128_ps(c, d, 0x20);
  out[2] = _mm256_permute2f128_ps(a, b, 0x31);
  out[3] = _mm256_permute2f128_ps(c, d, 0x31);
}

KSEED_INLINE VF load_f(const float* p) { return _mm256_loadu_ps(p); }
KSEED_INLINE void store_f(float* p, VF v) { _mm256_storeu_ps(p, v); }
KSEED_INLINE VU load_u(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
KSEED_INLINE void store_u(uint32_t* p, VU v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
KSEED_INLINE VF load_bf16(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return as_f(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
KSEED_INLINE void store_u16(uint16_t* p, VU v) {  // v: values < 2^16
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
KSEED_INLINE VF load_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
KSEED_INLINE void store_f16(uint16_t* p, VF v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The Rademacher term (spec 8): sign_word broadcasts a 32-element sign word (once per seed and word);
// select_sign(c, nc, s, q) flips the sign of c in the lanes whose bit q * 8 + lane of it is set: the
// word is shifted left per lane (vpsllvd) so that lane's bit lands in the sign position, masked and
// xor'ed into c (nc = -c is unused here).
// The Rademacher pass (kernels-inl.h): 4 seeds per pass over the accumulator, a whole sign word (4 ymm
// accumulators) per run, next to the 4 seeds' c, the 4 shift counts and the sign mask: 16 registers.
constexpr int kSignGroup = 4;
constexpr int kSignRun = 4;
using SW = VU;
KSEED_INLINE SW sign_word(const uint32_t* word) { return set_u(*word); }
KSEED_INLINE VF select_sign(VF c, VF /*nc*/, SW s, int q) {
  alignas(32) static constexpr uint32_t kShift[4][8] = {{31, 30, 29, 28, 27, 26, 25, 24},
                                                        {23, 22, 21, 20, 19, 18, 17, 16},
                                                        {15, 14, 13, 12, 11, 10, 9, 8},
                                                        {7, 6, 5, 4, 3, 2, 1, 0}};
  const VU t = _mm256_sllv_epi32(s, load_u(kShift[q]));
  return as_f(xor_u(as_u(c), and_u(t, set_u(0x80000000u))));
}
