// CUDA implementations of the torch.ops.kseed operators (schemas: TORCH_LIBRARY(kseed) in
// csrc/ops.cpp).  The kernels themselves are torch-free (kseed_cuda_kernels.cu); this file checks the
// arguments, packs the per-call data (tensor table, seeds, coefficients) into one pinned host buffer,
// copies it to the device in one asynchronous copy on the current stream and launches.
//
// Also defines kseed::_noise_floor (benchmark helper; CUDA only).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <vector>

#include "../op_checks.h"
#include "kseed_cuda.cuh"

namespace {

using kseed::cuda::ApplyGroup;
using kseed::cuda::ApplyPlan;
using kseed::cuda::DType;
using kseed::cuda::TensorWork;

using kseed::checks::check_rounding;
using kseed::checks::check_stream;
using kseed::checks::kMaxIndex;

DType dtype_of(const at::Tensor& t, const std::string& what) {
  kseed::checks::check_float_dtype(t, what);
  return t.scalar_type() == at::kFloat ? DType::F32
         : t.scalar_type() == at::kBFloat16 ? DType::BF16 : DType::F16;
}

void check_weight(const at::Tensor& t, const std::string& what) {
  TORCH_CHECK_VALUE(t.is_cuda(), "kseed (CUDA): ", what, " must be a CUDA tensor, got ", t.device());
  kseed::checks::check_weight_layout(t, what);
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "kseed (CUDA): ", what, " failed: ", cudaGetErrorString(err));
}

// Host copies of seeds (int64 [K]) and coefs (finite float32 [K]), from CPU or CUDA tensors.
int64_t read_seeds_coefs(const at::Tensor& seeds, const at::Tensor& coefs, at::Tensor* s_out,
                         at::Tensor* c_out) {
  kseed::checks::check_seeds_coefs(seeds, coefs);
  *s_out = seeds.cpu().contiguous();
  *c_out = coefs.cpu().contiguous();
  kseed::checks::check_finite_coefs(c_out->data_ptr<float>(), c_out->numel());
  return s_out->numel();
}

