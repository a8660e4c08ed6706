// Argument reading and checks shared by the CPU (csrc/ops_cpu.cpp) and CUDA (csrc/cuda/kseed_cuda_ops.cpp)
// op implementations, so that a direct torch.ops.kseed call gets the same clear Python error
// (TypeError / ValueError) on every device, and both devices build the same multi-tensor plan
// (kseed_plan.h) from the same checked arguments.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "kseed_plan.h"
#include "kseed_types.h"

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

inline DType dtype_of(const at::Tensor& t, const std::string& what) {
  check_float_dtype(t, what);
  return t.scalar_type() == at::kFloat ? DType::F32
         : t.scalar_type() == at::kBFloat16 ? DType::BF16 : DType::F16;
}

inline void check_device(const at::Tensor& t, const std::string& what, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(t.device().type() == device_type, "kseed (", c10::DeviceTypeName(device_type),
                    "): ", what, " must be a ", c10::DeviceTypeName(device_type), " tensor, got ",
                    t.device());
}

// A tensor the kernels can index (a float dtype, contiguous, at most 2^62 elements) on `device_type`.
inline void check_weight(const at::Tensor& t, const std::string& what, c10::DeviceType device_type) {
  check_device(t, what, device_type);
  check_float_dtype(t, what);
  TORCH_CHECK_VALUE(t.is_contiguous(), "kseed: ", what, " must be contiguous");
  TORCH_CHECK_VALUE(t.numel() <= kMaxIndex, "kseed: ", what, " has more than 2^62 elements");
}

// A tensor the op writes: as torch does for its own in-place ops, an inference tensor (made under
// torch.inference_mode) is written only inside inference mode.
inline void check_writable(const at::Tensor& t, const std::string& what) {
  TORCH_CHECK_VALUE(!t.is_inference() || c10::InferenceMode::is_enabled(), "kseed: ", what,
                    " is an inference tensor (made under torch.inference_mode); it can be written "
                    "only inside torch.inference_mode(), as torch's in-place ops require; clone it "
                    "first or call inside inference_mode");
}

inline uint32_t check_stream(int64_t stream, const std::string& what) {
  TORCH_CHECK_VALUE(stream >= 0 && stream < kU32, "kseed: ", what, " must be in [0, 2^32), got ",
                    stream);
  return uint32_t(stream);
}

inline int check_rounding(int64_t rounding) {
  TORCH_CHECK_VALUE(rounding == kRoundNearest || rounding == kRoundStochastic,
                    "kseed: rounding must be ", int(kRoundNearest), " (nearest) or ",
                    int(kRoundStochastic), " (stochastic), got ", rounding);
  return int(rounding);
}

inline Noise check_noise(int64_t noise) {
  TORCH_CHECK_VALUE(noise == kNoiseGaussian || noise == kNoiseRademacher, "kseed: noise must be ",
                    int(kNoiseGaussian), " (gaussian) or ", int(kNoiseRademacher),
                    " (rademacher), got ", noise);
  return Noise(noise);
}

// The out tensor of gaussian_ / rademacher_ (float32, 1-d, contiguous, writable, on `device_type`) and
// its offset; returns the checked stream id.
inline uint32_t check_noise_out(const at::Tensor& out, int64_t stream, int64_t offset,
                               c10::DeviceType device_type) {
  check_device(out, "out", device_type);
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, "kseed: out must be float32, got ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 1, "kseed: out must be 1-d, got ", out.dim(), " dims");
  TORCH_CHECK_VALUE(out.is_contiguous(), "kseed: out must be contiguous");
  check_writable(out, "out");
  TORCH_CHECK_VALUE(offset >= 0 && offset <= kMaxIndex - out.numel(),
                    "kseed: offset must be >= 0 with offset + numel <= 2^62, got offset ", offset);
  return check_stream(stream, "stream");
}

// The seeds (int64 [K], uint64 bit patterns) and finite float32 coefficients [K] of an apply call, read
// into contiguous CPU tensors (from CPU or device tensors).
struct SeedsCoefs {
  at::Tensor seeds, coefs;
  int64_t K = 0;
  const uint64_t* s() const { return reinterpret_cast<const uint64_t*>(seeds.data_ptr<int64_t>()); }
  const float* c() const { return coefs.data_ptr<float>(); }
};

