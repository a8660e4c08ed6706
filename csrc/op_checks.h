// Argument checks shared by the CPU (csrc/ops.cpp) and CUDA (csrc/cuda/kseed_cuda_ops.cpp) op
// implementations, so that a direct torch.ops.kseed call gets the same clear Python error
// (TypeError / ValueError) on every device.  Device checks stay with each backend.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <cstdint>
#include <string>

namespace kseed {
namespace checks {

constexpr int64_t kMaxIndex = int64_t(1) << 62;  // element indices must fit the kernels' int64
constexpr int64_t kU32 = int64_t(1) << 32;

// float32, bfloat16 or float16, else TypeError.
inline void check_float_dtype(const at::Tensor& t, const std::string& what) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "kseed: ", what,
                   " must be float32, bfloat16 or float16, got ", st);
}

// A weight tensor the kernels can index: a float dtype, contiguous, at most 2^62 elements.
inline void check_weight_layout(const at::Tensor& t, const std::string& what) {
  check_float_dtype(t, what);
  TORCH_CHECK_VALUE(t.is_contiguous(), "kseed: ", what, " must be contiguous");
  TORCH_CHECK_VALUE(t.numel() <= kMaxIndex, "kseed: ", what, " has more than 2^62 elements");
}

inline uint32_t check_stream(int64_t stream, const std::string& what) {
  TORCH_CHECK_VALUE(stream >= 0 && stream < kU32, "kseed: ", what, " must be in [0, 2^32), got ",
                    stream);
  return uint32_t(stream);
}

inline int check_rounding(int64_t rounding) {
  TORCH_CHECK_VALUE(rounding == 0 || rounding == 1,
                    "kseed: rounding must be 0 (nearest) or 1 (stochastic), got ", rounding);
  return int(rounding);
}

// seeds: int64 [K] (uint64 bit patterns); coefs: float32 [K].
inline void check_seeds_coefs(const at::Tensor& seeds, const at::Tensor& coefs) {
  TORCH_CHECK_TYPE(seeds.scalar_type() == at::kLong, "kseed: seeds must be an int64 tensor, got ",
                   seeds.scalar_type());
  TORCH_CHECK_TYPE(coefs.scalar_type() == at::kFloat, "kseed: coefs must be a float32 tensor, got ",
                   coefs.scalar_type());
  TORCH_CHECK_VALUE(seeds.dim() == 1, "kseed: seeds must be 1-d [K], got ", seeds.dim(), " dims");
  TORCH_CHECK_VALUE(coefs.dim() == 1, "kseed: coefs must be 1-d [K], got ", coefs.dim(), " dims");
  TORCH_CHECK_VALUE(seeds.numel() == coefs.numel(),
                    "kseed: seeds and coefs must have the same length, got ", seeds.numel(), " and ",
                    coefs.numel());
}

// Every coefficient finite (x - x == 0 fails for NaN and +-inf), else ValueError naming the first bad one.
inline void check_finite_coefs(const float* cp, int64_t k_count) {
  for (const auto k : c10::irange(k_count)) {
    TORCH_CHECK_VALUE(cp[k] - cp[k] == 0.0f, "kseed: coefs must be finite, got coefs[", k, "] = ",
                      cp[k]);
  }
}

}  // namespace checks
}  // namespace kseed
