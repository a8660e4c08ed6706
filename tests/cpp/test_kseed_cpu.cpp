// C++ tests of the torch-free kseed core (csrc/kseed_core.h) and CPU kernels (csrc/cpu/kseed_cpu.h):
//   - the Random123 Philox4x32-10 known answers (docs/SPEC.md section 1);
//   - the spec vectors (tests/data/spec_vectors.txt, the text form of spec_vectors.json) on every path;
//   - every SIMD path bitwise equal to the scalar path, on random inputs: normals, Philox words, the
//     final write for each dtype and rounding (random bit patterns, NaN / inf / subnormals included),
//     whole tiles at misaligned starts;
//   - the Rademacher family (spec section 8): the spec vectors (spec_vectors_rademacher.txt) through the
//     core, rademacher_tile and apply_tile on every path; the sum (sum_signs) of every path against the
//     scalar path and a per-element oracle (odd word offsets, 2^32-block carries, K across the seed
//     groups); whole tiles of every dtype and rounding, in and out of place, at starts and lengths
//     crossing 32- and 128-element boundaries;
//   - the scalar float16 / bfloat16 conversions against the hardware conversions where present;
//   - subnormals IEEE whatever the thread's flush mode: tiles under flush-to-zero / denormals-are-zero
//     bitwise the tiles without it (subnormal results and inputs), and the mode restored after.
//   - project_block (spec section 9) of every path against the spec's order through the core.
// Usage: kseed_cpp_tests [path/to/spec_vectors.txt [path/to/spec_vectors_rademacher.txt]]
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kseed_core.h"
#include "cpu/kseed_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define KSEED_HW_F16 1
#elif defined(__aarch64__)
#include <arm_neon.h>
#define KSEED_HW_F16 1
#endif

using namespace kseed;
using namespace kseed::cpu;

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond, ...)                                  \
  do {                                                    \
    ++g_checks;                                           \
    if (!(cond)) {                                        \
      ++g_failures;                                       \
      if (g_failures <= 30) {                             \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);  \
        std::printf(__VA_ARGS__);                         \
        std::printf("\n");                                \
      }                                                   \
    }                                                     \
  } while (0)

static std::vector<Isa> paths() {
  std::vector<Isa> out;
  for (int i = 0; i < kNumIsas; ++i) {
    if (isa_supported(Isa(i))) out.push_back(Isa(i));
  }
  return out;
}

static void test_kat() {
  struct Kat {
    uint32_t c[4], k[2], out[4];
  } kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& t : kats) {
    const Block b = philox(t.c[0], t.c[1], t.c[2], t.c[3], t.k[0], t.k[1]);
    const uint32_t got[4] = {b.x0, b.x1, b.x2, b.x3};
    for (int l = 0; l < 4; ++l) {
      CHECK(got[l] == t.out[l], "philox KAT word %d: got %08x want %08x", l, got[l], t.out[l]);
    }
  }
  // The SIMD Philox paths on the all-zero / all-ones counters (stream = c2, word3 = c3, block = c0,c1).
  for (Isa isa : paths()) {
    std::vector<uint32_t> w(4 * kGroupBlocks);
    philox_words(isa, Key{0, 0}, 0, 0, 0, kGroupBlocks, w.data());
    CHECK(w[0] == 0x6627e8d5u && w[3] == 0x9b00dbd8u, "%s philox words of block 0", isa_name(isa));
    philox_words(isa, Key{0xffffffffu, 0xffffffffu}, 0xffffffffu, 0xffffffffu,
                 0xffffffffffffffffull, kGroupBlocks, w.data());
    CHECK(w[0] == 0x408f276du && w[1] == 0x41c83b0eu && w[2] == 0xa20bc7c6u && w[3] == 0x6d5451fdu,
          "%s philox words of the all-ones counter", isa_name(isa));
  }
}

// Reads a spec-vector text file: for each row "seed stream offset values..." (# comments skipped) calls
// row(seed, stream, offset, rest) with the rest of the line; returns the number of rows.
template <typename F>
static int read_vector_rows(const char* path, F row) {
  std::ifstream in(path);
  CHECK(bool(in), "cannot open %s", path);
  std::string line;
  int rows = 0;
  while (in && std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ss(line);
    unsigned long long seed, offset;
    unsigned long stream;
    ss >> seed >> stream >> offset;
    ++rows;
    row(seed, stream, offset, ss);
  }
  CHECK(rows > 0, "no spec vectors read from %s", path);
  return rows;
}