inline SeedsCoefs read_seeds_coefs(const at::Tensor& seeds, const at::Tensor& coefs) {
  TORCH_CHECK_TYPE(seeds.scalar_type() == at::kLong, "kseed: seeds must be an int64 tensor, got ",
                   seeds.scalar_type());
  TORCH_CHECK_TYPE(coefs.scalar_type() == at::kFloat, "kseed: coefs must be a float32 tensor, got ",
                   coefs.scalar_type());
  TORCH_CHECK_VALUE(seeds.dim() == 1, "kseed: seeds must be 1-d [K], got ", seeds.dim(), " dims");
  TORCH_CHECK_VALUE(coefs.dim() == 1, "kseed: coefs must be 1-d [K], got ", coefs.dim(), " dims");
  TORCH_CHECK_VALUE(seeds.numel() == coefs.numel(),
                    "kseed: seeds and coefs must have the same length, got ", seeds.numel(), " and ",
                    coefs.numel());
  SeedsCoefs out;
  out.seeds = seeds.cpu().contiguous();
  out.coefs = coefs.cpu().contiguous();
  out.K = out.seeds.numel();
  const float* cp = out.c();
  for (const auto k : c10::irange(out.K)) {  // x - x == 0 fails for NaN and +-inf
    TORCH_CHECK_VALUE(cp[k] - cp[k] == 0.0f, "kseed: coefs must be finite, got coefs[", k, "] = ",
                      cp[k]);
  }
  return out;
}

// The checked arguments of _noise_floor: `like` (the device) on `device_type`, the noise family,
// 1 <= numel <= 2^62, the stream id and the seeds and coefficients.
struct FloorArgs {
  Noise noise;
  uint32_t stream;
  SeedsCoefs sc;
};

inline FloorArgs read_floor(const at::Tensor& like, const at::Tensor& seeds, const at::Tensor& coefs,
                            int64_t numel, int64_t stream, int64_t noise, c10::DeviceType device_type) {
  check_device(like, "like", device_type);
  const Noise nz = check_noise(noise);
  TORCH_CHECK_VALUE(numel > 0 && numel <= kMaxIndex, "kseed: numel must be in [1, 2^62], got ", numel);
  const uint32_t st = check_stream(stream, "stream");
  return {nz, st, read_seeds_coefs(seeds, coefs)};
}

