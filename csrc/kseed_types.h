// One home for the small codes every backend shares: the weight dtypes and the rounding modes.
// Host, device and torch-free code include it; the Python mirror (the Triton kernels' constants) is
// kseed_kernels/_spec.py, and tests check that the two agree.
#pragma once
#include <cstdint>

namespace kseed {

// Element type of a weight tensor.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Rounding of the final write w = round(float32(w) + acc) to a 16-bit dtype (float32 is exact).
enum Rounding : int { kRoundNearest = 0, kRoundStochastic = 1 };

// The noise family of an apply (docs/SPEC.md: sections 2-4 Gaussian, section 8 Rademacher).
enum Noise : int { kNoiseGaussian = 0, kNoiseRademacher = 1 };

// Bytes per element of a dtype.
inline constexpr int64_t dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

}  // namespace kseed