static void test_spec_vectors(const char* path) {
  const int rows = read_vector_rows(path, [](unsigned long long seed, unsigned long stream,
                                             unsigned long long offset, std::istringstream& ss) {
    std::vector<uint32_t> want;
    std::string hex;
    while (ss >> hex) want.push_back(uint32_t(std::stoul(hex, nullptr, 16)));
    for (size_t j = 0; j < want.size(); ++j) {
      const float z = gaussian_at(seed, uint32_t(stream), offset + j);
      CHECK(float_to_bits(z) == want[j], "spec vector (core) seed %llu stream %lu index %llu: got %08x want %08x",
            seed, stream, offset + (unsigned long long)j, float_to_bits(z), want[j]);
    }
    for (Isa isa : paths()) {
      std::vector<float> out(want.size());
      gaussian_tile(isa, out.data(), seed, uint32_t(stream), offset, int64_t(want.size()));
      for (size_t j = 0; j < want.size(); ++j) {
        CHECK(float_to_bits(out[j]) == want[j], "spec vector (%s) seed %llu stream %lu index %llu: got %08x want %08x",
              isa_name(isa), seed, stream, offset + (unsigned long long)j, float_to_bits(out[j]),
              want[j]);
      }
    }
  });
  std::printf("spec vectors: %d rows\n", rows);
}

static void test_paths_agree() {
  std::mt19937_64 rng(12345);
  const auto all = paths();
  for (int trial = 0; trial < 40; ++trial) {
    const uint64_t seed = rng();
    const uint32_t stream = uint32_t(rng());
    // Block indices near 2^32 boundaries exercise the carry into counter word 1.
    const uint64_t fb = trial % 3 == 0 ? (0xffffffffull - (rng() % 40)) : (rng() >> 4);
    const int64_t nb = kGroupBlocks * (1 + int64_t(rng() % 8));
    std::vector<float> ref(size_t(4 * nb)), got(size_t(4 * nb));
    normals(Isa::Scalar, key_of(seed), stream, fb, nb, ref.data());
    for (int64_t b = 0; b < nb; ++b) {  // the core's one-block path
      const float z = gaussian_at(seed, stream, 4 * (fb + uint64_t(b)) + 1);
      CHECK(float_to_bits(z) == float_to_bits(ref[size_t(4 * b + 1)]), "scalar normals vs core");
    }
    for (Isa isa : all) {
      normals(isa, key_of(seed), stream, fb, nb, got.data());
      CHECK(std::memcmp(ref.data(), got.data(), ref.size() * 4) == 0, "%s normals differ", isa_name(isa));
      std::vector<uint32_t> w0(size_t(4 * nb)), w1(size_t(4 * nb));
      philox_words(Isa::Scalar, key_of(seed), stream, 1, fb, nb, w0.data());
      philox_words(isa, key_of(seed), stream, 1, fb, nb, w1.data());
      CHECK(w0 == w1, "%s philox words differ", isa_name(isa));
      // accumulate with a random coefficient on a random accumulator
      std::vector<float> a0(size_t(4 * nb)), a1;
      std::normal_distribution<float> nd(0.0f, 1.0f);
      for (auto& x : a0) x = nd(rng);
      a1 = a0;
      const float c = nd(rng);
      accumulate_normals(Isa::Scalar, key_of(seed), stream, fb, nb, c, a0.data());
      accumulate_normals(isa, key_of(seed), stream, fb, nb, c, a1.data());
      CHECK(std::memcmp(a0.data(), a1.data(), a0.size() * 4) == 0, "%s accumulate differs",
            isa_name(isa));
    }
  }
}

// Random float bit patterns with many special values.
static uint32_t random_bits(std::mt19937_64& rng) {
  const uint32_t r = uint32_t(rng());
  switch (rng() % 8) {
    case 0: return r;                                   // anything, NaNs included
    case 1: return (r & 0x807FFFFFu);                   // zero / subnormal
    case 2: return (r & 0x80000000u) | 0x7F800000u;     // +-inf
    case 3: return (r & 0x80001FFFu) | 0x38000000u | ((r >> 13) & 0x00FFE000u);  // near fp16 range
    default: return (r & 0x8FFFFFFFu) | 0x30000000u;    // moderate magnitudes
  }
}

