// Torch-free CPU kernels: the run-time choice of path, the one dispatch table and the tile logic.
// The kernels themselves are kernels-inl.h, compiled once per path by kseed_cpu_<isa>.cpp.
// See kseed_cpu.h.
#include "kseed_cpu.h"

#include "kernel_table.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <xmmintrin.h>
#define KSEED_FP_X86 1
#elif defined(__aarch64__)
#define KSEED_FP_ARM64 1
#endif

namespace kseed {
namespace cpu {

// ------------------------------------------------------------------------- floating-point mode
namespace {
#if defined(KSEED_FP_X86)
constexpr uint64_t kFlushBits = 0x8040u;  // MXCSR.FTZ (bit 15) | MXCSR.DAZ (bit 6)
inline uint64_t read_fp_control() { return _mm_getcsr(); }
inline void write_fp_control(uint64_t v) { _mm_setcsr(unsigned(v)); }
#elif defined(KSEED_FP_ARM64)
constexpr uint64_t kFlushBits = (1u << 24) | (1u << 19) | 1u;  // FPCR.FZ | FPCR.FZ16 | FPCR.FIZ
inline uint64_t read_fp_control() {
  uint64_t v;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(v));
  return v;
}
inline void write_fp_control(uint64_t v) { __asm__ __volatile__("msr fpcr, %0" : : "r"(v)); }
#else
constexpr uint64_t kFlushBits = 0;  // no flush mode known on this target
inline uint64_t read_fp_control() { return 0; }
inline void write_fp_control(uint64_t) {}
#endif
}  // namespace

IeeeSubnormals::IeeeSubnormals() : saved_(read_fp_control()), changed_((saved_ & kFlushBits) != 0) {
  if (changed_) write_fp_control(saved_ & ~kFlushBits);
}
IeeeSubnormals::~IeeeSubnormals() {
  if (changed_) write_fp_control(saved_);
}
uint64_t flush_mode_bits() { return read_fp_control() & kFlushBits; }
void set_flush_mode(bool on) {
  const uint64_t v = read_fp_control();
  write_fp_control(on ? (v | kFlushBits) : (v & ~kFlushBits));
}

// ------------------------------------------------------------------------------------ ISA choice
namespace {
// The paths' names and the one dispatch table, by Isa code (a row is nullptr where this build lacks
// the path).
constexpr const char* kIsaNames[kNumIsas] = {"scalar", "avx2", "avx512", "neon"};

const Kernels* table(Isa isa) {
  static const Kernels* const rows[kNumIsas] = {scalar_kernels(), avx2_kernels(), avx512_kernels(),
                                                neon_kernels()};
  const int i = int(isa);
  return i >= 0 && i < kNumIsas ? rows[i] : nullptr;
}

// The row a call runs: an unsupported path falls back to scalar (resolve_isa never hands one out).
const Kernels& kernels(Isa isa) {
  const Kernels* k = table(isa);
  return k != nullptr ? *k : *scalar_kernels();
}
}  // namespace

const char* isa_name(Isa isa) {
  const int i = int(isa);
  return i >= 0 && i < kNumIsas ? kIsaNames[i] : "?";
}

bool parse_isa(const char* name, Isa* out) {
  if (name == nullptr) return false;
  for (int i = 0; i < kNumIsas; ++i) {
    if (std::strcmp(name, kIsaNames[i]) == 0) {
      *out = Isa(i);
      return true;
    }
  }
  return false;
}

bool isa_supported(Isa isa) {
  const Kernels* k = table(isa);
  return k != nullptr && k->supported();
}

Isa best_isa() {
  static const Isa best = isa_supported(Isa::Avx512) ? Isa::Avx512
                          : isa_supported(Isa::Avx2) ? Isa::Avx2
                          : isa_supported(Isa::Neon) ? Isa::Neon
                                                     : Isa::Scalar;
  return best;
}

namespace {
std::atomic<int> g_override{-1};
std::atomic<int64_t> g_tile{kMaxTile};
}  // namespace

bool set_isa_override(Isa isa) {
  if (!isa_supported(isa)) return false;
  g_override.store(int(isa));
  return true;
}
void clear_isa_override() { g_override.store(-1); }
int isa_override() { return g_override.load(); }

bool resolve_isa(Isa* out, const char** error) {
  const int o = g_override.load();
  if (o >= 0) {
    *out = Isa(o);
    return true;
  }
  const char* env = std::getenv("KSEED_CPU_ISA");
  if (env != nullptr && env[0] != '\0' && std::strcmp(env, "auto") != 0) {
    Isa isa;
    if (!parse_isa(env, &isa)) {
      *error = "KSEED_CPU_ISA must be one of auto, scalar, avx2, avx512, neon";
      return false;
    }
    if (!isa_supported(isa)) {
      *error = "KSEED_CPU_ISA names an instruction set this CPU (or build) does not support";
      return false;
    }
    *out = isa;
    return true;
  }
  *out = best_isa();
  return true;
}

int64_t tile_elems() { return g_tile.load(); }
void set_tile_elems(int64_t n) { g_tile.store(n < 1 ? 1 : n > kMaxTile ? kMaxTile : n); }

// ------------------------------------------------------------------------------------- dispatch
void accumulate_normals(Isa isa, Key key, uint32_t stream, uint64_t first_block, int64_t nblocks,
                        float c, float* acc) {
  kernels(isa).accumulate_normals(key, stream, first_block, nblocks, c, acc);
}

void normals(Isa isa, Key key, uint32_t stream, uint64_t first_block, int64_t nblocks, float* out) {
  kernels(isa).normals(key, stream, first_block, nblocks, out);
}

void philox_words(Isa isa, Key key, uint32_t stream, uint32_t word3, uint64_t first_block,
                  int64_t nblocks, uint32_t* out) {
  kernels(isa).philox_words(key, stream, word3, first_block, nblocks, out);
}

void sum_signs(Isa isa, const uint64_t* seeds, const float* coefs, int64_t K, uint32_t stream,
               uint64_t first_word, int64_t nwords, float* acc) {
  kernels(isa).sum_signs(seeds, coefs, K, stream, first_word, nwords, acc);
}

void finish(Isa isa, DType dtype, const void* src, void* dst, const float* acc, const uint32_t* r,
            int64_t n, int rounding) {
  kernels(isa).finish(dtype, src, dst, acc, r, n, rounding);
}

// ------------------------------------------------------------------------------------------ tiles
namespace {
constexpr int64_t kBuf = kMaxTile + 4 * kGroupBlocks;  // room for a misaligned start and padding
static_assert(32 * kMaxSignWords <= kBuf, "a tile's Rademacher accumulator fits the buffer");

// Blocks covering elements [e0, e0 + n), padded to whole SIMD groups.
inline int64_t padded_blocks(uint64_t e0, int64_t n) {
  const int64_t nb = (int64_t(e0 & 3u) + n + 3) >> 2;
  return (nb + kGroupBlocks - 1) / kGroupBlocks * kGroupBlocks;
}
}  // namespace

void apply_tile(Isa isa, DType dtype, Noise noise, const void* src, void* dst, uint64_t e0, int64_t n,
                const uint64_t* seeds, const float* coefs, int64_t K, uint32_t stream, int rounding,
                uint64_t sr_key) {
  if (n <= 0 || K <= 0) return;
  const IeeeSubnormals ieee;
  const Kernels& kn = kernels(isa);
  alignas(64) float acc[kBuf];
  // The accumulator starts at element 4 (e0 >> 2) (Gaussian: whole Philox-4 blocks, padded to SIMD
  // groups) or 32 (e0 >> 5) (Rademacher: whole sign words); element e0 is acc[skip].
  int64_t skip;
  if (noise == kNoiseRademacher) {
    skip = int64_t(e0 & 31u);
    kn.sum_signs(seeds, coefs, K, stream, e0 >> 5, (skip + n + 31) >> 5, acc);  // from +0.0f
  } else {
    skip = int64_t(e0 & 3u);
    const int64_t nbp = padded_blocks(e0, n);
    std::memset(acc, 0, sizeof(float) * size_t(4 * nbp));  // +0.0f
    for (int64_t k = 0; k < K; ++k) kn.accumulate_normals(key_of(seeds[k]), stream, e0 >> 2, nbp, coefs[k], acc);
  }
  if (rounding == kRoundStochastic && dtype != DType::F32) {
    alignas(64) uint32_t rb[kBuf];
    kn.philox_words(key_of(sr_key), stream, spec::COUNTER_STOCHASTIC_ROUNDING, e0 >> 2, padded_blocks(e0, n), rb);
    kn.finish(dtype, src, dst, acc + skip, rb + (e0 & 3u), n, kRoundStochastic);
  } else {
    kn.finish(dtype, src, dst, acc + skip, nullptr, n, kRoundNearest);
  }
}

void gaussian_tile(Isa isa, float* out, uint64_t seed, uint32_t stream, uint64_t e0, int64_t n) {
  if (n <= 0) return;
  const IeeeSubnormals ieee;
  alignas(64) float buf[kBuf];
  const int64_t nbp = padded_blocks(e0, n);
  normals(isa, key_of(seed), stream, e0 >> 2, nbp, buf);
  std::memcpy(out, buf + (e0 & 3u), sizeof(float) * size_t(n));
}

void rademacher_tile(Isa isa, float* out, uint64_t seed, uint32_t stream, uint64_t e0, int64_t n) {
  if (n <= 0) return;
  const IeeeSubnormals ieee;
  alignas(64) float buf[kBuf];
  const int64_t skip = int64_t(e0 & 31u);
  const float one = 1.0f;
  sum_signs(isa, &seed, &one, 1, stream, e0 >> 5, (skip + n + 31) >> 5, buf);  // 0 + (+-1) = +-1, exact
  std::memcpy(out, buf + skip, sizeof(float) * size_t(n));
}

void project_block(Isa isa, DType dtype, Noise noise, const void* src, int64_t n, uint64_t block,
                   const uint64_t* seeds, int64_t K, uint32_t stream, float* out) {
  if (K <= 0) return;
  if (n <= 0) {
    for (int64_t k = 0; k < K; ++k) out[k] = 0.0f;
    return;
  }
  const IeeeSubnormals ieee;  // products and sums of subnormals as IEEE, whatever the thread's mode
  const Kernels& kn = kernels(isa);
  static_assert(spec::PROJECT_BLOCK % (4 * kGroupBlocks) == 0 && spec::PROJECT_BLOCK % 128 == 0,
                "a project block is whole SIMD groups and whole Rademacher blocks");
  alignas(64) float x[spec::PROJECT_BLOCK];
  kn.widen(dtype, src, x, n);
  if (noise == kNoiseRademacher) {  // whole 32-element sign words, zero-padded (spec 9.1: same sum)
    const int64_t nwords = (n + 31) >> 5;
    std::memset(x + n, 0, sizeof(float) * size_t(32 * nwords - n));
    kn.project_signs(seeds, K, stream, block * uint64_t(spec::PROJECT_BLOCK / 32), nwords, x, out);
  } else {  // whole SIMD groups of Philox blocks, zero-padded
    const int64_t nbp = padded_blocks(0, n);
    std::memset(x + n, 0, sizeof(float) * size_t(4 * nbp - n));
    for (int64_t k = 0; k < K; ++k) {
      out[k] = kn.project_normals(key_of(seeds[k]), stream, block * uint64_t(spec::PROJECT_BLOCK / 4), nbp, x);
    }
  }
}

}  // namespace cpu
}  // namespace kseed
