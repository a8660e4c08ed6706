// Torch-free CUDA kernels of the kseed noise spec; see kseed_cuda.cuh for the API.
//
// apply: one CTA per tile of kTileElems consecutive elements of one tensor (the tensor found by a
// binary search of the device-side table of plan rows, ../kseed_plan.h, so one launch serves a whole
// parameter list).  Each thread
// owns kBlocksPerThread Philox blocks, i.e. 4 * kBlocksPerThread elements in float32 registers.  The
// seeds are staged kSeedTile at a time in shared memory together with their ten precomputed round
// keys and their coefficient; the K loop then costs, per seed and thread, five broadcast 16-byte
// shared loads plus the Philox rounds and the transform of each owned block.  The source is read and
// the destination written once (the same tensor for the in-place update), after the whole K loop, with 16-byte (float32) or 8-byte (16-bit types) accesses.
//
// The Rademacher family (template parameter NOISE): a tile is kRadBlocks whole Rademacher blocks.  For
// each batch of kRadSeeds staged seeds, thread t runs the one Philox call of seed t / kRadBlocks and
// block t % kRadBlocks and leaves its four words in shared memory; then every thread adds, for each
// seed of the batch in ascending order, the signed coefficient (a sign-bit flip, no multiply) to its
// eight accumulators, whose bits all sit in one word per owned block.
#include <cuda_fp16.h>

#include "../kseed_core.h"
#include "kseed_cuda.cuh"
#include "kseed_cuda_device.cuh"

// A kernel launch.  tests/cuda_emu defines KSEED_LAUNCH to run the kernels on the CPU under a host
// emulation of the CUDA execution model (a test of their indexing, staging and rounding logic on a
// machine without a GPU); nvcc builds get the plain triple-chevron launch.
#ifndef KSEED_LAUNCH
#define KSEED_LAUNCH(grid, block, cu_stream, ...) __VA_ARGS__<<<grid, block, 0, cu_stream>>>
#endif