// The plan of an apply call on outs[i] = round(bases[i] + acc) (bases empty: in place on outs), after
// checking every tensor: the device type, one device for all, dtype and layout, equal shape and dtype of
// each base and its out, no out overlapping another out or a base.  Empty tensors are skipped.
// *device is set to the tensors' device (unset if the lists are empty).
inline ApplyPlan build_plan(at::TensorList bases, at::TensorList outs, at::IntArrayRef streams,
                            c10::DeviceType device_type, int64_t tile_elems,
                            c10::optional<at::Device>* device) {
  const bool in_place = bases.empty();
  TORCH_CHECK_VALUE(in_place || bases.size() == outs.size(),
                    "kseed: bases and outs must have the same length, got ", bases.size(), " and ",
                    outs.size());
  TORCH_CHECK_VALUE(outs.size() == streams.size(), "kseed: ", in_place ? "tensors" : "outs",
                    " and streams must have the same length, got ", outs.size(), " and ",
                    streams.size());
  struct Span {
    uintptr_t begin, end;
    bool written;
    size_t index;
  };
  std::vector<Span> spans;
  ApplyPlan plan(tile_elems);
  for (const auto i : c10::irange(outs.size())) {
    const std::string idx = "[" + std::to_string(i) + "]";
    const std::string what = (in_place ? "tensors" : "outs") + idx;
    const at::Tensor& o = outs[i];
    check_weight(o, what, device_type);
    check_writable(o, what);
    const uint32_t st = check_stream(streams[i], "streams" + idx);
    if (!device->has_value()) *device = o.device();
    TORCH_CHECK_VALUE(o.device() == **device, "kseed: all tensors must be on one device, got ",
                      **device, " and ", o.device());
    const DType dt = dtype_of(o, what);
    const void* src = o.data_ptr();
    if (!in_place) {
      const at::Tensor& b = bases[i];
      check_weight(b, "bases" + idx, device_type);
      TORCH_CHECK_VALUE(b.device() == o.device(), "kseed: bases", idx, " is on ", b.device(),
                        " but outs", idx, " on ", o.device());
      TORCH_CHECK_TYPE(b.scalar_type() == o.scalar_type(), "kseed: bases", idx, " is ",
                       b.scalar_type(), " but outs", idx, " is ", o.scalar_type());
      TORCH_CHECK_VALUE(b.sizes() == o.sizes(), "kseed: bases", idx, " has shape ", b.sizes(),
                        " but outs", idx, " has shape ", o.sizes());
      src = b.data_ptr();
    }
    const int64_t n = o.numel();
    if (n == 0) continue;
    const uintptr_t nbytes = uintptr_t(n) * uintptr_t(dtype_size(dt));
    const auto ob = reinterpret_cast<uintptr_t>(o.data_ptr());
    spans.push_back({ob, ob + nbytes, true, i});
    if (!in_place) {
      const auto bb = reinterpret_cast<uintptr_t>(src);
      spans.push_back({bb, bb + nbytes, false, i});
    }
    plan.add(dt, src, o.data_ptr(), n, st);
  }
  // Sweep in address order: a written span may overlap nothing; a read span may overlap only reads.
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  const Span* last_any = nullptr;
  const Span* last_written = nullptr;
  for (const Span& s : spans) {
    const Span* clash = s.written ? last_any : last_written;
    if (clash != nullptr && s.begin < clash->end) {
      const auto name = [&](const Span& x) {
        return std::string(x.written ? (in_place ? "tensors[" : "outs[") : "bases[") +
               std::to_string(x.index) + "]";
      };
      TORCH_CHECK_VALUE(false, "kseed: ", name(*clash), " and ", name(s), " overlap in memory; ",
                        in_place ? "list each tensor once"
                                 : "an out must not share memory with a base or another out");
    }
    if (last_any == nullptr || s.end > last_any->end) last_any = &s;
    if (s.written && (last_written == nullptr || s.end > last_written->end)) last_written = &s;
  }
  return plan;
}

// Everything an apply call's kernels need, read and checked: its plan (tiles of tile_elems elements),
// seeds and coefficients, rounding code and stochastic-rounding key, noise family, and the tensors'
// device.
struct ApplyCall {
  ApplyPlan plan;
  SeedsCoefs sc;
  int rounding;
  uint64_t sr_key;
  Noise noise;
  c10::optional<at::Device> device;
  bool empty() const { return sc.K == 0 || plan.empty(); }
};

inline ApplyCall read_apply(at::TensorList bases, at::TensorList outs, at::IntArrayRef streams,
                            const at::Tensor& seeds, const at::Tensor& coefs, int64_t rounding,
                            int64_t sr_key, int64_t noise, c10::DeviceType device_type,
                            int64_t tile_elems) {
  const int r = check_rounding(rounding);
  const Noise nz = check_noise(noise);
  SeedsCoefs sc = read_seeds_coefs(seeds, coefs);
  c10::optional<at::Device> device;
  ApplyPlan plan = build_plan(bases, outs, streams, device_type, tile_elems, &device);
  return ApplyCall{std::move(plan), std::move(sc), r, uint64_t(sr_key), nz, device};
}

// The four apply ops of a device, all through its Run(bases, outs, streams, seeds, coefs, rounding,
// sr_key, noise) (bases empty: in place), and their registration: impl_apply_ops<run_apply>(m) in the device's
// TORCH_LIBRARY_IMPL block.
using RunApply = void (*)(at::TensorList, at::TensorList, at::IntArrayRef, const at::Tensor&,
                          const at::Tensor&, int64_t, int64_t, int64_t);

