// The one dispatch table of the CPU kernels (internal to csrc/cpu).
//
// kernels-inl.h is the kernel source, written once against a small vector type; each ISA translation
// unit (kseed_cpu_scalar.cpp, kseed_cpu_avx2.cpp, kseed_cpu_avx512.cpp, kseed_cpu_neon.cpp) compiles it
// over its own vector header, under its own target attribute and in its own namespace, and hands back
// a Kernels table of function pointers (or nullptr where the build has no such path).  kseed_cpu.cpp
// indexes the tables by Isa; nothing else names a path.
//
// A new kernel family is one more function in kernels-inl.h and one more member here; no ISA file
// changes unless it needs a vector primitive that the vector headers lack.
#pragma once
#include <cstdint>

#include "kseed_cpu.h"

namespace kseed {
namespace cpu {

struct Kernels {
  // Whether this CPU can run the path (the build has it: the table exists).
  bool (*supported)();
  // The building blocks of kseed_cpu.h, same contracts (nblocks a multiple of kGroupBlocks).
  void (*accumulate_normals)(Key key, uint32_t stream, uint64_t first_block, int64_t nblocks, float c,
                             float* acc);
  void (*sum_signs)(const uint64_t* seeds, const float* coefs, int64_t K, uint32_t stream, uint64_t first_word,
                    int64_t nwords, float* acc);
  void (*normals)(Key key, uint32_t stream, uint64_t first_block, int64_t nblocks, float* out);
  void (*philox_words)(Key key, uint32_t stream, uint32_t word3, uint64_t first_block, int64_t nblocks,
                       uint32_t* out);
  void (*finish)(DType dtype, const void* src, void* dst, const float* acc, const uint32_t* r,
                 int64_t n, int rounding);
  // project_seeds (spec section 9): the block sum of one Gaussian seed, of a group of Rademacher seeds,
  // and the float32 widening of a block's elements.
  float (*project_normals)(Key key, uint32_t stream, uint64_t first_block, int64_t nblocks, const float* x);
  void (*project_signs)(const uint64_t* seeds, int64_t K, uint32_t stream, uint64_t first_word, int64_t nwords,
                        const float* x, float* out);
  void (*widen)(DType dtype, const void* src, float* dst, int64_t n);
};

// One per ISA translation unit; nullptr where this build (compiler, architecture) lacks the path.
const Kernels* scalar_kernels();
const Kernels* avx2_kernels();
const Kernels* avx512_kernels();
const Kernels* neon_kernels();

}  // namespace cpu
}  // namespace kseed

// Compile a region of an ISA translation unit for a target without -m flags (so nothing outside the
// region can use the ISA before the run-time check): the functions defined between KSEED_TARGET_BEGIN
// and KSEED_TARGET_END carry the target attribute.  Include every header (standard ones, intrinsics,
// kseed_core.h) before the region, so no shared inline function is compiled for the target.
#define KSEED_PRAGMA(tokens) _Pragma(#tokens)
#if defined(__clang__)
#define KSEED_TARGET_BEGIN(features) \
  KSEED_PRAGMA(clang attribute push(__attribute__((target(features))), apply_to = function))
#define KSEED_TARGET_END KSEED_PRAGMA(clang attribute pop)
#elif defined(__GNUC__)
#define KSEED_TARGET_BEGIN(features) KSEED_PRAGMA(GCC push_options) KSEED_PRAGMA(GCC target(features))
#define KSEED_TARGET_END KSEED_PRAGMA(GCC pop_options)
#else
#define KSEED_TARGET_BEGIN(features)
#define KSEED_TARGET_END
#endif

#if defined(__GNUC__) || defined(__clang__)
#define KSEED_INLINE inline __attribute__((always_inline))
#else
#define KSEED_INLINE inline
#endif
// Keep a function out of line (a hot loop that bench/cpu_insn_count.py finds by name).
#if defined(__GNUC__) || defined(__clang__)
#define KSEED_NOINLINE __attribute__((noinline))
#else
#define KSEED_NOINLINE
#endif
// Unroll the next loop completely (its trip count is a small constant).
#if defined(__clang__)
#define KSEED_UNROLL KSEED_PRAGMA(unroll)
#elif defined(__GNUC__)
#define KSEED_UNROLL KSEED_PRAGMA(GCC unroll 16)
#else
#define KSEED_UNROLL
#endif