static void test_finish_paths() {
  std::mt19937_64 rng(777);
  const auto all = paths();
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t n = 1 + int64_t(rng() % 300);
    std::vector<float> acc(static_cast<size_t>(n));
    std::vector<uint32_t> r(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) {
      acc[size_t(j)] = bits_to_float(rng() % 4 == 0 ? random_bits(rng) : (uint32_t(rng()) & 0x8FFFFFFFu) | 0x30000000u);
      r[size_t(j)] = uint32_t(rng());
    }
    for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
      for (int rounding : {0, 1}) {
        std::vector<uint32_t> w32(static_cast<size_t>(n));
        std::vector<uint16_t> w16(static_cast<size_t>(n));
        for (int64_t j = 0; j < n; ++j) {
          w32[size_t(j)] = random_bits(rng);
          w16[size_t(j)] = uint16_t(rng());
        }
        std::vector<uint32_t> ref32 = w32;
        std::vector<uint16_t> ref16 = w16;
        void* rp = dt == DType::F32 ? static_cast<void*>(ref32.data()) : static_cast<void*>(ref16.data());
        finish(Isa::Scalar, dt, rp, rp, acc.data(), r.data(), n, rounding);
        for (Isa isa : all) {
          std::vector<uint32_t> g32 = w32;
          std::vector<uint16_t> g16 = w16;
          void* gp = dt == DType::F32 ? static_cast<void*>(g32.data()) : static_cast<void*>(g16.data());
          finish(isa, dt, gp, gp, acc.data(), r.data(), n, rounding);
          for (int64_t j = 0; j < n; ++j) {
            if (dt == DType::F32) {
              CHECK(g32[size_t(j)] == ref32[size_t(j)], "%s finish f32 j=%lld", isa_name(isa), (long long)j);
            } else {
              CHECK(g16[size_t(j)] == ref16[size_t(j)],
                    "%s finish %s rounding %d j=%lld: w %04x acc %08x r %08x -> %04x, scalar %04x",
                    isa_name(isa), dt == DType::BF16 ? "bf16" : "f16", rounding, (long long)j,
                    w16[size_t(j)], float_to_bits(acc[size_t(j)]), r[size_t(j)], g16[size_t(j)],
                    ref16[size_t(j)]);
            }
          }
        }
      }
    }
  }
}

// The spec's term coefs[k] * noise(seeds[k], stream, i): a product for the Gaussian, an exact sign flip
// of the coefficient for the Rademacher family.
static float term(Noise noise, float c, uint64_t seed, uint32_t stream, uint64_t i) {
  if (noise == kNoiseRademacher) return bits_to_float(float_to_bits(c) ^ (rademacher_signbit(seed, stream, i) << 31));
  return c * gaussian_at(seed, stream, i);
}

// The Rademacher spec vectors (text form: seed stream offset signs, '+' for r = +1, '-' for r = -1)
// through the core, rademacher_tile and a K = 1, c = 1 apply on zeros (0 + (+-1)) on every path.
static void test_rademacher_vectors(const char* path) {
  const int rows = read_vector_rows(path, [path](unsigned long long seed, unsigned long stream,
                                                 unsigned long long offset, std::istringstream& ss) {
    std::string signs;
    ss >> signs;
    CHECK(!signs.empty() && signs.find_first_not_of("+-") == std::string::npos, "bad signs in %s", path);
    const int64_t n = int64_t(signs.size());
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t want = signs[size_t(j)] == '-' ? 1u : 0u;
      CHECK(rademacher_signbit(seed, uint32_t(stream), offset + uint64_t(j)) == want,
            "rademacher vector (core) seed %llu stream %lu index %llu", seed, stream, offset + (unsigned long long)j);
    }
    for (Isa isa : paths()) {
      std::vector<float> out(size_t(n), 0.0f), w(size_t(n), 0.0f);
      rademacher_tile(isa, out.data(), seed, uint32_t(stream), offset, n);
      const uint64_t s1 = seed;
      const float one = 1.0f;
      apply_tile(isa, DType::F32, kNoiseRademacher, w.data(), w.data(), offset, n, &s1, &one, 1, uint32_t(stream),
                 kRoundNearest, 0);
      for (int64_t j = 0; j < n; ++j) {
        const float want = signs[size_t(j)] == '-' ? -1.0f : 1.0f;
        CHECK(float_to_bits(out[size_t(j)]) == float_to_bits(want) && float_to_bits(w[size_t(j)]) == float_to_bits(want),
              "rademacher vector (%s) seed %llu stream %lu index %llu: tile %g apply %g want %g", isa_name(isa), seed,
              stream, offset + (unsigned long long)j, double(out[size_t(j)]), double(w[size_t(j)]), double(want));
      }
    }
  });
  std::printf("rademacher spec vectors: %d rows\n", rows);
}

