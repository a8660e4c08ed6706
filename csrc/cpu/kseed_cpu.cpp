// Torch-free CPU kernels: the portable scalar path, the run-time choice of path and the tile logic.
// See kseed_cpu.h.
#include "kseed_cpu.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace kseed {
namespace cpu {

// ------------------------------------------------------------------------------------ ISA choice
const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Neon: return "neon";
  }
  return "?";
}

bool parse_isa(const char* name, Isa* out) {
  if (name == nullptr) return false;
  if (std::strcmp(name, "scalar") == 0) { *out = Isa::Scalar; return true; }
  if (std::strcmp(name, "avx2") == 0) { *out = Isa::Avx2; return true; }
  if (std::strcmp(name, "avx512") == 0) { *out = Isa::Avx512; return true; }
  if (std::strcmp(name, "neon") == 0) { *out = Isa::Neon; return true; }
  return false;
}

bool isa_supported(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();  // idempotent; needed if this runs before libgcc's own initialisation
#endif
  switch (isa) {
    case Isa::Scalar: return true;
#if defined(__x86_64__) && defined(__GNUC__)
    case Isa::Avx2:
      return avx2::compiled() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    case Isa::Avx512:
      return avx512::compiled() && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl");
#else
    default: return false;
#endif
  }
  return false;
}

