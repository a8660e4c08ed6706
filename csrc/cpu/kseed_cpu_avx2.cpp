// The AVX2 path: kernels-inl.h over the 8-lane vector of vec_avx2-inl.h, compiled for "avx2,f16c"
// (deliberately without "fma") by a target region, not by -m flags, and chosen at run time.
#include <cstring>

#include "kernel_table.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>

KSEED_TARGET_BEGIN("avx2,f16c")
namespace kseed {
namespace cpu {
namespace avx2 {
#include "vec_avx2-inl.h"
#include "kernels-inl.h"
}  // namespace avx2
}  // namespace cpu
}  // namespace kseed
KSEED_TARGET_END

namespace kseed {
namespace cpu {
namespace {
bool avx2_supported() {
  __builtin_cpu_init();  // idempotent; needed if this runs before libgcc's own initialisation
  unsigned a, b, c, d;  // F16C by cpuid: older clang lacks __builtin_cpu_supports("f16c")
  const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
  return __builtin_cpu_supports("avx2") && f16c;
}
}  // namespace
const Kernels* avx2_kernels() {
  static constexpr Kernels k = avx2::make_kernels(&avx2_supported);
  return &k;
}
}  // namespace cpu
}  // namespace kseed

#else  // not x86-64: this build has no AVX2 path
const kseed::cpu::Kernels* kseed::cpu::avx2_kernels() { return nullptr; }
#endif