// A coefficient: mostly normal, sometimes a special value (the term must be an exact sign flip of it).
static float random_coef(std::mt19937_64& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  switch (rng() % 16) {
    case 0: return 0.0f;
    case 1: return -0.0f;
    case 2: return bits_to_float(random_bits(rng));  // NaN, inf, subnormal, ...
    default: return nd(rng) * (rng() % 2 ? 1e-3f : 1.0f);
  }
}

// sum_signs of every path against the scalar path and the per-element oracle (from +0.0f, in ascending
// k; coefficients with special values: zeros of both signs, NaN, inf, subnormals), over an accumulator
// of junk (it is written, not read): word offsets of every residue mod 4 (blocks starting mid-way),
// block indices near 2^32 (the carry into counter word 1), K across the groups of seeds (0 .. 19).
static void test_signs_paths() {
  std::mt19937_64 rng(2468);
  const auto all = paths();
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t K = trial == 0 ? 0 : 1 + int64_t(rng() % 19);
    std::vector<uint64_t> seeds(static_cast<size_t>(K) + 1);
    std::vector<float> coefs(static_cast<size_t>(K) + 1);
    for (int64_t k = 0; k < K; ++k) {
      seeds[size_t(k)] = rng();
      coefs[size_t(k)] = random_coef(rng);
    }
    const uint32_t stream = uint32_t(rng());
    const uint64_t fw = trial % 3 == 0 ? (uint64_t(0xffffffffull - rng() % 4) << 2) + rng() % 4 : rng() >> 6;
    const int64_t nw = trial % 5 == 0 ? kMaxSignWords : 1 + int64_t(rng() % uint64_t(kMaxSignWords));
    std::vector<float> a0(size_t(32 * nw));
    for (auto& x : a0) x = bits_to_float(random_bits(rng));
    std::vector<float> ref = a0;
    sum_signs(Isa::Scalar, seeds.data(), coefs.data(), K, stream, fw, nw, ref.data());
    for (int64_t j = 0; j < 32 * nw; j += (K == 0 ? 1 : 7)) {  // the oracle, element by element, in ascending k
      float a = 0.0f;
      for (int64_t k = 0; k < K; ++k) a = a + term(kNoiseRademacher, coefs[size_t(k)], seeds[size_t(k)], stream, 32 * fw + uint64_t(j));
      CHECK(float_to_bits(ref[size_t(j)]) == float_to_bits(a), "scalar sum_signs vs core: word %llu j %lld K %lld",
            (unsigned long long)fw, (long long)j, (long long)K);
    }
    for (Isa isa : all) {
      std::vector<float> got(a0.size(), -7.0f);  // other junk than the scalar path's
      sum_signs(isa, seeds.data(), coefs.data(), K, stream, fw, nw, got.data());
      CHECK(std::memcmp(got.data(), ref.data(), ref.size() * 4) == 0, "%s sum_signs differs (K %lld, nwords %lld)",
            isa_name(isa), (long long)K, (long long)nw);
    }
  }
}