Isa best_isa() {
  static const Isa best = isa_supported(Isa::Avx512) ? Isa::Avx512
                          : isa_supported(Isa::Avx2) ? Isa::Avx2
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

// ------------------------------------------------------------------------------ scalar conversions
uint16_t f32_to_bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  if (f != f) return uint16_t(0x7FC0u);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

uint16_t f32_to_f16_bits(float f) {
  const uint32_t w = float_to_bits(f);
  const uint32_t sign = (w >> 16) & 0x8000u;
  const uint32_t a = w & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return uint16_t(sign | 0x7E00u | ((a >> 13) & 0x3FFu));  // NaN, quieted
  if (a >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds to infinity (or is infinite)
  if (a < 0x38800000u) {
    // Below the smallest normal float16 (2^-14): a multiple of 2^-24 after rounding.  Adding 0.5 (bits
    // 0x3F000000) shifts the value to where one float32 ulp is 2^-24, so the float add rounds it to
    // nearest even; the low mantissa bits are then the float16 subnormal (or 0x400 = smallest normal).
    const float s = bits_to_float(a) + 0.5f;
    return uint16_t(sign | (float_to_bits(s) - 0x3F000000u));
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  const uint32_t mant_odd = (a >> 13) & 1u;
  const uint32_t r = a + 0xFFFu + mant_odd - (112u << 23);
  return uint16_t(sign | (r >> 13));
}

namespace {

inline float bf16_to_f32(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Exact float16 -> float32.
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu;
  const uint32_t m = h & 0x3FFu;
  uint32_t bits;
  if (e == 0x1F) {
    bits = 0x7F800000u | (m << 13) | (m ? 0x400000u : 0u);
  } else if (e != 0) {
    bits = ((e + 112u) << 23) | (m << 13);
  } else {
    // Subnormal (or zero): m * 2^-24, exact in float32.
    bits = float_to_bits(float(m) * 5.9604644775390625e-08f);
  }
  return bits_to_float(sign | bits);
}

// ----------------------------------------------------------------------------------- scalar path
void scalar_accumulate(Key key, uint32_t stream, uint64_t fb, int64_t nblocks, float c, float* acc) {
  for (int64_t b = 0; b < nblocks; ++b) {
    float z[4];
    normals4(philox_block(key, fb + uint64_t(b), stream, spec::COUNTER_GAUSSIAN), z);
    float* a = acc + 4 * b;
    a[0] = fadd(a[0], fmul(c, z[0]));
    a[1] = fadd(a[1], fmul(c, z[1]));
    a[2] = fadd(a[2], fmul(c, z[2]));
    a[3] = fadd(a[3], fmul(c, z[3]));
  }
}

void scalar_normals(Key key, uint32_t stream, uint64_t fb, int64_t nblocks, float* out) {
  for (int64_t b = 0; b < nblocks; ++b) {
    normals4(philox_block(key, fb + uint64_t(b), stream, spec::COUNTER_GAUSSIAN), out + 4 * b);
  }
}

void scalar_words(Key key, uint32_t stream, uint32_t word3, uint64_t fb, int64_t nblocks,
                  uint32_t* out) {
  for (int64_t b = 0; b < nblocks; ++b) {
    const Block x = philox_block(key, fb + uint64_t(b), stream, word3);
    out[4 * b] = x.x0;
    out[4 * b + 1] = x.x1;
    out[4 * b + 2] = x.x2;
    out[4 * b + 3] = x.x3;
  }
}

}  // namespace

void finish_scalar(DType dtype, const void* src, void* dst, const float* acc, const uint32_t* r,
                   int64_t n, int rounding) {
  if (dtype == DType::F32) {
    const float* s = static_cast<const float*>(src);
    float* p = static_cast<float*>(dst);
    for (int64_t j = 0; j < n; ++j) p[j] = fadd(s[j], acc[j]);
  } else if (dtype == DType::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    uint16_t* p = static_cast<uint16_t*>(dst);
    if (rounding == 1) {
      for (int64_t j = 0; j < n; ++j) p[j] = round_bf16_stochastic(fadd(bf16_to_f32(s[j]), acc[j]), r[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) p[j] = f32_to_bf16_bits(fadd(bf16_to_f32(s[j]), acc[j]));
    }
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    uint16_t* p = static_cast<uint16_t*>(dst);
    if (rounding == 1) {
      for (int64_t j = 0; j < n; ++j) {
        p[j] = f32_to_f16_bits(round_fp16_stochastic_value(fadd(f16_to_f32(s[j]), acc[j]), r[j]));
      }
    } else {
      for (int64_t j = 0; j < n; ++j) p[j] = f32_to_f16_bits(fadd(f16_to_f32(s[j]), acc[j]));
    }
  }
}

// ------------------------------------------------------------------------------------- dispatch
void accumulate_normals(Isa isa, Key key, uint32_t stream, uint64_t first_block, int64_t nblocks,
                        float c, float* acc) {
  switch (isa) {
    case Isa::Avx512: avx512::accumulate_normals(key, stream, first_block, nblocks, c, acc); return;
    case Isa::Avx2: avx2::accumulate_normals(key, stream, first_block, nblocks, c, acc); return;
    default: scalar_accumulate(key, stream, first_block, nblocks, c, acc); return;
  }
}

void normals(Isa isa, Key key, uint32_t stream, uint64_t first_block, int64_t nblocks, float* out) {
  switch (isa) {
    case Isa::Avx512: avx512::normals(key, stream, first_block, nblocks, out); return;
    case Isa::Avx2: avx2::normals(key, stream, first_block, nblocks, out); return;
    default: scalar_normals(key, stream, first_block, nblocks, out); return;
  }
}

void philox_words(Isa isa, Key key, uint32_t stream, uint32_t word3, uint64_t first_block,
                  int64_t nblocks, uint32_t* out) {
  switch (isa) {
    case Isa::Avx512: avx512::philox_words(key, stream, word3, first_block, nblocks, out); return;
    case Isa::Avx2: avx2::philox_words(key, stream, word3, first_block, nblocks, out); return;
    default: scalar_words(key, stream, word3, first_block, nblocks, out); return;
  }
}

void finish(Isa isa, DType dtype, const void* src, void* dst, const float* acc, const uint32_t* r,
            int64_t n, int rounding) {
  switch (isa) {
    case Isa::Avx512: avx512::finish(dtype, src, dst, acc, r, n, rounding); return;
    case Isa::Avx2: avx2::finish(dtype, src, dst, acc, r, n, rounding); return;
    default: finish_scalar(dtype, src, dst, acc, r, n, rounding); return;
  }
}

// ------------------------------------------------------------------------------------------ tiles
namespace {
constexpr int64_t kBuf = kMaxTile + 4 * kGroupBlocks;  // room for a misaligned start and padding

// Blocks covering elements [e0, e0 + n), padded to whole SIMD groups.
inline int64_t padded_blocks(uint64_t e0, int64_t n) {
  const int64_t nb = (int64_t(e0 & 3u) + n + 3) >> 2;
  return (nb + kGroupBlocks - 1) / kGroupBlocks * kGroupBlocks;
}
}  // namespace

void apply_tile(Isa isa, DType dtype, const void* src, void* dst, uint64_t e0, int64_t n,
                const uint64_t* seeds, const float* coefs, int64_t K, uint32_t stream, int rounding,
                uint64_t sr_key) {
  if (n <= 0 || K <= 0) return;
  alignas(64) float acc[kBuf];
  const uint64_t fb = e0 >> 2;
  const int64_t skip = int64_t(e0 & 3u);
  const int64_t nbp = padded_blocks(e0, n);
  std::memset(acc, 0, sizeof(float) * size_t(4 * nbp));  // +0.0f
  for (int64_t k = 0; k < K; ++k) {
    accumulate_normals(isa, key_of(seeds[k]), stream, fb, nbp, coefs[k], acc);
  }
  if (rounding == 1 && dtype != DType::F32) {
    alignas(64) uint32_t rb[kBuf];
    philox_words(isa, key_of(sr_key), stream, spec::COUNTER_STOCHASTIC_ROUNDING, fb, nbp, rb);
    finish(isa, dtype, src, dst, acc + skip, rb + skip, n, 1);
  } else {
    finish(isa, dtype, src, dst, acc + skip, nullptr, n, 0);
  }
}

void gaussian_tile(Isa isa, float* out, uint64_t seed, uint32_t stream, uint64_t e0, int64_t n) {
  if (n <= 0) return;
  alignas(64) float buf[kBuf];
  const int64_t nbp = padded_blocks(e0, n);
  normals(isa, key_of(seed), stream, e0 >> 2, nbp, buf);
  std::memcpy(out, buf + (e0 & 3u), sizeof(float) * size_t(n));
}

}  // namespace cpu
}  // namespace kseed