// Packs [tables of all groups][seeds][coefs] into one pinned buffer, copies it to `device` on the
// current stream and launches one apply per group.
void run_apply(const ApplyPlan& plan, const at::Tensor& seeds, const at::Tensor& coefs,
               int rounding, uint64_t sr_key, const at::Device& device) {
  const int64_t K = seeds.numel();
  const std::vector<ApplyGroup> groups = plan.groups();
  size_t table_bytes = 0;
  for (const ApplyGroup& g : groups) table_bytes += g.works.size() * sizeof(TensorWork);
  const size_t seeds_at = table_bytes;               // multiple of 32
  const size_t coefs_at = seeds_at + size_t(K) * 8;  // multiple of 8
  const size_t total = coefs_at + size_t(K) * 4;
  at::Tensor host = at::empty({int64_t(total)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.data_ptr<uint8_t>();
  size_t at_ = 0;
  for (const ApplyGroup& g : groups) {
    std::memcpy(h + at_, g.works.data(), g.works.size() * sizeof(TensorWork));
    at_ += g.works.size() * sizeof(TensorWork);
  }
  std::memcpy(h + seeds_at, seeds.data_ptr<int64_t>(), size_t(K) * 8);
  std::memcpy(h + coefs_at, coefs.data_ptr<float>(), size_t(K) * 4);
  // One asynchronous copy on the current stream; the caching host allocator keeps `host` alive until
  // the copy has completed.
  const at::Tensor dev = host.to(device, /*non_blocking=*/true);
  const uint8_t* d = dev.data_ptr<uint8_t>();
  const auto* d_seeds = reinterpret_cast<const uint64_t*>(d + seeds_at);
  const auto* d_coefs = reinterpret_cast<const float*>(d + coefs_at);
  cudaStream_t cs = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  size_t off = 0;
  for (const ApplyGroup& g : groups) {
    const auto* table = reinterpret_cast<const TensorWork*>(d + off);
    check_cuda(kseed::cuda::launch_apply(g.dtype, table, int(g.works.size()), g.tiles, d_seeds,
                                         d_coefs, K, rounding, sr_key, g.aligned, cs),
               "apply_seeds_ launch");
    off += g.works.size() * sizeof(TensorWork);
  }
  // `dev` is freed when it goes out of scope: the caching allocator reuses the block only for work
  // queued later on the same stream, i.e. after these kernels.
}

// ---------------------------------------------------------------------------------------- ops
void gaussian_cuda(at::Tensor& out, int64_t seed, int64_t stream, int64_t offset) {
  TORCH_CHECK_VALUE(out.is_cuda(), "kseed (CUDA): out must be a CUDA tensor");
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, "kseed: out must be float32, got ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 1, "kseed: out must be 1-d, got ", out.dim(), " dims");
  TORCH_CHECK_VALUE(out.is_contiguous(), "kseed: out must be contiguous");
  const uint32_t st = check_stream(stream, "stream");
  TORCH_CHECK_VALUE(offset >= 0 && offset <= kMaxIndex - out.numel(),
                    "kseed: offset must be >= 0 with offset + numel <= 2^62, got offset ", offset);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  check_cuda(kseed::cuda::launch_gaussian(out.data_ptr<float>(), out.numel(), uint64_t(seed), st,
                                          uint64_t(offset),
                                          c10::cuda::getCurrentCUDAStream().stream()),
             "gaussian_ launch");
}

void apply_seeds_cuda(at::Tensor& tensor, const at::Tensor& seeds, const at::Tensor& coefs,
                      int64_t stream, int64_t rounding, int64_t sr_key) {
  check_weight(tensor, "tensor");
  const uint32_t st = check_stream(stream, "stream");
  const int r = check_rounding(rounding);
  at::Tensor s, c;
  const int64_t K = read_seeds_coefs(seeds, coefs, &s, &c);
  if (K == 0 || tensor.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(tensor.device());
  ApplyPlan plan;
  plan.add(dtype_of(tensor, "tensor"), tensor.data_ptr(), tensor.numel(), st);
  run_apply(plan, s, c, r, uint64_t(sr_key), tensor.device());
}

void apply_seeds_multi_cuda(at::TensorList tensors, at::IntArrayRef streams, const at::Tensor& seeds,
                            const at::Tensor& coefs, int64_t rounding, int64_t sr_key) {
  TORCH_CHECK_VALUE(tensors.size() == streams.size(),
                    "kseed: tensors and streams must have the same length, got ", tensors.size(),
                    " and ", streams.size());
  const int r = check_rounding(rounding);
  at::Tensor s, c;
  const int64_t K = read_seeds_coefs(seeds, coefs, &s, &c);
  ApplyPlan plan;
  std::vector<const void*> seen;
  c10::optional<at::Device> device;
  for (const auto i : c10::irange(tensors.size())) {
    const std::string what = "tensors[" + std::to_string(i) + "]";
    const at::Tensor& t = tensors[i];
    check_weight(t, what);
    const uint32_t st = check_stream(streams[i], "streams[" + std::to_string(i) + "]");
    if (!device) device = t.device();
    TORCH_CHECK_VALUE(t.device() == *device, "kseed: all tensors must be on one device, got ",
                      *device, " and ", t.device());
    if (t.numel() == 0) continue;
    for (const void* p : seen) {
      TORCH_CHECK_VALUE(p != t.data_ptr(), "kseed: ", what,
                        " shares its storage with an earlier tensor; list each tensor once");
    }
    seen.push_back(t.data_ptr());
    plan.add(dtype_of(t, what), t.data_ptr(), t.numel(), st);
  }
  if (K == 0 || plan.empty()) return;
  const c10::cuda::CUDAGuard guard(*device);
  run_apply(plan, s, c, r, uint64_t(sr_key), *device);
}

// Benchmark helper: the generate-and-sum floor of an apply over numel elements (one float per CTA).
at::Tensor noise_floor_cuda(const at::Tensor& like, const at::Tensor& seeds, const at::Tensor& coefs,
                            int64_t numel, int64_t stream) {
  TORCH_CHECK_VALUE(like.is_cuda(), "kseed (CUDA): _noise_floor needs a CUDA tensor for the device");
  TORCH_CHECK_VALUE(numel > 0, "kseed: numel must be > 0");
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor s = seeds.to(like.device(), at::kLong).contiguous();
  at::Tensor c = coefs.to(like.device(), at::kFloat).contiguous();
  at::Tensor out = at::empty({kseed::cuda::tiles_of(numel)}, like.options().dtype(at::kFloat));
  check_cuda(kseed::cuda::launch_noise_floor(out.data_ptr<float>(), numel,
                                             reinterpret_cast<const uint64_t*>(s.data_ptr<int64_t>()),
                                             c.data_ptr<float>(), s.numel(),
                                             check_stream(stream, "stream"),
                                             c10::cuda::getCurrentCUDAStream().stream()),
             "_noise_floor launch");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kseed, m) {
  m.def("_noise_floor(Tensor like, Tensor seeds, Tensor coefs, int numel, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(kseed, CUDA, m) {
  m.impl("gaussian_", &gaussian_cuda);
  m.impl("apply_seeds_", &apply_seeds_cuda);
  m.impl("apply_seeds_multi_", &apply_seeds_multi_cuda);
  m.impl("_noise_floor", &noise_floor_cuda);
}
