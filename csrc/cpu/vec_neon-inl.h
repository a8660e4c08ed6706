// The NEON (AArch64 Advanced SIMD) vector type of kernels-inl.h: 4 lanes.  NEON is baseline on
// aarch64, so there is no target region.  Included by kseed_cpu_neon.cpp only, inside namespace
// kseed::cpu::neon.  Masks are full lanes.  Float conversions follow FPCR, whose default (and the Linux
// and macOS process default) is round to nearest even without flush-to-zero or default-NaN.

constexpr int kLanes = 4;
constexpr int kUnroll = 1;  // one group per step: with two, GCC reloads the polynomial constants (more insns)
using VF = float32x4_t;
using VU = uint32x4_t;
using VM = uint32x4_t;

KSEED_INLINE VU set_u(uint32_t x) { return vdupq_n_u32(x); }
KSEED_INLINE VF set_f(float x) { return vdupq_n_f32(x); }
KSEED_INLINE VU iota() {
  static constexpr uint32_t k[4] = {0, 1, 2, 3};
  return vld1q_u32(k);
}
KSEED_INLINE VF as_f(VU v) { return vreinterpretq_f32_u32(v); }
KSEED_INLINE VU as_u(VF v) { return vreinterpretq_u32_f32(v); }

KSEED_INLINE VU add(VU a, VU b) { return vaddq_u32(a, b); }
KSEED_INLINE VU sub(VU a, VU b) { return vsubq_u32(a, b); }
KSEED_INLINE VU and_u(VU a, VU b) { return vandq_u32(a, b); }
KSEED_INLINE VU or_u(VU a, VU b) { return vorrq_u32(a, b); }
KSEED_INLINE VU xor_u(VU a, VU b) { return veorq_u32(a, b); }
KSEED_INLINE VU xor3(VU a, VU b, VU c) { return veorq_u32(veorq_u32(a, b), c); }
template <int k>
KSEED_INLINE VU shl(VU a) { return vshlq_n_u32(a, k); }
template <int k>
KSEED_INLINE VU shr(VU a) { return vshrq_n_u32(a, k); }
KSEED_INLINE VU max_i32(VU a, VU b) {
  return vreinterpretq_u32_s32(vmaxq_s32(vreinterpretq_s32_u32(a), vreinterpretq_s32_u32(b)));
}

KSEED_INLINE VF add(VF a, VF b) { return vaddq_f32(a, b); }
KSEED_INLINE VF sub(VF a, VF b) { return vsubq_f32(a, b); }
KSEED_INLINE VF mul(VF a, VF b) { return vmulq_f32(a, b); }
KSEED_INLINE VF sqrt_f(VF a) { return vsqrtq_f32(a); }
KSEED_INLINE VF floor_f(VF a) { return vrndmq_f32(a); }
KSEED_INLINE VF to_f32(VU a) { return vcvtq_f32_s32(vreinterpretq_s32_u32(a)); }

KSEED_INLINE VM gt_i32(VU a, VU b) { return vcgtq_s32(vreinterpretq_s32_u32(a), vreinterpretq_s32_u32(b)); }
KSEED_INLINE VM lt_u32(VU a, VU b) { return vcltq_u32(a, b); }
KSEED_INLINE VM lt_f(VF a, VF b) { return vcltq_f32(a, b); }
KSEED_INLINE VM is_nan(VF a) { return vmvnq_u32(vceqq_f32(a, a)); }
KSEED_INLINE VM lsb_set(VU a) { return vtstq_u32(a, vdupq_n_u32(1)); }
KSEED_INLINE VU inc_where(VU a, VM m) { return vsubq_u32(a, m); }  // m is -1 where true
KSEED_INLINE VF select_f(VM m, VF yes, VF no) { return vbslq_f32(m, yes, no); }
KSEED_INLINE VU select_u(VM m, VU yes, VU no) { return vbslq_u32(m, yes, no); }
KSEED_INLINE VF zero_unless(VM m, VF a) { return as_f(vandq_u32(m, as_u(a))); }