// Whole tiles of one noise family: the scalar path against the one-element core (every dtype and
// rounding, sampled elements), every path bitwise against the scalar path, in and out of place.
static void test_tiles(Noise noise, int trials, int64_t max_k) {
  std::mt19937_64 rng(noise == kNoiseRademacher ? 98 : 99);
  const auto all = paths();
  const char* fam = noise == kNoiseRademacher ? "rademacher" : "gaussian";
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int trial = 0; trial < trials; ++trial) {
    // Rademacher: every other pair of trials has 1 .. 4 seeds (one group of seeds, partial or whole)
    const bool few = noise == kNoiseRademacher && trial % 4 < 2;
    const int64_t K = 1 + int64_t(rng() % uint64_t(few ? 4 : max_k));
    std::vector<uint64_t> seeds(static_cast<size_t>(K));
    std::vector<float> coefs(static_cast<size_t>(K));
    for (int64_t k = 0; k < K; ++k) {
      seeds[size_t(k)] = rng();
      coefs[size_t(k)] = nd(rng);
    }
    const uint32_t stream = uint32_t(rng());
    // starts: anywhere, or just before a 32- / 128-element boundary; lengths: any, or short
    uint64_t e0 = (rng() >> 3) + uint64_t(trial % 4);
    if (trial % 3 == 1) e0 = ((rng() >> 8) << 7) - 1 - rng() % 40;
    if (trial % 3 == 2) e0 &= ~uint64_t(31);  // a sign word's start
    const int64_t n = trial % 4 == 2 ? 1 + int64_t(rng() % 300) : 1 + int64_t(rng() % kMaxTile);
    const uint64_t sr_key = rng();
    for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
      for (int rounding : {0, 1}) {
        std::vector<float> w0(static_cast<size_t>(n));
        for (auto& x : w0) x = nd(rng);
        std::vector<uint16_t> h0(static_cast<size_t>(n));
        for (int64_t j = 0; j < n; ++j) {
          h0[size_t(j)] = dt == DType::BF16 ? round_bf16_nearest(w0[size_t(j)]) : round_fp16_nearest(w0[size_t(j)]);
        }
        // scalar tile against the one-element core
        std::vector<float> ref = w0;
        std::vector<uint16_t> ref16 = h0;
        void* rp = dt == DType::F32 ? static_cast<void*>(ref.data()) : static_cast<void*>(ref16.data());
        apply_tile(Isa::Scalar, dt, noise, rp, rp, e0, n, seeds.data(), coefs.data(), K, stream, rounding, sr_key);
        for (int64_t j = 0; j < n; j += (noise == kNoiseRademacher ? 13 : 97)) {
          const uint64_t i = e0 + uint64_t(j);
          float acc = 0.0f;
          for (int64_t k = 0; k < K; ++k) acc = acc + term(noise, coefs[size_t(k)], seeds[size_t(k)], stream, i);
          const Block rb = philox_block(key_of(sr_key), i >> 2, stream, spec::COUNTER_STOCHASTIC_ROUNDING);
          const uint32_t rbits = lane_of(rb, unsigned(i & 3u));
          if (dt == DType::F32) {
            const float want = w0[size_t(j)] + acc;
            CHECK(float_to_bits(ref[size_t(j)]) == float_to_bits(want), "%s scalar tile vs core j=%lld", fam,
                  (long long)j);
          } else if (dt == DType::BF16) {
            const float v = bf16_bits_to_float(h0[size_t(j)]) + acc;
            const uint16_t want = rounding == 1 ? round_bf16_stochastic(v, rbits) : round_bf16_nearest(v);
            CHECK(ref16[size_t(j)] == want, "%s scalar bf16 tile vs core rounding %d j=%lld", fam, rounding,
                  (long long)j);
          } else {
            const float v = fp16_bits_to_float(h0[size_t(j)]) + acc;
            const uint16_t want = round_fp16_nearest(rounding == 1 ? round_fp16_stochastic_value(v, rbits) : v);
            CHECK(ref16[size_t(j)] == want, "%s scalar f16 tile vs core rounding %d j=%lld", fam, rounding,
                  (long long)j);
          }
        }
        for (Isa isa : all) {
          std::vector<float> g = w0;
          std::vector<uint16_t> g16 = h0;
          void* gp = dt == DType::F32 ? static_cast<void*>(g.data()) : static_cast<void*>(g16.data());
          apply_tile(isa, dt, noise, gp, gp, e0, n, seeds.data(), coefs.data(), K, stream, rounding, sr_key);
          // out of place: the source is only read, the destination (junk before) gets the result
          std::vector<float> o(static_cast<size_t>(n), -7.0f);
          std::vector<uint16_t> o16(static_cast<size_t>(n), uint16_t(0xBEEF));
          const std::vector<float> src32 = w0;
          const std::vector<uint16_t> src16 = h0;
          apply_tile(isa, dt, noise, dt == DType::F32 ? static_cast<const void*>(src32.data()) : static_cast<const void*>(src16.data()),
                     dt == DType::F32 ? static_cast<void*>(o.data()) : static_cast<void*>(o16.data()), e0, n,
                     seeds.data(), coefs.data(), K, stream, rounding, sr_key);
          CHECK(src32 == w0 && src16 == h0, "%s %s out-of-place tile wrote its source", fam, isa_name(isa));
          if (dt == DType::F32) {
            CHECK(std::memcmp(o.data(), ref.data(), size_t(n) * 4) == 0, "%s %s out-of-place tile f32 differs", fam, isa_name(isa));
          } else {
            CHECK(o16 == ref16, "%s %s out-of-place tile %d rounding %d differs", fam, isa_name(isa), int(dt), rounding);
          }
          if (dt == DType::F32) {
            CHECK(std::memcmp(g.data(), ref.data(), size_t(n) * 4) == 0, "%s %s tile f32 differs", fam, isa_name(isa));
          } else {
            CHECK(g16 == ref16, "%s %s tile %d rounding %d differs", fam, isa_name(isa), int(dt), rounding);
          }
        }
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("f16c"))) static uint16_t hw_f16(float f) {
  return uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}
