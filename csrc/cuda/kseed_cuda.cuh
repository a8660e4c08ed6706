// Torch-free CUDA kernels of the kseed noise spec (docs/SPEC.md): the API that the torch binding
// (kseed_cuda_ops.cpp) and the standalone compile check (CMakeLists.txt) see.
//
// All device arithmetic goes through the scalar spec core (../kseed_core.h), whose float ops are the
// _rn intrinsics; the sources are compiled with --fmad=false as well, so nothing is contracted into an
// fma and the results are bitwise those of the reference and the CPU backend.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include "../kseed_plan.h"
#include "../kseed_types.h"

namespace kseed {
namespace cuda {

using ::kseed::DType;
using ::kseed::Noise;
using ::kseed::PlanRow;

// Launch geometry: a CTA of kThreads threads owns one tile of kTileElems consecutive elements of one
// tensor; each thread owns kBlocksPerThread Philox blocks (4 consecutive elements each) of the tile.
// Seeds are staged in shared memory kSeedTile at a time, with their ten Philox round keys precomputed.
// The Rademacher family: a tile is kRadBlocks whole Rademacher blocks (128 elements each); the CTA's
// threads compute the Philox words of kRadSeeds seeds x kRadBlocks blocks at a time (one Philox call
// per seed per 128 elements), through shared memory.
constexpr int kThreads = 256;
constexpr int kBlocksPerThread = 2;
constexpr int64_t kTileElems = int64_t(kThreads) * kBlocksPerThread * 4;
constexpr int kSeedTile = 256;
constexpr int kRadBlocks = int(kTileElems / 128);
constexpr int kRadSeeds = kThreads / kRadBlocks;
static_assert(kTileElems % 128 == 0 && kThreads % kRadBlocks == 0 && kSeedTile % kRadSeeds == 0,
              "a tile is whole Rademacher blocks, computed kRadSeeds seeds at a time");
static_assert(kTileElems == kFloorTileElems, "the floor op's output has one float per CUDA tile");

inline int64_t tiles_of(int64_t numel) { return ::kseed::tiles_of(numel, kTileElems); }

// The tensors of a launch come from the shared plan (../kseed_plan.h: ApplyPlan(kTileElems) groups them by
// dtype, one launch per group; its PlanRow is the device-side table row).

// z(seed, stream, offset + j) into out[j], j < numel.
cudaError_t launch_gaussian(float* out, int64_t numel, uint64_t seed, uint32_t stream,
                            uint64_t offset, cudaStream_t cu_stream);

// r(seed, stream, offset + j) (+-1.0f) into out[j], j < numel.
cudaError_t launch_rademacher(float* out, int64_t numel, uint64_t seed, uint32_t stream,
                              uint64_t offset, cudaStream_t cu_stream);

// The fused update on every tensor of the device table `rows` (num_rows rows of a plan group, all of dtype
// `dtype`, first_tile ascending from 0, total_tiles tiles in all): dst = round(src + acc), src == dst
// for the in-place update (otherwise the two do not overlap and src is only read).  seeds: device uint64 [K]; coefs: device
// float32 [K] (finite); rounding 0 = nearest, 1 = stochastic; sr_key the call's stochastic-rounding
// key; noise the family (kNoiseGaussian, kNoiseRademacher).  aligned: every src and dst pointer is 16-byte aligned (float32) or 8-byte aligned (16-bit types), so
// the kernel may use vector loads and stores.  Each element is read and written once; the K-term sum
// stays in float32 registers for the whole of K (no chunking, any K).
cudaError_t launch_apply(DType dtype, const PlanRow* rows, int num_rows, int64_t total_tiles,
                         const uint64_t* seeds, const float* coefs, int64_t K, int rounding,
                         uint64_t sr_key, Noise noise, bool aligned, cudaStream_t cu_stream);

// Benchmark floor: the generate-and-sum work of launch_apply (family `noise`) over numel elements of one
// stream, with no tensor read or written; each CTA writes one float (the sum of its accumulators) to
// out[tile].
cudaError_t launch_noise_floor(float* out, int64_t numel, const uint64_t* seeds, const float* coefs,
                               int64_t K, uint32_t stream, Noise noise, cudaStream_t cu_stream);

// project_seeds (docs/SPEC.md section 9): rows are the call's tensors in list order (PlanRow: src, numel,
// stream, reserved = the DType, first_tile = the index of the tensor's first block of PROJECT_BLOCK
// elements among all num_blocks blocks of the call).  A CTA takes one block and kProjSeeds seeds; its
// thread 4 s + q owns lanes 4 q .. 4 q + 3 of seed s, adds its products in ascending index from the
// block's elements staged in shared memory, and the fold is two shuffles and two adds.  The block sums
// (sums[(block - first) * K + k], float32) of at most chunk_blocks blocks at a time are then added in
// block order into the float64 totals acc[K] (device, zeroed by the caller) by a second kernel, and the
// last chunk writes out[k] = float32(acc[k]).  sums holds min(chunk_blocks, num_blocks) * K floats.
constexpr int kProjSeeds = kThreads / 4;
cudaError_t launch_project(const PlanRow* rows, int num_rows, int64_t num_blocks, const uint64_t* seeds,
                           int64_t K, Noise noise, int64_t chunk_blocks, float* sums, double* acc,
                           float* out, cudaStream_t cu_stream);

}  // namespace cuda
}  // namespace kseed
