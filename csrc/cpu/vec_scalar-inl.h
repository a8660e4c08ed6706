// The portable one-lane "vector" of kernels-inl.h: plain float and uint32_t, so the scalar path is the
// same kernel source as the SIMD paths.  The conversions are kseed_core.h's, the spec's scalar home.
// Included by kseed_cpu_scalar.cpp only, inside namespace kseed::cpu::scalar (no target region).

constexpr int kLanes = 1;
constexpr int kUnroll = 1;
using VF = float;
using VU = uint32_t;
using VM = bool;

KSEED_INLINE VU set_u(uint32_t x) { return x; }
KSEED_INLINE VF set_f(float x) { return x; }
KSEED_INLINE VU iota() { return 0; }
KSEED_INLINE VF as_f(VU v) { return bits_to_float(v); }
KSEED_INLINE VU as_u(VF v) { return float_to_bits(v); }

KSEED_INLINE VU add(VU a, VU b) { return a + b; }
KSEED_INLINE VU sub(VU a, VU b) { return a - b; }
KSEED_INLINE VU and_u(VU a, VU b) { return a & b; }
KSEED_INLINE VU or_u(VU a, VU b) { return a | b; }
KSEED_INLINE VU xor_u(VU a, VU b) { return a ^ b; }
KSEED_INLINE VU xor3(VU a, VU b, VU c) { return a ^ b ^ c; }
template <int k>
KSEED_INLINE VU shl(VU a) { return a << k; }
template <int k>
KSEED_INLINE VU shr(VU a) { return a >> k; }
KSEED_INLINE VU max_i32(VU a, VU b) { return int32_t(a) > int32_t(b) ? a : b; }

KSEED_INLINE VF add(VF a, VF b) { return fadd(a, b); }
KSEED_INLINE VF sub(VF a, VF b) { return fsub(a, b); }
KSEED_INLINE VF mul(VF a, VF b) { return fmul(a, b); }
KSEED_INLINE VF sqrt_f(VF a) { return fsqrt(a); }
KSEED_INLINE VF floor_f(VF a) { return __builtin_floorf(a); }
KSEED_INLINE VF to_f32(VU a) { return float(int32_t(a)); }

KSEED_INLINE VM gt_i32(VU a, VU b) { return int32_t(a) > int32_t(b); }
KSEED_INLINE VM lt_u32(VU a, VU b) { return a < b; }
KSEED_INLINE VM lt_f(VF a, VF b) { return a < b; }
KSEED_INLINE VM is_nan(VF a) { return a != a; }
KSEED_INLINE VM lsb_set(VU a) { return (a & 1u) != 0; }
KSEED_INLINE VU inc_where(VU a, VM m) { return a + (m ? 1u : 0u); }
KSEED_INLINE VF select_f(VM m, VF yes, VF no) { return m ? yes : no; }
KSEED_INLINE VU select_u(VM m, VU yes, VU no) { return m ? yes : no; }
KSEED_INLINE VF zero_unless(VM m, VF a) { return m ? a : 0.0f; }

KSEED_INLINE void mulhilo(VU a, VU m, VU* hi, VU* lo) {
  const uint64_t p = uint64_t(a) * m;
  *hi = uint32_t(p >> 32);
  *lo = uint32_t(p);
}

// One block per vector: its four words are already in element order.
KSEED_INLINE void transpose4(const VF z[4], VF out[4]) {
  for (int l = 0; l < 4; ++l) out[l] = z[l];
}

KSEED_INLINE VF load_f(const float* p) { return *p; }
KSEED_INLINE void store_f(float* p, VF v) { *p = v; }
KSEED_INLINE VU load_u(const uint32_t* p) { return *p; }
KSEED_INLINE void store_u(uint32_t* p, VU v) { *p = v; }
KSEED_INLINE VF load_bf16(const uint16_t* p) { return bf16_bits_to_float(*p); }
KSEED_INLINE void store_u16(uint16_t* p, VU v) { *p = uint16_t(v); }
KSEED_INLINE VF load_f16(const uint16_t* p) { return fp16_bits_to_float(*p); }
KSEED_INLINE void store_f16(uint16_t* p, VF v) { *p = round_fp16_nearest(v); }

// The Rademacher term (spec 8): sign_word loads a 32-element sign word once per seed; select_sign(c, nc,
// s, q) is c with its sign flipped where the lane's bit q * kLanes + lane (here: bit q) of it is set.
// nc = -c is unused here.
// The Rademacher pass (kernels-inl.h): 8 seeds per pass over the accumulator, 8 elements of a sign word
// per run.
constexpr int kSignGroup = 8;
constexpr int kSignRun = 8;
using SW = uint32_t;
KSEED_INLINE SW sign_word(const uint32_t* word) { return *word; }
KSEED_INLINE VF select_sign(VF c, VF /*nc*/, SW s, int q) { return as_f(as_u(c) ^ ((s >> q) << 31)); }
