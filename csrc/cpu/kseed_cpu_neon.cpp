// The NEON path (aarch64): kernels-inl.h over the 4-lane vector of vec_neon-inl.h.  Advanced SIMD is
// baseline on aarch64, so no target region is needed; the build's -ffp-contract=off keeps every mul
// and add separate (no fmla).
#include <cstring>

#include "kernel_table.h"

#if defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
#include <arm_neon.h>

namespace kseed {
namespace cpu {
namespace neon {
#include "vec_neon-inl.h"
#include "kernels-inl.h"
bool supported() { return true; }
}  // namespace neon

const Kernels* neon_kernels() {
  static constexpr Kernels k = neon::make_kernels(&neon::supported);
  return &k;
}

}  // namespace cpu
}  // namespace kseed

#else  // not aarch64: this build has no NEON path
const kseed::cpu::Kernels* kseed::cpu::neon_kernels() { return nullptr; }
#endif
