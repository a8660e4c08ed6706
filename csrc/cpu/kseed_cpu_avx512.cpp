// The AVX-512 path: kernels-inl.h over the 16-lane vector of vec_avx512-inl.h, compiled for
// "avx512f,avx512dq,avx512bw,avx512vl" by a target region, not by -m flags, and chosen at run time.
// The build's -ffp-contract=off keeps every mul and add separate although AVX-512F has fma.
#include <cstring>

#include "kernel_table.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

KSEED_TARGET_BEGIN("avx512f,avx512dq,avx512bw,avx512vl")
namespace kseed {
namespace cpu {
namespace avx512 {
#include "vec_avx512-inl.h"
#include "kernels-inl.h"
}  // namespace avx512
}  // namespace cpu
}  // namespace kseed
KSEED_TARGET_END

namespace kseed {
namespace cpu {
namespace {
bool avx512_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
}  // namespace
const Kernels* avx512_kernels() {
  static constexpr Kernels k = avx512::make_kernels(&avx512_supported);
  return &k;
}
}  // namespace cpu
}  // namespace kseed

#else  // not x86-64: this build has no AVX-512 path
const kseed::cpu::Kernels* kseed::cpu::avx512_kernels() { return nullptr; }
#endif
