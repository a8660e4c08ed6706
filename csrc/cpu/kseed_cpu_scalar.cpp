// The portable scalar path: kernels-inl.h over the one-lane vector of vec_scalar-inl.h.
#include <cstring>

#include "kernel_table.h"

namespace kseed {
namespace cpu {
namespace scalar {
#include "vec_scalar-inl.h"
#include "kernels-inl.h"
bool supported() { return true; }
}  // namespace scalar

const Kernels* scalar_kernels() {
  static constexpr Kernels k = scalar::make_kernels(&scalar::supported);
  return &k;
}

}  // namespace cpu
}  // namespace kseed