namespace kseed {
namespace cuda {
namespace {

constexpr int kMinBlocksPerSM = 3;

// One staged seed: the 20 round-key words (k0, k1 of rounds 0..9) and the coefficient.  96 bytes.
struct __align__(16) SeedRec {
  uint32_t rk[20];
  float coef;
  uint32_t pad[3];
};

// Stage seeds [k0, k0 + cnt) into shared memory (all threads take part).
__device__ __forceinline__ void stage_seeds(SeedRec* recs, const uint64_t* __restrict__ seeds,
                                            const float* __restrict__ coefs, int64_t k0, int cnt) {
  for (int i = threadIdx.x; i < cnt; i += blockDim.x) {
    uint32_t rk[20];
    round_keys(seeds[k0 + i], rk);
#pragma unroll
    for (int j = 0; j < 20; ++j) recs[i].rk[j] = rk[j];
    recs[i].coef = coefs[k0 + i];
  }
}

// The Philox blocks this thread owns in the tile whose first block is blk0 (strided by kThreads, so that
// a warp's accesses are contiguous), and their accumulators, zeroed.
__device__ __forceinline__ void own_blocks(int64_t blk0, uint64_t (&blk)[kBlocksPerThread],
                                           float (&acc)[kBlocksPerThread][4]) {
#pragma unroll
  for (int v = 0; v < kBlocksPerThread; ++v) {
    blk[v] = uint64_t(blk0 + threadIdx.x + int64_t(v) * kThreads);
#pragma unroll
    for (int l = 0; l < 4; ++l) acc[v][l] = 0.0f;
  }
}

// The ten round keys of a staged seed (five broadcast 16-byte shared loads).
__device__ __forceinline__ void load_round_keys(const SeedRec& rec, uint32_t (&rk)[20]) {
  const uint4* src = reinterpret_cast<const uint4*>(rec.rk);
#pragma unroll
  for (int q = 0; q < 5; ++q) {
    const uint4 w = src[q];
    rk[4 * q] = w.x;
    rk[4 * q + 1] = w.y;
    rk[4 * q + 2] = w.z;
    rk[4 * q + 3] = w.w;
  }
}

// acc[v][lane] += c_k * z(s_k, stream, 4 * blk[v] + lane) for all K seeds, ascending k.
__device__ __forceinline__ void accumulate(float (&acc)[kBlocksPerThread][4],
                                           const uint64_t (&blk)[kBlocksPerThread], uint32_t stream,
                                           const uint64_t* __restrict__ seeds,
                                           const float* __restrict__ coefs, int64_t K,
                                           SeedRec* recs) {
  // Round-0 products of each owned block (key-independent, so outside the K loop).
  const uint64_t p1 = uint64_t(spec::PHILOX_M1) * stream;
  uint32_t hi0[kBlocksPerThread], lo0[kBlocksPerThread];
#pragma unroll
  for (int v = 0; v < kBlocksPerThread; ++v) {
    const uint64_t p0 = uint64_t(spec::PHILOX_M0) * uint32_t(blk[v]);
    hi0[v] = uint32_t(p0 >> 32);
    lo0[v] = uint32_t(p0);
  }
  for (int64_t kb = 0; kb < K; kb += kSeedTile) {
    const int cnt = int(K - kb < kSeedTile ? K - kb : kSeedTile);
    __syncthreads();  // the previous tile has been consumed
    stage_seeds(recs, seeds, coefs, kb, cnt);
    __syncthreads();
#pragma unroll 1
    for (int i = 0; i < cnt; ++i) {
      uint32_t rk[20];
      load_round_keys(recs[i], rk);
      const float c = recs[i].coef;
#pragma unroll
      for (int v = 0; v < kBlocksPerThread; ++v) {
        const Block x = philox_rk(hi0[v], lo0[v], uint32_t(p1 >> 32), uint32_t(p1),
                                  uint32_t(blk[v] >> 32), spec::COUNTER_GAUSSIAN, rk);
        float z[4];
        normals4(x, z);
#pragma unroll
        for (int l = 0; l < 4; ++l) acc[v][l] = fadd(acc[v][l], fmul(c, z[l]));
      }
    }
  }
}

// acc[v][lane] += (+-c_k) = c_k * r(s_k, stream, 4 * blk[v] + lane) for all K seeds, ascending k (spec
// section 8).  Element 4 b + l (b = blk[v]) is bit 4 (b & 7) + l of word (b & 31) >> 3 of Rademacher
// block b >> 5; the tile's blocks are rb0 .. rb0 + kRadBlocks - 1 (blk[0] - threadIdx.x is the tile's
// first Philox block, a multiple of 32).
__device__ __forceinline__ void accumulate_signs(float (&acc)[kBlocksPerThread][4],
                                                 const uint64_t (&blk)[kBlocksPerThread],
                                                 uint32_t stream, const uint64_t* __restrict__ seeds,
                                                 const float* __restrict__ coefs, int64_t K,
                                                 SeedRec* recs) {
  __shared__ uint32_t words[kRadSeeds][kRadBlocks][4];
  const uint64_t rb0 = (blk[0] - threadIdx.x) >> 5;
  // This thread's Philox job in each batch: seed job_seed of the batch, block rb0 + job_blk; the
  // round-0 products depend on the counter only.
  const int job_seed = int(threadIdx.x) / kRadBlocks;
  const int job_blk = int(threadIdx.x) % kRadBlocks;
  const uint64_t rb = rb0 + uint64_t(job_blk);
  const uint64_t p0 = uint64_t(spec::PHILOX_M0) * uint32_t(rb);
  const uint64_t p1 = uint64_t(spec::PHILOX_M1) * stream;
  // Where this thread's elements sit: block index within the tile, word, first bit.
  int wrel[kBlocksPerThread];
  uint32_t wsel[kBlocksPerThread], shift[kBlocksPerThread];
#pragma unroll
  for (int v = 0; v < kBlocksPerThread; ++v) {
    wrel[v] = int((blk[v] >> 5) - rb0);
    wsel[v] = uint32_t(blk[v] & 31u) >> 3;
    shift[v] = 4u * uint32_t(blk[v] & 7u);
  }
  for (int64_t kb = 0; kb < K; kb += kSeedTile) {
    const int cnt = int(K - kb < kSeedTile ? K - kb : kSeedTile);
    __syncthreads();  // the previous tile has been consumed
    stage_seeds(recs, seeds, coefs, kb, cnt);
    __syncthreads();
#pragma unroll 1
    for (int i0 = 0; i0 < cnt; i0 += kRadSeeds) {
      const int nb = cnt - i0 < kRadSeeds ? cnt - i0 : kRadSeeds;
      if (job_seed < nb) {
        uint32_t rk[20];
        load_round_keys(recs[i0 + job_seed], rk);
        const Block x = philox_rk(uint32_t(p0 >> 32), uint32_t(p0), uint32_t(p1 >> 32), uint32_t(p1),
                                  uint32_t(rb >> 32), spec::COUNTER_RADEMACHER, rk);
        uint32_t* dst = words[job_seed][job_blk];
        dst[0] = x.x0;
        dst[1] = x.x1;
        dst[2] = x.x2;
        dst[3] = x.x3;
      }
      __syncthreads();
#pragma unroll 1
      for (int j = 0; j < nb; ++j) {
        const uint32_t cb = float_to_bits(recs[i0 + j].coef);
#pragma unroll
        for (int v = 0; v < kBlocksPerThread; ++v) {
          const uint32_t w = words[j][wrel[v]][wsel[v]] >> shift[v];  // one 4-byte shared load
#pragma unroll
          for (int l = 0; l < 4; ++l) acc[v][l] = fadd(acc[v][l], signed_coef(cb, (w >> l) & 1u));
        }
      }
      __syncthreads();  // the words are consumed before the next batch overwrites them
    }
  }
}

// The K-term sums of the thread's blocks for the NOISE family.
template <int NOISE>
__device__ __forceinline__ void accumulate_noise(float (&acc)[kBlocksPerThread][4],
                                                 const uint64_t (&blk)[kBlocksPerThread],
                                                 uint32_t stream, const uint64_t* __restrict__ seeds,
                                                 const float* __restrict__ coefs, int64_t K,
                                                 SeedRec* recs) {
  if constexpr (NOISE == kNoiseRademacher) {
    accumulate_signs(acc, blk, stream, seeds, coefs, K, recs);
  } else {
    accumulate(acc, blk, stream, seeds, coefs, K, recs);
  }
}

template <DType DT>
struct Vec4;
template <>
struct Vec4<DType::F32> {
  using V = float4;
};
template <>
struct Vec4<DType::BF16> {
  using V = uint2;
};
template <>
struct Vec4<DType::F16> {
  using V = uint2;
};

template <typename T, typename V>
__device__ __forceinline__ void unpack4(const V& v, T (&x)[4]) {
  static_assert(sizeof(V) == 4 * sizeof(T), "vector size");
  memcpy(x, &v, sizeof v);
}
template <typename T, typename V>
__device__ __forceinline__ V pack4(const T (&x)[4]) {
  V v;
  memcpy(&v, x, sizeof v);
  return v;
}

// ------------------------------------------------------------------------------------ kernels
template <DType DT, int ROUND, bool ALIGNED, int NOISE>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    apply_kernel(const PlanRow* __restrict__ rows, int num_rows,
                 const uint64_t* __restrict__ seeds, const float* __restrict__ coefs, int64_t K,
                 uint64_t sr_key) {
  using T = typename Elem<DT>::T;
  __shared__ SeedRec recs[kSeedTile];
  __shared__ PlanRow w_sh;
  const int64_t tile = blockIdx.x;
  if (threadIdx.x == 0) w_sh = rows[find_row(rows, num_rows, tile)];
  __syncthreads();
  const PlanRow w = w_sh;
  const int64_t blk0 = (tile - w.first_tile) * (int64_t(kThreads) * kBlocksPerThread);

  uint64_t blk[kBlocksPerThread];
  float acc[kBlocksPerThread][4];
  own_blocks(blk0, blk, acc);
  accumulate_noise<NOISE>(acc, blk, w.stream, seeds, coefs, K, recs);

  // src == dst for the in-place update: each element is read before it is written, by the same thread.
  const T* src = static_cast<const T*>(w.src);
  T* dst = static_cast<T*>(w.dst);
  const Key srk = key_of(sr_key);
#pragma unroll
  for (int v = 0; v < kBlocksPerThread; ++v) {
    const int64_t e0 = int64_t(blk[v]) * 4;
    if (e0 >= w.numel) continue;
    uint32_t rb[4] = {0u, 0u, 0u, 0u};
    if (ROUND == 1 && DT != DType::F32) {
      const Block r = philox_block(srk, blk[v], w.stream, spec::COUNTER_STOCHASTIC_ROUNDING);
      rb[0] = r.x0;
      rb[1] = r.x1;
      rb[2] = r.x2;
      rb[3] = r.x3;
    }
    if (ALIGNED && e0 + 4 <= w.numel) {
      using V = typename Vec4<DT>::V;
      T x[4];
      unpack4(*reinterpret_cast<const V*>(src + e0), x);
#pragma unroll
      for (int l = 0; l < 4; ++l) x[l] = finish<DT, ROUND>(x[l], acc[v][l], rb[l]);
      *reinterpret_cast<V*>(dst + e0) = pack4<T, V>(x);
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        if (e0 + l < w.numel) dst[e0 + l] = finish<DT, ROUND>(src[e0 + l], acc[v][l], rb[l]);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) gaussian_kernel(float* __restrict__ out, int64_t numel,
                                                            uint64_t seed, uint32_t stream,
                                                            uint64_t offset) {
  const uint64_t b = (offset >> 2) + uint64_t(blockIdx.x) * kThreads + threadIdx.x;
  const uint64_t end = offset + uint64_t(numel);
  if (4 * b >= end) return;
  float z[4];
  normals4(philox_block(key_of(seed), b, stream, spec::COUNTER_GAUSSIAN), z);
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    const uint64_t i = 4 * b + l;
    if (i >= offset && i < end) out[i - offset] = z[l];
  }
}

// Rademacher blocks (128 elements, spec section 8) per CTA of rademacher_kernel: 32 * kThreads elements.
constexpr int kRadGenBlocks = kThreads / 4;

// One CTA per kRadGenBlocks consecutive Rademacher blocks of the output range, from block
// (offset >> 7) + blockIdx.x * kRadGenBlocks.  The first kRadGenBlocks threads each run one Philox call
// and leave its four words in shared memory; then the CTA writes its elements interleaved, element p of
// the CTA (bit p & 31 of word p >> 5) by thread p % kThreads, so that each warp store is 32 consecutive
// floats (one 128-byte line) and the 32 lanes read one shared word (a broadcast).
__global__ void __launch_bounds__(kThreads) rademacher_kernel(float* __restrict__ out,
                                                              int64_t numel, uint64_t seed,
                                                              uint32_t stream, uint64_t offset) {
  __shared__ uint32_t words[4 * kRadGenBlocks];
  const uint64_t b0 = (offset >> 7) + uint64_t(blockIdx.x) * kRadGenBlocks;
  const uint64_t e0 = 128 * b0;  // the CTA's first element
  const uint64_t end = offset + uint64_t(numel);
  if (threadIdx.x < kRadGenBlocks && e0 + 128 * uint64_t(threadIdx.x) < end) {
    const Block x = philox_block(key_of(seed), b0 + threadIdx.x, stream, spec::COUNTER_RADEMACHER);
#pragma unroll
    for (uint32_t w = 0; w < 4; ++w) words[4 * threadIdx.x + w] = block_word(x, w);
  }
  __syncthreads();
#pragma unroll 4
  for (int j = 0; j < 32; ++j) {
    const uint32_t p = uint32_t(j) * kThreads + threadIdx.x;
    const uint64_t i = e0 + p;
    if (i >= offset && i < end) {
      out[i - offset] = signed_coef(0x3F800000u, (words[p >> 5] >> (p & 31u)) & 1u);  // +-1.0f
    }
  }
}

template <int NOISE>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    noise_floor_kernel(float* __restrict__ out, const uint64_t* __restrict__ seeds,
                       const float* __restrict__ coefs, int64_t K, uint32_t stream) {
  __shared__ SeedRec recs[kSeedTile];
  __shared__ float warp_sums[kThreads / 32];
  const int64_t blk0 = int64_t(blockIdx.x) * (int64_t(kThreads) * kBlocksPerThread);
  uint64_t blk[kBlocksPerThread];
  float acc[kBlocksPerThread][4];
  own_blocks(blk0, blk, acc);
  accumulate_noise<NOISE>(acc, blk, stream, seeds, coefs, K, recs);
  float s = 0.0f;
#pragma unroll
  for (int v = 0; v < kBlocksPerThread; ++v)
#pragma unroll
    for (int l = 0; l < 4; ++l) s += acc[v][l];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.0f;
    for (int i = 0; i < kThreads / 32; ++i) t += warp_sums[i];
    out[blockIdx.x] = t;
  }
}

template <DType DT, int ROUND, int NOISE>
cudaError_t launch_typed(const PlanRow* rows, int num_rows, int64_t total_tiles,
                         const uint64_t* seeds, const float* coefs, int64_t K, uint64_t sr_key,
                         bool aligned, cudaStream_t s) {
  if (aligned) {
    KSEED_LAUNCH(dim3(unsigned(total_tiles)), kThreads, s, apply_kernel<DT, ROUND, true, NOISE>)
    (rows, num_rows, seeds, coefs, K, sr_key);
  } else {
    KSEED_LAUNCH(dim3(unsigned(total_tiles)), kThreads, s, apply_kernel<DT, ROUND, false, NOISE>)
    (rows, num_rows, seeds, coefs, K, sr_key);
  }
  return cudaGetLastError();
}

// launch_typed with the rounding as a template argument (1: stochastic, else nearest).
template <DType DT, int NOISE>
cudaError_t launch_rounded(int rounding, const PlanRow* rows, int num_rows, int64_t total_tiles,
                           const uint64_t* seeds, const float* coefs, int64_t K, uint64_t sr_key,
                           bool aligned, cudaStream_t cu_stream) {
  return rounding == 1
             ? launch_typed<DT, 1, NOISE>(rows, num_rows, total_tiles, seeds, coefs, K, sr_key, aligned,
                                          cu_stream)
             : launch_typed<DT, 0, NOISE>(rows, num_rows, total_tiles, seeds, coefs, K, sr_key, aligned,
                                          cu_stream);
}

template <int NOISE>
cudaError_t launch_noise(DType dtype, const PlanRow* rows, int num_rows, int64_t total_tiles,
                         const uint64_t* seeds, const float* coefs, int64_t K, int rounding,
                         uint64_t sr_key, bool aligned, cudaStream_t cu_stream) {
  switch (dtype) {
    case DType::F32:  // nothing to narrow: stochastic rounding is nearest
      return launch_typed<DType::F32, 0, NOISE>(rows, num_rows, total_tiles, seeds, coefs, K,
                                                sr_key, aligned, cu_stream);
    case DType::BF16:
      return launch_rounded<DType::BF16, NOISE>(rounding, rows, num_rows, total_tiles, seeds, coefs, K,
                                                sr_key, aligned, cu_stream);
    case DType::F16:
      return launch_rounded<DType::F16, NOISE>(rounding, rows, num_rows, total_tiles, seeds, coefs, K,
                                               sr_key, aligned, cu_stream);
  }
  return cudaErrorInvalidValue;
}


// One launch of a noise generator whose CTAs each own kGroupsPerCta groups of 2^kShift consecutive
// elements (from a multiple of 2^kShift): the grid covers the groups of [offset, offset + numel).
template <int kShift, int kGroupsPerCta>
cudaError_t launch_noise(void (*kernel)(float*, int64_t, uint64_t, uint32_t, uint64_t), float* out,
                         int64_t numel, uint64_t seed, uint32_t stream, uint64_t offset,
                         cudaStream_t cu_stream) {
  if (numel <= 0) return cudaSuccess;
  const uint64_t first = offset >> kShift;
  const uint64_t last = (offset + uint64_t(numel) + (1u << kShift) - 1) >> kShift;
  const uint64_t grid = (last - first + kGroupsPerCta - 1) / kGroupsPerCta;
  if (grid > 0x7FFFFFFFull) return cudaErrorInvalidValue;
  KSEED_LAUNCH(dim3(unsigned(grid)), kThreads, cu_stream, kernel)
  (out, numel, seed, stream, offset);
  return cudaGetLastError();
}
// ------------------------------------------------------------------------------ project (spec 9)
// The block sums of blocks first + blockIdx.x / seed_tiles, seeds (blockIdx.x % seed_tiles) * kProjSeeds
// + threadIdx.x / 4 (spec 9.1 steps 1-3); see launch_project.
template <int NOISE>
__global__ void __launch_bounds__(kThreads)
    project_kernel(const PlanRow* __restrict__ rows, int num_rows, int64_t first, int seed_tiles,
                   const uint64_t* __restrict__ seeds, int64_t K, float* __restrict__ sums) {
  constexpr int64_t B = spec::PROJECT_BLOCK;
  __shared__ float xs[B];
  __shared__ PlanRow w_sh;
  const int64_t local = int64_t(blockIdx.x) / seed_tiles;
  const int64_t g = first + local;  // the block among the call's blocks
  if (threadIdx.x == 0) w_sh = rows[find_row(rows, num_rows, g)];
  __syncthreads();
  const PlanRow w = w_sh;
  const int64_t b = g - w.first_tile;  // the block within its tensor
  const int64_t e0 = b * B;
  for (int j = threadIdx.x; j < B; j += kThreads) {  // stage the block as float32, zero past the end
    const int64_t i = e0 + j;
    float v = 0.0f;
    if (i < w.numel) {
      switch (DType(w.reserved)) {
        case DType::F32: v = static_cast<const float*>(w.src)[i]; break;
        case DType::BF16: v = Elem<DType::BF16>::to_f32(static_cast<const uint16_t*>(w.src)[i]); break;
        case DType::F16: v = Elem<DType::F16>::to_f32(static_cast<const uint16_t*>(w.src)[i]); break;
      }
    }
    xs[j] = v;
  }
  __syncthreads();
  const int64_t k = int64_t(blockIdx.x % seed_tiles) * kProjSeeds + threadIdx.x / 4;
  const uint32_t q = threadIdx.x & 3u;
  const Key key = key_of(seeds[k < K ? k : 0]);
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (k >= K) {
    // past the last seed (K not a multiple of kProjSeeds): no work, only the shuffles below
  } else if (NOISE == kNoiseRademacher) {
#pragma unroll 1
    for (int rb = 0; rb < int(B / 128); ++rb) {  // one Philox call serves 8 rows of 16 elements
      const Block x = philox_block(key, uint64_t(b) * (B / 128) + uint64_t(rb), w.stream,
                                   spec::COUNTER_RADEMACHER);
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const uint32_t word = block_word(x, uint32_t(jj >> 1)) >> (16 * (jj & 1) + 4 * q);
        const float* xr = xs + 128 * rb + 16 * jj + 4 * q;
#pragma unroll
        for (int l = 0; l < 4; ++l) acc[l] = fadd(acc[l], signed_coef(float_to_bits(xr[l]), (word >> l) & 1u));
      }
    }
  } else {
#pragma unroll 1
    for (int j = 0; j < int(B / 16); ++j) {  // row j: Philox block 4 j + q gives lanes 4 q .. 4 q + 3
      float z[4];
      normals4(philox_block(key, uint64_t(b) * (B / 4) + uint64_t(4 * j) + q, w.stream, spec::COUNTER_GAUSSIAN), z);
      const float* xr = xs + 16 * j + 4 * q;
#pragma unroll
      for (int l = 0; l < 4; ++l) acc[l] = fadd(acc[l], fmul(xr[l], z[l]));
    }
  }
  // The fold (spec 9.1 step 3): h = 8 pairs quad q with q ^ 2, h = 4 with q ^ 1 (every thread of the
  // block takes part in the shuffles), then h = 2, 1 in the thread.
  float t[4];
#pragma unroll
  for (int l = 0; l < 4; ++l) t[l] = fadd(acc[l], __shfl_xor_sync(0xFFFFFFFFu, acc[l], 2));
#pragma unroll
  for (int l = 0; l < 4; ++l) t[l] = fadd(t[l], __shfl_xor_sync(0xFFFFFFFFu, t[l], 1));
  const float s = fadd(fadd(t[0], t[2]), fadd(t[1], t[3]));
  if (q == 0 && k < K) sums[local * K + k] = s;
}

// Spec 9.1 step 4 for seed k = blockIdx.x * kThreads + threadIdx.x: acc[k] plus the block sums of nblocks
// blocks in order, in float64; out (if not null) gets float32(acc[k]).
__global__ void __launch_bounds__(kThreads)
    project_sum_kernel(const float* __restrict__ sums, int64_t nblocks, int64_t K, double* __restrict__ acc,
                       float* __restrict__ out) {
  const int64_t k = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (k >= K) return;
  double a = acc[k];
  for (int64_t b = 0; b < nblocks; ++b) a = a + double(sums[b * K + k]);  // one rounded add (no fma)
  acc[k] = a;
  if (out != nullptr) out[k] = float(a);  // round to nearest even
}
}  // namespace

cudaError_t launch_project(const PlanRow* rows, int num_rows, int64_t num_blocks, const uint64_t* seeds,
                           int64_t K, Noise noise, int64_t chunk_blocks, float* sums, double* acc,
                           float* out, cudaStream_t cu_stream) {
  if (num_blocks <= 0 || K <= 0 || num_rows <= 0) return cudaSuccess;
  const int64_t seed_tiles = (K + kProjSeeds - 1) / kProjSeeds;
  const int64_t sum_grid = (K + kThreads - 1) / kThreads;
  if (chunk_blocks < 1 || seed_tiles > 0x7FFFFFFFll || sum_grid > 0x7FFFFFFFll) return cudaErrorInvalidValue;
  for (int64_t c0 = 0; c0 < num_blocks; c0 += chunk_blocks) {
    const int64_t nb = num_blocks - c0 < chunk_blocks ? num_blocks - c0 : chunk_blocks;
    if (nb * seed_tiles > 0x7FFFFFFFll) return cudaErrorInvalidValue;
    if (noise == kNoiseRademacher) {
      KSEED_LAUNCH(dim3(unsigned(nb * seed_tiles)), kThreads, cu_stream, project_kernel<kNoiseRademacher>)
      (rows, num_rows, c0, int(seed_tiles), seeds, K, sums);
    } else {
      KSEED_LAUNCH(dim3(unsigned(nb * seed_tiles)), kThreads, cu_stream, project_kernel<kNoiseGaussian>)
      (rows, num_rows, c0, int(seed_tiles), seeds, K, sums);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    KSEED_LAUNCH(dim3(unsigned(sum_grid)), kThreads, cu_stream, project_sum_kernel)
    (sums, nb, K, acc, c0 + nb >= num_blocks ? out : nullptr);
  }
  return cudaGetLastError();
}

cudaError_t launch_gaussian(float* out, int64_t numel, uint64_t seed, uint32_t stream,
                            uint64_t offset, cudaStream_t cu_stream) {
  return launch_noise<2, kThreads>(gaussian_kernel, out, numel, seed, stream, offset,
                                  cu_stream);  // a Philox block (4 elements) a thread
}

cudaError_t launch_rademacher(float* out, int64_t numel, uint64_t seed, uint32_t stream,
                              uint64_t offset, cudaStream_t cu_stream) {
  return launch_noise<7, kRadGenBlocks>(rademacher_kernel, out, numel, seed, stream, offset,
                                        cu_stream);  // kRadGenBlocks Rademacher blocks a CTA
}

cudaError_t launch_apply(DType dtype, const PlanRow* rows, int num_rows, int64_t total_tiles,
                         const uint64_t* seeds, const float* coefs, int64_t K, int rounding,
                         uint64_t sr_key, Noise noise, bool aligned, cudaStream_t cu_stream) {
  if (total_tiles <= 0 || K <= 0 || num_rows <= 0) return cudaSuccess;
  if (total_tiles > 0x7FFFFFFFll) return cudaErrorInvalidValue;
  switch (noise) {
    case kNoiseGaussian:
      return launch_noise<kNoiseGaussian>(dtype, rows, num_rows, total_tiles, seeds, coefs, K,
                                          rounding, sr_key, aligned, cu_stream);
    case kNoiseRademacher:
      return launch_noise<kNoiseRademacher>(dtype, rows, num_rows, total_tiles, seeds, coefs, K,
                                            rounding, sr_key, aligned, cu_stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_noise_floor(float* out, int64_t numel, const uint64_t* seeds, const float* coefs,
                               int64_t K, uint32_t stream, Noise noise, cudaStream_t cu_stream) {
  const int64_t tiles = tiles_of(numel);
  if (tiles <= 0 || K <= 0) return cudaSuccess;
  if (tiles > 0x7FFFFFFFll) return cudaErrorInvalidValue;
  switch (noise) {
    case kNoiseGaussian:
      KSEED_LAUNCH(dim3(unsigned(tiles)), kThreads, cu_stream, noise_floor_kernel<kNoiseGaussian>)
      (out, seeds, coefs, K, stream);
      return cudaGetLastError();
    case kNoiseRademacher:
      KSEED_LAUNCH(dim3(unsigned(tiles)), kThreads, cu_stream, noise_floor_kernel<kNoiseRademacher>)
      (out, seeds, coefs, K, stream);
      return cudaGetLastError();
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kseed