template <RunApply Run>
struct ApplyOps {
  static void in_place(at::Tensor& tensor, const at::Tensor& seeds, const at::Tensor& coefs,
                       int64_t stream, int64_t rounding, int64_t sr_key, int64_t noise) {
    Run({}, {tensor}, {stream}, seeds, coefs, rounding, sr_key, noise);
  }
  static void multi(at::TensorList tensors, at::IntArrayRef streams, const at::Tensor& seeds,
                    const at::Tensor& coefs, int64_t rounding, int64_t sr_key, int64_t noise) {
    Run({}, tensors, streams, seeds, coefs, rounding, sr_key, noise);
  }
  static void out(const at::Tensor& base, at::Tensor& out, const at::Tensor& seeds,
                  const at::Tensor& coefs, int64_t stream, int64_t rounding, int64_t sr_key,
                  int64_t noise) {
    Run({base}, {out}, {stream}, seeds, coefs, rounding, sr_key, noise);
  }
  static void multi_out(at::TensorList bases, at::TensorList outs, at::IntArrayRef streams,
                        const at::Tensor& seeds, const at::Tensor& coefs, int64_t rounding,
                        int64_t sr_key, int64_t noise) {
    TORCH_CHECK_VALUE(bases.size() == outs.size(),
                      "kseed: bases and outs must have the same length, got ", bases.size(), " and ",
                      outs.size());
    if (!outs.empty()) Run(bases, outs, streams, seeds, coefs, rounding, sr_key, noise);
  }
};

template <RunApply Run>
void impl_apply_ops(torch::Library& m) {
  m.impl("apply_seeds_", &ApplyOps<Run>::in_place);
  m.impl("apply_seeds_multi_", &ApplyOps<Run>::multi);
  m.impl("apply_seeds_out", &ApplyOps<Run>::out);
  m.impl("apply_seeds_multi_out", &ApplyOps<Run>::multi_out);
}

// ------------------------------------------------------------------------------ project_seeds
// The checked arguments of a project_seeds call (docs/SPEC.md section 9): the non-empty tensors in list
// order as plan rows (src, numel, stream; reserved = the DType; first_tile = the index of the tensor's
// first block of PROJECT_BLOCK elements among all the call's blocks, which is the order of the float64
// sum), the seeds, the noise family and the tensors' device.  The tensors are only read: they may share
// memory and may be inference tensors.
struct ProjectCall {
  std::vector<PlanRow> rows;
  int64_t blocks = 0;
  SeedsCoefs sc;  // the seeds (coefs unused, zeros)
  Noise noise = kNoiseGaussian;
  c10::optional<at::Device> device;
  bool empty() const { return sc.K == 0 || rows.empty(); }
};

inline ProjectCall read_project(at::TensorList tensors, at::IntArrayRef streams, const at::Tensor& seeds,
                                int64_t noise, c10::DeviceType device_type, int64_t block_elems) {
  ProjectCall call;
  call.noise = check_noise(noise);
  call.sc = read_seeds_coefs(seeds, at::zeros({seeds.dim() == 1 ? seeds.numel() : 0}, at::kFloat));
  TORCH_CHECK_VALUE(tensors.size() == streams.size(),
                    "kseed: tensors and streams must have the same length, got ", tensors.size(), " and ",
                    streams.size());
  for (const auto i : c10::irange(tensors.size())) {
    const std::string what = "tensors[" + std::to_string(i) + "]";
    const at::Tensor& t = tensors[i];
    check_weight(t, what, device_type);
    const uint32_t st = check_stream(streams[i], "streams[" + std::to_string(i) + "]");
    if (!call.device.has_value()) call.device = t.device();
    TORCH_CHECK_VALUE(t.device() == *call.device, "kseed: all tensors must be on one device, got ",
                      *call.device, " and ", t.device());
    if (t.numel() == 0) continue;
    call.rows.push_back({t.data_ptr(), nullptr, t.numel(), st, uint32_t(dtype_of(t, what)), call.blocks});
    call.blocks += tiles_of(t.numel(), block_elems);
  }
  return call;
}

}  // namespace checks
}  // namespace kseed