// (hi, lo) halves of the 32x32 -> 64-bit products a * m in every lane (UMULL, UMULL2, UZP1, UZP2).
KSEED_INLINE void mulhilo(VU a, VU m, VU* hi, VU* lo) {
  const VU p01 = vreinterpretq_u32_u64(vmull_u32(vget_low_u32(a), vget_low_u32(m)));
  const VU p23 = vreinterpretq_u32_u64(vmull_high_u32(a, m));
  *lo = vuzp1q_u32(p01, p23);
  *hi = vuzp2q_u32(p01, p23);
}

// z[l] holds word l of blocks 0..3; out[g] holds elements 4 g .. 4 g + 3 (block g): a 4x4 transpose.
KSEED_INLINE void transpose4(const VF z[4], VF out[4]) {
  const float64x2_t t0 = vreinterpretq_f64_f32(vtrn1q_f32(z[0], z[1]));  // z0[0] z1[0] z0[2] z1[2]
  const float64x2_t t1 = vreinterpretq_f64_f32(vtrn2q_f32(z[0], z[1]));  // z0[1] z1[1] z0[3] z1[3]
  const float64x2_t t2 = vreinterpretq_f64_f32(vtrn1q_f32(z[2], z[3]));
  const float64x2_t t3 = vreinterpretq_f64_f32(vtrn2q_f32(z[2], z[3]));
  out[0] = vreinterpretq_f32_f64(vtrn1q_f64(t0, t2));
  out[1] = vreinterpretq_f32_f64(vtrn1q_f64(t1, t3));
  out[2] = vreinterpretq_f32_f64(vtrn2q_f64(t0, t2));
  out[3] = vreinterpretq_f32_f64(vtrn2q_f64(t1, t3));
}

KSEED_INLINE VF load_f(const float* p) { return vld1q_f32(p); }
KSEED_INLINE void store_f(float* p, VF v) { vst1q_f32(p, v); }
KSEED_INLINE VU load_u(const uint32_t* p) { return vld1q_u32(p); }
KSEED_INLINE void store_u(uint32_t* p, VU v) { vst1q_u32(p, v); }
KSEED_INLINE VF load_bf16(const uint16_t* p) { return as_f(vshll_n_u16(vld1_u16(p), 16)); }
KSEED_INLINE void store_u16(uint16_t* p, VU v) { vst1_u16(p, vmovn_u32(v)); }  // v: values < 2^16
KSEED_INLINE VF load_f16(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
KSEED_INLINE void store_f16(uint16_t* p, VF v) { vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(v))); }

// The Rademacher term (spec 8): sign_word broadcasts a 32-element sign word (ld1r, once per seed and
// word); select_sign(c, nc, s, q) is nc (= -c) in the lanes whose bit q * 4 + lane of it is set, c
// elsewhere: the word tested against each lane's bit (cmtst) selects (bsl).
// The Rademacher pass (kernels-inl.h): 4 seeds per pass over the accumulator, a whole sign word (8
// accumulators) per run, next to the 4 seeds' c and -c and the 8 bit masks: 32 registers.
constexpr int kSignGroup = 4;
constexpr int kSignRun = 8;
using SW = VU;
KSEED_INLINE SW sign_word(const uint32_t* word) { return vld1q_dup_u32(word); }
KSEED_INLINE VF select_sign(VF c, VF nc, SW s, int q) {
  alignas(16) static constexpr uint32_t kBit[8][4] = {
      {1u << 0, 1u << 1, 1u << 2, 1u << 3},     {1u << 4, 1u << 5, 1u << 6, 1u << 7},
      {1u << 8, 1u << 9, 1u << 10, 1u << 11},   {1u << 12, 1u << 13, 1u << 14, 1u << 15},
      {1u << 16, 1u << 17, 1u << 18, 1u << 19}, {1u << 20, 1u << 21, 1u << 22, 1u << 23},
      {1u << 24, 1u << 25, 1u << 26, 1u << 27}, {1u << 28, 1u << 29, 1u << 30, 1u << 31}};
  return vbslq_f32(vtstq_u32(s, vld1q_u32(kBit[q])), nc, c);
}
