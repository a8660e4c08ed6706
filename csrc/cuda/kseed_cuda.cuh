// Torch-free CUDA kernels of the kseed noise spec (docs/SPEC.md): the API that the torch binding
// (kseed_cuda_ops.cpp) and the standalone compile check (CMakeLists.txt) see.
//
// All device arithmetic goes through the scalar spec core (../kseed_core.h), whose float ops are the
// _rn intrinsics; the sources are compiled with --fmad=false as well, so nothing is contracted into an
// fma and the results are bitwise those of the reference and the CPU backend.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <vector>

#include "../kseed_types.h"

namespace kseed {
namespace cuda {

using ::kseed::DType;

// One tensor of an apply launch (a row of the device-side table; 32 bytes).
struct TensorWork {
  void* data;          // contiguous float32 / bfloat16 / float16 elements
  int64_t numel;
  uint32_t stream;     // the tensor's stream id
  uint32_t reserved;
  int64_t first_tile;  // index of the tensor's first tile (CTA) within the launch
};
static_assert(sizeof(TensorWork) == 32, "TensorWork must be 32 bytes");

// Launch geometry: a CTA of kThreads threads owns one tile of kTileElems consecutive elements of one
// tensor; each thread owns kBlocksPerThread Philox blocks (4 consecutive elements each) of the tile.
// Seeds are staged in shared memory kSeedTile at a time, with their ten Philox round keys precomputed.
constexpr int kThreads = 256;
constexpr int kBlocksPerThread = 2;
constexpr int64_t kTileElems = int64_t(kThreads) * kBlocksPerThread * 4;
constexpr int kSeedTile = 256;

inline int64_t tiles_of(int64_t numel) { return (numel + kTileElems - 1) / kTileElems; }

// The launches of one apply call: its tensors grouped by dtype (one launch per group), each group's
// device table rows with their first tiles, and whether every tensor of the group is aligned for the
// kernels' vector I/O (16 bytes for float32, 8 for 16-bit types).  Host-side and torch-free: the torch
// binding and the CPU emulation of the kernels (tests/cuda_emu) both plan with it.
struct ApplyGroup {
  DType dtype = DType::F32;
  std::vector<TensorWork> works;
  int64_t tiles = 0;
  bool aligned = true;
};

class ApplyPlan {
 public:
  // Adds a tensor (numel > 0) of `dtype` at `data` with stream id `stream`.
  void add(DType dtype, void* data, int64_t numel, uint32_t stream) {
    ApplyGroup& g = by_dtype_[int(dtype)];
    g.dtype = dtype;
    g.works.push_back({data, numel, stream, 0u, g.tiles});
    g.tiles += tiles_of(numel);
    const uintptr_t align = dtype == DType::F32 ? 16 : 8;
    g.aligned = g.aligned && reinterpret_cast<uintptr_t>(data) % align == 0;
  }
  bool empty() const { return by_dtype_.empty(); }
  // The groups, float32 first, then bfloat16, then float16.
  std::vector<ApplyGroup> groups() const {
    std::vector<ApplyGroup> out;
    for (const auto& kv : by_dtype_) out.push_back(kv.second);
    return out;
  }

 private:
  std::map<int, ApplyGroup> by_dtype_;
};

// z(seed, stream, offset + j) into out[j], j < numel.
cudaError_t launch_gaussian(float* out, int64_t numel, uint64_t seed, uint32_t stream,
                            uint64_t offset, cudaStream_t cu_stream);

// The fused update on every tensor of the device table `works` (num_works rows, all of dtype `dtype`,
// first_tile ascending from 0, total_tiles tiles in all).  seeds: device uint64 [K]; coefs: device
// float32 [K] (finite); rounding 0 = nearest, 1 = stochastic; sr_key the call's stochastic-rounding
// key.  aligned: every data pointer is 16-byte aligned (float32) or 8-byte aligned (16-bit types), so
// the kernel may use vector loads and stores.  Each element is read and written once; the K-term sum
// stays in float32 registers for the whole of K (no chunking, any K).
cudaError_t launch_apply(DType dtype, const TensorWork* works, int num_works, int64_t total_tiles,
                         const uint64_t* seeds, const float* coefs, int64_t K, int rounding,
                         uint64_t sr_key, bool aligned, cudaStream_t cu_stream);

// Benchmark floor: the generate-and-sum work of launch_apply over numel elements of one stream, with no
// tensor read or written; each CTA writes one float (the sum of its accumulators) to out[tile].
cudaError_t launch_noise_floor(float* out, int64_t numel, const uint64_t* seeds, const float* coefs,
                               int64_t K, uint32_t stream, cudaStream_t cu_stream);

}  // namespace cuda
}  // namespace kseed
