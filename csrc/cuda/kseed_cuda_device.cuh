// Device helpers of the CUDA kernels that are also host-callable (KSEED_HD), so that
// check/kseed_cuda_host_check.cu can test them on a machine without a GPU.
#pragma once
#include <cuda_fp16.h>

#include "../kseed_core.h"
#include "kseed_cuda.cuh"

namespace kseed {
namespace cuda {

KSEED_HD void round_keys(uint64_t seed, uint32_t rk[20]) {
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
#pragma unroll
  for (int r = 0; r < spec::PHILOX_ROUNDS; ++r) {
    rk[2 * r] = k0;
    rk[2 * r + 1] = k1;
    k0 += spec::PHILOX_W0;
    k1 += spec::PHILOX_W1;
  }
}

// Philox4x32-10 with precomputed round keys (bitwise kseed::philox).  The products of round 0 depend on
// the counter only (c0 = block, c2 = stream), not on the key: the caller computes them once per block
// and passes them in (hi0, lo0) = M0 * c0, (hi1, lo1) = M1 * c2, saving 2 of the 20 wide multiplies of
// every (seed, block) pair.
KSEED_HD Block philox_rk(uint32_t hi0, uint32_t lo0, uint32_t hi1, uint32_t lo1,
                     uint32_t c1, uint32_t c3, const uint32_t rk[20]) {
  uint32_t c0 = hi1 ^ c1 ^ rk[0];
  uint32_t c2 = hi0 ^ c3 ^ rk[1];
  c1 = lo1;
  c3 = lo0;
#pragma unroll
  for (int r = 1; r < spec::PHILOX_ROUNDS; ++r) {
    const uint64_t p0 = uint64_t(spec::PHILOX_M0) * c0;
    const uint64_t p1 = uint64_t(spec::PHILOX_M1) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ rk[2 * r];
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ rk[2 * r + 1];
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
  }
  return Block{c0, c1, c2, c3};
}

// The Rademacher term of an element (docs/SPEC.md section 8): the coefficient (bit pattern cbits) with
// its sign flipped when the element's sign bit is 1, exactly +-c, no multiply.
KSEED_HD float signed_coef(uint32_t cbits, uint32_t bit) { return bits_to_float(cbits ^ (bit << 31)); }

// Word p >> 5 of a Rademacher block's four output words (element p of the block takes its bit p & 31).
KSEED_HD uint32_t block_word(const Block& x, uint32_t w) {
  return w == 0 ? x.x0 : w == 1 ? x.x1 : w == 2 ? x.x2 : x.x3;
}

// ------------------------------------------------------------------------------- element I/O
template <DType DT>
struct Elem;

template <>
struct Elem<DType::F32> {
  using T = float;
  KSEED_HD static float to_f32(float x) { return x; }
};
template <>
struct Elem<DType::BF16> {
  using T = uint16_t;
  KSEED_HD static float to_f32(uint16_t x) { return bits_to_float(uint32_t(x) << 16); }
};
template <>
struct Elem<DType::F16> {
  using T = uint16_t;
  KSEED_HD static float to_f32(uint16_t x) { return __half2float(__ushort_as_half(x)); }
};

// The final value of one element: v = float32(w) + acc, rounded to the tensor's dtype.
template <DType DT, int ROUND>
KSEED_HD typename Elem<DT>::T finish(typename Elem<DT>::T w, float acc,
                                     uint32_t rbits) {
  const float v = fadd(Elem<DT>::to_f32(w), acc);
  if constexpr (DT == DType::F32) {
    return v;
  } else if constexpr (DT == DType::BF16) {
    return ROUND == 1 ? round_bf16_stochastic(v, rbits) : round_bf16_nearest(v);
  } else {
    const float r = ROUND == 1 ? round_fp16_stochastic_value(v, rbits) : v;
    return __half_as_ushort(__float2half_rn(r));
  }
}

}  // namespace cuda
}  // namespace kseed