__attribute__((target("f16c"))) static float hw_f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
static bool have_hw_f16() {
  unsigned a, b, c, d;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
}
#elif defined(__aarch64__)
static uint16_t hw_f16(float f) {  // FCVTN under the default FPCR: nearest even, NaN payload kept
  return vget_lane_u16(vreinterpret_u16_f16(vcvt_f16_f32(vdupq_n_f32(f))), 0);
}
static float hw_f16_to_f32(uint16_t h) {
  return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}
static bool have_hw_f16() { return true; }
#endif

// The scalar path's final write against kseed_core.h's per-element functions (the spec's scalar home),
// on random bit patterns: every dtype and rounding.
static void test_finish_core() {
  std::mt19937_64 rng(4242);
  const int64_t n = 5000;
  std::vector<float> acc(static_cast<size_t>(n));
  std::vector<uint32_t> r(static_cast<size_t>(n)), w32(static_cast<size_t>(n));
  std::vector<uint16_t> w16(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    acc[size_t(j)] = bits_to_float(random_bits(rng));
    r[size_t(j)] = uint32_t(rng());
    w32[size_t(j)] = random_bits(rng);
    w16[size_t(j)] = uint16_t(rng());
  }
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    for (int rounding : {0, 1}) {
      std::vector<uint32_t> o32(static_cast<size_t>(n));
      std::vector<uint16_t> o16(static_cast<size_t>(n));
      const bool f32 = dt == DType::F32;
      finish(Isa::Scalar, dt, f32 ? static_cast<const void*>(w32.data()) : static_cast<const void*>(w16.data()),
             f32 ? static_cast<void*>(o32.data()) : static_cast<void*>(o16.data()), acc.data(), r.data(), n,
             rounding);
      for (int64_t j = 0; j < n; ++j) {
        const size_t i = size_t(j);
        if (f32) {
          const float want = fadd(bits_to_float(w32[i]), acc[i]);
          CHECK(o32[i] == float_to_bits(want), "core finish f32 j=%lld", (long long)j);
        } else if (dt == DType::BF16) {
          const float v = fadd(bf16_bits_to_float(w16[i]), acc[i]);
          const uint16_t want = rounding == 1 ? round_bf16_stochastic(v, r[i]) : round_bf16_nearest(v);
          CHECK(o16[i] == want, "core finish bf16 rounding %d j=%lld: %04x want %04x", rounding, (long long)j,
                o16[i], want);
        } else {
          const float v = fadd(fp16_bits_to_float(w16[i]), acc[i]);
          const uint16_t want =
              round_fp16_nearest(rounding == 1 ? round_fp16_stochastic_value(v, r[i]) : v);
          CHECK(o16[i] == want, "core finish f16 rounding %d j=%lld: %04x want %04x", rounding, (long long)j,
                o16[i], want);
        }
      }
    }
  }
}

