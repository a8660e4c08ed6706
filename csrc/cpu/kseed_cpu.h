// Torch-free CPU kernels of the kseed noise spec (docs/SPEC.md): tiles of the fused K-seed update and
// of the Gaussian, with a portable scalar path and SIMD paths (AVX2, AVX-512 on x86-64, NEON on
// aarch64) chosen at run time.  All paths are one kernel source (kernels-inl.h) over a small vector type
// per ISA (vec_<isa>-inl.h), reached through one dispatch table (kernel_table.h).
//
// Every path gives bitwise the same results (tests/cpp and tests/test_cpu_isa.py check it): the SIMD
// code evaluates the spec's formulas lane by lane with separate multiply and add instructions, never an
// fma.  The threading lives in the caller (csrc/ops_cpu.cpp, at::parallel_for over tiles); a tile's result
// depends only on its element indices, so any split into tiles gives the same bits.
#pragma once
#include <cstdint>

#include "../kseed_core.h"
#include "../kseed_types.h"

namespace kseed {
namespace cpu {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Neon = 3 };
constexpr int kNumIsas = 4;  // Isa(0) .. Isa(kNumIsas - 1)
using ::kseed::DType;

// Elements per tile: the fp32 accumulator of one tile (16 KiB) stays in L1/L2 while the K seeds run.
constexpr int64_t kMaxTile = 4096;
// SIMD groups are 16 Philox blocks (64 elements); tile buffers are padded to whole groups.
constexpr int64_t kGroupBlocks = 16;
// The Rademacher accumulate works on whole 32-element sign words (spec section 8): a tile of kMaxTile
// elements at any start spans at most this many.
constexpr int64_t kMaxSignWords = kMaxTile / 32 + 1;

const char* isa_name(Isa isa);
// Parses "scalar", "avx2", "avx512", "neon"; false if unknown.
bool parse_isa(const char* name, Isa* out);
// Whether this CPU (and this build) can run the path.
bool isa_supported(Isa isa);
// The fastest supported path.
Isa best_isa();

// The path a call uses: the override set by set_isa_override (if any), else the environment variable
// KSEED_CPU_ISA (read at every call; an unsupported or unknown value is an error reported through
// *error), else best_isa().  Returns false and fills *error (a static string) on error.
bool resolve_isa(Isa* out, const char** error);
// Force a path (returns false if unsupported); clear_isa_override() goes back to automatic choice.
bool set_isa_override(Isa isa);
void clear_isa_override();
// The current override, or -1 if none.
int isa_override();

// Tile length used by the op layer (elements, 1..kMaxTile); tests change it to check that the split
// into tiles does not matter.
int64_t tile_elems();
void set_tile_elems(int64_t n);

// Subnormals are IEEE on every path whatever the calling thread's floating-point mode (docs/SPEC.md):
// the tile functions below (apply_tile, gaussian_tile, rademacher_tile, project_block) run under an IeeeSubnormals
// guard, which clears flush-to-zero and denormals-are-zero (x86: MXCSR.FTZ and .DAZ; aarch64: FPCR.FZ,
// .FZ16 and .FIZ) for its lifetime and restores the thread's mode after.  Each thread that computes
// (every OpenMP worker of the op layer) enters it itself: the mode is per thread.
class IeeeSubnormals {
 public:
  IeeeSubnormals();
  ~IeeeSubnormals();
  IeeeSubnormals(const IeeeSubnormals&) = delete;
  IeeeSubnormals& operator=(const IeeeSubnormals&) = delete;

 private:
  uint64_t saved_;   // the thread's control register on entry
  bool changed_;     // whether the guard changed it (then the destructor restores it)
};
// The flush bits of the calling thread's control register (0: IEEE subnormals); for the tests.
uint64_t flush_mode_bits();
// Set (true) or clear (false) every flush bit of the calling thread; for the tests.
void set_flush_mode(bool on);

// dst[j] for j in [0, n), element index e0 + j of a tensor with stream `stream`:
//   acc = +0.0f; acc = acc + coefs[k] * n(seeds[k], stream, e0 + j) for k = 0..K-1, n the `noise`
//   family's z (Gaussian) or r (Rademacher: the term is an exact sign flip of coefs[k]);
//   dst[j] = round(float(src[j]) + acc)  (rounding 0 = nearest, 1 = stochastic with key sr_key).
// src and dst hold n elements of `dtype`; dst == src is the in-place update, otherwise the two must not
// overlap and src is only read.  n <= kMaxTile; K >= 1.
void apply_tile(Isa isa, DType dtype, Noise noise, const void* src, void* dst, uint64_t e0, int64_t n,
                const uint64_t* seeds, const float* coefs, int64_t K, uint32_t stream, int rounding,
                uint64_t sr_key);

// out[j] = z(seed, stream, e0 + j) for j in [0, n), n <= kMaxTile.
void gaussian_tile(Isa isa, float* out, uint64_t seed, uint32_t stream, uint64_t e0, int64_t n);
// out[j] = r(seed, stream, e0 + j) (+1.0f or -1.0f, spec section 8) for j in [0, n), n <= kMaxTile.
void rademacher_tile(Isa isa, float* out, uint64_t seed, uint32_t stream, uint64_t e0, int64_t n);

// project_seeds (docs/SPEC.md section 9): out[k] = the block sum S_b of seeds[k] (steps 1-3 of 9.1) over
// the n elements of src (`dtype`), which are block `block` (elements PROJECT_BLOCK * block + j) of a
// tensor with stream `stream`; n <= spec::PROJECT_BLOCK (less only for a tensor's last block); K >= 0.
void project_block(Isa isa, DType dtype, Noise noise, const void* src, int64_t n, uint64_t block,
                   const uint64_t* seeds, int64_t K, uint32_t stream, float* out);

// Building blocks (exposed for the C++ tests).  nblocks must be a multiple of kGroupBlocks.
// acc[4 b + l] = acc[4 b + l] + c * z(lane l of block first_block + b).
void accumulate_normals(Isa isa, Key key, uint32_t stream, uint64_t first_block, int64_t nblocks,
                        float c, float* acc);
// The Rademacher sum over whole 32-element sign words: for w in [0, nwords), j in [0, 32), element
// i = 32 (first_word + w) + j:  acc[32 w + j] = +0.0f + t_0 + ... + t_(K-1) in that order, t_k = +-coefs[k]
// the sign of r(seeds[k], stream, i) (the accumulator is written, not read).  nwords <= kMaxSignWords;
// any first_word.
void sum_signs(Isa isa, const uint64_t* seeds, const float* coefs, int64_t K, uint32_t stream,
               uint64_t first_word, int64_t nwords, float* acc);
// out[4 b + l] = z(lane l of block first_block + b).
void normals(Isa isa, Key key, uint32_t stream, uint64_t first_block, int64_t nblocks, float* out);
// out[4 b + l] = word l of Philox(counter = (block, stream, word3), key).
void philox_words(Isa isa, Key key, uint32_t stream, uint32_t word3, uint64_t first_block,
                  int64_t nblocks, uint32_t* out);
// The final write of n elements: dst = round(float(src) + acc) with words r (stochastic only);
// dst == src is allowed.
void finish(Isa isa, DType dtype, const void* src, void* dst, const float* acc, const uint32_t* r,
            int64_t n, int rounding);

}  // namespace cpu
}  // namespace kseed
