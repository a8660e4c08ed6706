// CUDA implementations of the torch.ops.kseed operators (schemas: csrc/registration.cpp).  The kernels
// themselves are torch-free (kseed_cuda_kernels.cu); this file checks the arguments and builds the call's
// plan (../op_checks.h, ../kseed_plan.h, shared with the CPU binding), packs the per-call data (the plan
// rows, seeds, coefficients) into one pinned host buffer, copies it to the device in one asynchronous
// copy on the current stream and launches one apply per dtype group.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "../op_checks.h"
#include "kseed_cuda.cuh"

namespace {

using kseed::PlanGroup;
using kseed::PlanRow;


constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "kseed (CUDA): ", what, " failed: ", cudaGetErrorString(err));
}

// Packs [rows of all groups][seeds][coefs] into one pinned buffer, copies it to `device` on the
// current stream and launches one apply per group.
void run_plan(const kseed::checks::ApplyCall& call) {
  const kseed::checks::SeedsCoefs& sc = call.sc;
  const at::Device& device = *call.device;
  const int64_t K = sc.K;
  const std::vector<PlanGroup> groups = call.plan.groups();
  size_t table_bytes = 0;
  for (const PlanGroup& g : groups) table_bytes += g.rows.size() * sizeof(PlanRow);
  const size_t seeds_at = table_bytes;               // multiple of 8
  const size_t coefs_at = seeds_at + size_t(K) * 8;  // multiple of 8
  const size_t total = coefs_at + size_t(K) * 4;
  at::Tensor host = at::empty({int64_t(total)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.data_ptr<uint8_t>();
  size_t at_ = 0;
  for (const PlanGroup& g : groups) {
    std::memcpy(h + at_, g.rows.data(), g.rows.size() * sizeof(PlanRow));
    at_ += g.rows.size() * sizeof(PlanRow);
  }
  std::memcpy(h + seeds_at, sc.s(), size_t(K) * 8);
  std::memcpy(h + coefs_at, sc.c(), size_t(K) * 4);
  // One asynchronous copy on the current stream; the caching host allocator keeps `host` alive until
  // the copy has completed.
  const at::Tensor dev = host.to(device, /*non_blocking=*/true);
  const uint8_t* d = dev.data_ptr<uint8_t>();
  const auto* d_seeds = reinterpret_cast<const uint64_t*>(d + seeds_at);
  const auto* d_coefs = reinterpret_cast<const float*>(d + coefs_at);
  cudaStream_t cs = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  size_t off = 0;
  for (const PlanGroup& g : groups) {
    const auto* table = reinterpret_cast<const PlanRow*>(d + off);
    check_cuda(kseed::cuda::launch_apply(g.dtype, table, int(g.rows.size()), g.tiles, d_seeds,
                                         d_coefs, K, call.rounding, call.sr_key, call.noise,
                                         g.aligned, cs),
               "apply launch");
    off += g.rows.size() * sizeof(PlanRow);
  }
  // `dev` is freed when it goes out of scope: the caching allocator reuses the block only for work
  // queued later on the same stream, i.e. after these kernels.
}

void run_apply(at::TensorList bases, at::TensorList outs, at::IntArrayRef streams,
               const at::Tensor& seeds, const at::Tensor& coefs, int64_t rounding, int64_t sr_key,
               int64_t noise) {
  const kseed::checks::ApplyCall call = kseed::checks::read_apply(
      bases, outs, streams, seeds, coefs, rounding, sr_key, noise, kCUDA, kseed::cuda::kTileElems);
  if (call.empty()) return;
  const c10::cuda::CUDAGuard guard(*call.device);
  run_plan(call);
}

// ---------------------------------------------------------------------------------------- ops
void gaussian_cuda(at::Tensor& out, int64_t seed, int64_t stream, int64_t offset) {
  const uint32_t st = kseed::checks::check_noise_out(out, stream, offset, kCUDA);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  check_cuda(kseed::cuda::launch_gaussian(out.data_ptr<float>(), out.numel(), uint64_t(seed), st,
                                          uint64_t(offset),
                                          c10::cuda::getCurrentCUDAStream().stream()),
             "gaussian_ launch");
}

void rademacher_cuda(at::Tensor& out, int64_t seed, int64_t stream, int64_t offset) {
  const uint32_t st = kseed::checks::check_noise_out(out, stream, offset, kCUDA);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  check_cuda(kseed::cuda::launch_rademacher(out.data_ptr<float>(), out.numel(), uint64_t(seed), st,
                                            uint64_t(offset),
                                            c10::cuda::getCurrentCUDAStream().stream()),
             "rademacher_ launch");
}

// Benchmark helper: the generate-and-sum floor of an apply over numel elements (one float per CTA).
at::Tensor noise_floor_cuda(const at::Tensor& like, const at::Tensor& seeds, const at::Tensor& coefs,
                            int64_t numel, int64_t stream, int64_t noise) {
  const kseed::checks::FloorArgs args =
      kseed::checks::read_floor(like, seeds, coefs, numel, stream, noise, at::kCUDA);
  const kseed::Noise nz = args.noise;
  const uint32_t st = args.stream;
  const kseed::checks::SeedsCoefs& sc = args.sc;
  const c10::cuda::CUDAGuard guard(like.device());
  const at::Tensor s = sc.seeds.to(like.device()), c = sc.coefs.to(like.device());
  at::Tensor out = at::zeros({kseed::cuda::tiles_of(numel)}, like.options().dtype(at::kFloat));
  check_cuda(kseed::cuda::launch_noise_floor(out.data_ptr<float>(), numel,
                                             reinterpret_cast<const uint64_t*>(s.data_ptr<int64_t>()),
                                             c.data_ptr<float>(), sc.K, st, nz,
                                             c10::cuda::getCurrentCUDAStream().stream()),
             "_noise_floor launch");
  return out;
}

// project_seeds (docs/SPEC.md section 9): the rows (list order) and seeds in one pinned buffer, one
// asynchronous copy, then launch_project over chunks of at most 2^24 / K blocks of block sums.
at::Tensor project_seeds_cuda(at::TensorList tensors, at::IntArrayRef streams, const at::Tensor& seeds,
                              int64_t noise) {
  const kseed::checks::ProjectCall call = kseed::checks::read_project(
      tensors, streams, seeds, noise, kCUDA, kseed::spec::PROJECT_BLOCK);
  const int64_t K = call.sc.K;
  if (call.empty()) {
    const at::Device dev = call.device.value_or(at::Device(at::kCPU));
    return at::zeros({K}, at::TensorOptions().dtype(at::kFloat).device(dev));
  }
  const at::Device& device = *call.device;
  const c10::cuda::CUDAGuard guard(device);
  const size_t rows_bytes = call.rows.size() * sizeof(PlanRow);  // a multiple of 8
  at::Tensor host = at::empty({int64_t(rows_bytes + size_t(K) * 8)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr<uint8_t>(), call.rows.data(), rows_bytes);
  std::memcpy(host.data_ptr<uint8_t>() + rows_bytes, call.sc.s(), size_t(K) * 8);
  const at::Tensor dev = host.to(device, /*non_blocking=*/true);
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 24) / K);
  const at::TensorOptions on = at::TensorOptions().device(device);
  at::Tensor sums = at::empty({std::min(chunk, call.blocks) * K}, on.dtype(at::kFloat));
  at::Tensor acc = at::zeros({K}, on.dtype(at::kDouble));
  at::Tensor out = at::empty({K}, on.dtype(at::kFloat));
  const uint8_t* d = dev.data_ptr<uint8_t>();
  check_cuda(kseed::cuda::launch_project(reinterpret_cast<const PlanRow*>(d), int(call.rows.size()),
                                         call.blocks, reinterpret_cast<const uint64_t*>(d + rows_bytes), K,
                                         call.noise, chunk, sums.data_ptr<float>(), acc.data_ptr<double>(),
                                         out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
             "project_seeds launch");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kseed, CUDA, m) {
  m.impl("gaussian_", &gaussian_cuda);
  m.impl("rademacher_", &rademacher_cuda);
  kseed::checks::impl_apply_ops<run_apply>(m);
  m.impl("_noise_floor", &noise_floor_cuda);
  m.impl("project_seeds", &project_seeds_cuda);
}