static void test_conversions() {
#if defined(KSEED_HW_F16)
  if (!have_hw_f16()) return;
  int64_t n = 0;
  // Every pattern of the top 20 bits with low-bit patterns around the rounding points.
  const uint32_t lows[] = {0x000, 0x001, 0x7FF, 0x800, 0x801, 0xFFF};
  for (uint32_t hi = 0; hi < (1u << 20); ++hi) {
    for (uint32_t lo : lows) {
      const uint32_t b = (hi << 12) | lo;
      const float f = bits_to_float(b);
      const uint16_t want = hw_f16(f);
      const uint16_t got = round_fp16_nearest(f);
      ++n;
      CHECK(got == want, "round_fp16_nearest(%08x) = %04x, hardware %04x", b, got, want);
    }
  }
  std::mt19937_64 rng(5);
  for (int i = 0; i < 2000000; ++i) {
    const uint32_t b = uint32_t(rng());
    const float f = bits_to_float(b);
    CHECK(round_fp16_nearest(f) == hw_f16(f), "round_fp16_nearest(%08x)", b);
  }
  std::printf("float16 conversion: %lld + 2000000 patterns\n", (long long)n);
  // float16 -> float32, every pattern, against the hardware widening.
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float hw = hw_f16_to_f32(uint16_t(h));
    CHECK(float_to_bits(fp16_bits_to_float(uint16_t(h))) == float_to_bits(hw), "fp16_bits_to_float(%04x)", h);
  }
#endif
  // bfloat16: round to nearest even, NaN -> 0x7FC0.
  CHECK(round_bf16_nearest(bits_to_float(0x3F808000u)) == 0x3F80, "bf16 tie to even (down)");
  CHECK(round_bf16_nearest(bits_to_float(0x3F818000u)) == 0x3F82, "bf16 tie to even (up)");
  CHECK(round_bf16_nearest(bits_to_float(0x3F808001u)) == 0x3F81, "bf16 above tie");
  CHECK(round_bf16_nearest(bits_to_float(0x7F7FFFFFu)) == 0x7F80, "bf16 overflow to inf");
  CHECK(round_bf16_nearest(bits_to_float(0x7FA00000u)) == 0x7FC0, "bf16 NaN");
}

// Tiles computed with the thread in flush-to-zero / denormals-are-zero mode equal the IEEE ones bit for
// bit (the sums are subnormal, the weights subnormal too), on every path, both families, every dtype; the
// thread's mode is unchanged by the call.
static void test_flush_mode() {
  set_flush_mode(true);
  const bool can_flush = flush_mode_bits() != 0;
  set_flush_mode(false);
  CHECK(flush_mode_bits() == 0, "flush mode not cleared");
  if (!can_flush) {
    std::printf("flush mode: not available on this target, skipped\n");
    return;
  }
  std::mt19937_64 rng(7);
  const int64_t n = 1000, K = 3;
  const uint64_t seeds[K] = {rng(), rng(), rng()};
  const float coefs[K] = {1e-40f, -3e-39f, 2.5e-41f};  // subnormal coefficients: subnormal sums
  for (Noise noise : {kNoiseGaussian, kNoiseRademacher}) {
    for (DType dt : {DType::F32, DType::BF16}) {
      for (Isa isa : paths()) {
        std::vector<float> w0(static_cast<size_t>(n));
        for (auto& x : w0) x = float(int64_t(rng() % 2001) - 1000) * 1e-42f;  // subnormal weights
        std::vector<uint16_t> h0(static_cast<size_t>(n));
        for (int64_t j = 0; j < n; ++j) h0[size_t(j)] = round_bf16_nearest(w0[size_t(j)]);
        std::vector<float> a = w0, b = w0;
        std::vector<uint16_t> a16 = h0, b16 = h0;
        void* pa = dt == DType::F32 ? static_cast<void*>(a.data()) : static_cast<void*>(a16.data());
        void* pb = dt == DType::F32 ? static_cast<void*>(b.data()) : static_cast<void*>(b16.data());
        apply_tile(isa, dt, noise, pa, pa, 5, n, seeds, coefs, K, 9, 1, 77);
        set_flush_mode(true);
        apply_tile(isa, dt, noise, pb, pb, 5, n, seeds, coefs, K, 9, 1, 77);
        CHECK(flush_mode_bits() != 0, "%s apply_tile did not restore the flush mode", isa_name(isa));
        set_flush_mode(false);
        int subnormal = 0;
        for (int64_t j = 0; j < n; ++j) {
          const float x = dt == DType::F32 ? a[size_t(j)] : bf16_bits_to_float(a16[size_t(j)]);
          subnormal += x != 0.0f && std::fabs(x) < 1.17549435e-38f;
        }
        CHECK(subnormal > n / 2, "%s: only %d subnormal results", isa_name(isa), subnormal);
        CHECK(a == b && a16 == b16, "%s %d noise %d: tile under flush-to-zero differs from IEEE",
              isa_name(isa), int(dt), int(noise));
      }
    }
  }
}

// project_block (spec section 9.1, steps 1-3) of every path against the spec read literally, element by
// element through the core: products in float32, 16 lanes in ascending index, the fold.  Every dtype and
// family, block indices whose Philox counters carry into the high word, lengths of whole and partial
// blocks, K across the Rademacher seed groups (and 0).
static void test_project() {
  std::mt19937_64 rng(1919);
  const auto all = paths();
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int trial = 0; trial < 36; ++trial) {
    const Noise noise = trial % 2 ? kNoiseRademacher : kNoiseGaussian;
    const DType dt = DType((trial / 2) % 3);
    const int64_t K = trial == 0 ? 0 : 1 + int64_t(rng() % 19);
    std::vector<uint64_t> seeds(static_cast<size_t>(K) + 1);
    for (auto& x : seeds) x = rng();
    const uint32_t stream = uint32_t(rng());
    const uint64_t block = trial % 3 == 0 ? (uint64_t(1) << 23) - 1 + rng() % 3 : rng() >> 24;
    const int64_t B = spec::PROJECT_BLOCK;
    const int64_t n = trial % 4 == 0 ? B : trial % 4 == 1 ? 1 + int64_t(rng() % 40) : 1 + int64_t(rng() % B);
    std::vector<float> x(static_cast<size_t>(n));
    std::vector<uint16_t> h(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) {
      const float v = nd(rng) * (trial % 5 == 0 && dt != DType::F16 ? 1e30f : 1.0f);  // huge, still finite
      h[size_t(j)] = dt == DType::BF16 ? round_bf16_nearest(v) : round_fp16_nearest(v);
      x[size_t(j)] = dt == DType::F32 ? v : dt == DType::BF16 ? bf16_bits_to_float(h[size_t(j)])
                                                               : fp16_bits_to_float(h[size_t(j)]);
    }
    const void* src = dt == DType::F32 ? static_cast<const void*>(x.data()) : static_cast<const void*>(h.data());
    std::vector<float> want(static_cast<size_t>(K));
    for (int64_t k = 0; k < K; ++k) {
      float lanes[spec::PROJECT_LANES] = {};
      for (int64_t j = 0; j < n; ++j) {
        const uint64_t i = block * uint64_t(B) + uint64_t(j);
        const float p = noise == kNoiseRademacher
                            ? bits_to_float(float_to_bits(x[size_t(j)]) ^ (rademacher_signbit(seeds[size_t(k)], stream, i) << 31))
                            : fmul(x[size_t(j)], gaussian_at(seeds[size_t(k)], stream, i));
        lanes[j % spec::PROJECT_LANES] = fadd(lanes[j % spec::PROJECT_LANES], p);
      }
      for (int hh = spec::PROJECT_LANES / 2; hh >= 1; hh >>= 1)
        for (int l = 0; l < hh; ++l) lanes[l] = fadd(lanes[l], lanes[l + hh]);
      want[size_t(k)] = lanes[0];
    }
    for (Isa isa : all) {
      std::vector<float> got(static_cast<size_t>(K) + 1, -7.0f);
      project_block(isa, dt, noise, src, n, block, seeds.data(), K, stream, got.data());
      CHECK(std::memcmp(got.data(), want.data(), size_t(K) * 4) == 0 && float_to_bits(got[size_t(K)]) == float_to_bits(-7.0f),
            "%s project_block differs (%s, dtype %d, K %lld, n %lld, block %llu)", isa_name(isa),
            noise == kNoiseRademacher ? "rademacher" : "gaussian", int(dt), (long long)K, (long long)n,
            (unsigned long long)block);
    }
  }
}

int main(int argc, char** argv) {
  const char* vectors = argc > 1 ? argv[1] : "tests/data/spec_vectors.txt";
  const char* rad_vectors = argc > 2 ? argv[2] : "tests/data/spec_vectors_rademacher.txt";
  std::printf("paths:");
  for (Isa i : paths()) std::printf(" %s", isa_name(i));
  std::printf("\n");
  test_kat();
  test_spec_vectors(vectors);
  test_paths_agree();
  test_finish_paths();
  test_finish_core();
  test_tiles(kNoiseGaussian, 30, 5);
  test_rademacher_vectors(rad_vectors);
  test_signs_paths();
  test_tiles(kNoiseRademacher, 48, 19);
  test_conversions();
  test_flush_mode();
  test_project();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
