// Host-side check of the CUDA kernels' helpers (kseed_cuda_device.cuh), runnable without a GPU:
// nvcc compiles them as __host__ __device__ and this program calls them on the CPU.
//   - philox_rk (precomputed round keys, round-0 products passed in) == kseed::philox
//   - round_bf16_nearest (kseed_core.h) == round-to-nearest-even computed independently (exact arithmetic in double)
//   - Elem<F16>::to_f32 == a manual decode of every float16 bit pattern
//   - finish<...> adds in float32 and rounds as the scalar spec core does
// Prints "kseed_cuda_host_check: OK" and exits 0, or names the first failure and exits 1.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "../kseed_cuda_device.cuh"

using namespace kseed;
using namespace kseed::cuda;

static uint64_t rng_state = 0x243F6A8885A308D3ull;
static uint64_t next_u64() {  // splitmix64
  uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static int failures = 0;
#define CHECK(cond, ...)                         \
  do {                                           \
    if (!(cond)) {                               \
      if (failures++ < 10) {                     \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                \
        std::printf("\n");                       \
      }                                          \
    }                                            \
  } while (0)

static void check_philox() {
  // Known answer (Random123): counter 0, key 0.
  {
    uint32_t rk[20];
    round_keys(0, rk);
    const uint64_t p0 = 0, p1 = 0;
    const Block b = philox_rk(uint32_t(p0 >> 32), uint32_t(p0), uint32_t(p1 >> 32), uint32_t(p1), 0,
                              0, rk);
    CHECK(b.x0 == 0x6627E8D5u && b.x1 == 0xE169C58Du && b.x2 == 0xBC57AC4Cu && b.x3 == 0x9B00DBD8u,
          "philox KAT");
  }
  for (int i = 0; i < 200000; ++i) {
    const uint64_t seed = next_u64(), blk = next_u64() >> (i % 40);
    const uint32_t stream = uint32_t(next_u64()), word3 = uint32_t(i & 1);
    uint32_t rk[20];
    round_keys(seed, rk);
    const uint64_t p0 = uint64_t(spec::PHILOX_M0) * uint32_t(blk);
    const uint64_t p1 = uint64_t(spec::PHILOX_M1) * stream;
    const Block a = philox_rk(uint32_t(p0 >> 32), uint32_t(p0), uint32_t(p1 >> 32), uint32_t(p1),
                              uint32_t(blk >> 32), word3, rk);
    const Block b = philox_block(key_of(seed), blk, stream, word3);
    CHECK(a.x0 == b.x0 && a.x1 == b.x1 && a.x2 == b.x2 && a.x3 == b.x3, "philox_rk seed %llx",
          (unsigned long long)seed);
  }
}

// Round-to-nearest-even to bfloat16 by exact comparison in double.
static uint16_t bf16_ref(float v) {
  if (std::isnan(v)) return 0x7FC0u;
  const uint32_t b = float_to_bits(v);
  const uint32_t lo = b & 0xFFFF0000u;
  const uint32_t hi = lo + 0x10000u;  // next bfloat16 away from zero (may be inf)
  const double dv = std::fabs(double(v));
  const double dlo = std::fabs(double(bits_to_float(lo)));
  if ((lo & 0x7F800000u) == 0x7F800000u) return uint16_t(lo >> 16);  // inf
  const double dhi = ((hi & 0x7FFFFFFFu) >= 0x7F800000u)
                         ? std::ldexp(1.0, 128)  // the "next value" past the largest is 2^128
                         : std::fabs(double(bits_to_float(hi)));
  const double dl = dv - dlo, dh = dhi - dv;
  uint32_t r;
  if (dl < dh) r = lo;
  else if (dh < dl) r = hi;
  else r = ((lo >> 16) & 1u) ? hi : lo;
  if ((r & 0x7FFFFFFFu) > 0x7F800000u) r = (b & 0x80000000u) | 0x7F800000u;
  return uint16_t(r >> 16);
}

static void check_bf16() {
  for (int i = 0; i < 2000000; ++i) {
    uint32_t b = uint32_t(next_u64());
    if (i % 4 == 1) b = (b & 0xFFFF0000u) | 0x8000u;  // exact ties
    if (i % 4 == 2) b = 0x7F7F0000u | (b & 0x8000FFFFu);  // near the largest finite value
    const float v = bits_to_float(b);
    CHECK(round_bf16_nearest(v) == bf16_ref(v) || (std::isnan(v) && round_bf16_nearest(v) == 0x7FC0u), "round_bf16_nearest %08x",
          b);
  }
}

static float half_ref(uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 0x1F, m = h & 0x3FF;
  double x;
  if (e == 0) x = std::ldexp(double(m), -24);
  else if (e == 31) x = m ? NAN : INFINITY;
  else x = std::ldexp(double(m | 0x400), e - 25);
  return float(s ? -x : x);
}

static void check_f16_decode() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float a = Elem<DType::F16>::to_f32(uint16_t(h)), b = half_ref(uint16_t(h));
    CHECK((std::isnan(a) && std::isnan(b)) || float_to_bits(a) == float_to_bits(b), "f16 %04x", h);
  }
}

static void check_finish() {
  for (int i = 0; i < 200000; ++i) {
    const uint32_t rb = uint32_t(next_u64());
    const float acc = float(int32_t(next_u64() % 2000001) - 1000000) * 1e-6f;
    const float w32 = float(int32_t(next_u64() % 2000001) - 1000000) * 1e-5f;
    CHECK((float_to_bits(finish<DType::F32, 0>(w32, acc, rb)) == float_to_bits(w32 + acc)), "f32");
    const uint16_t wb = uint16_t(float_to_bits(w32) >> 16);
    const float vb = bits_to_float(uint32_t(wb) << 16) + acc;
    CHECK((finish<DType::BF16, 0>(wb, acc, rb) == round_bf16_nearest(vb)), "bf16 rn");
    CHECK((finish<DType::BF16, 1>(wb, acc, rb) == round_bf16_stochastic(vb, rb)), "bf16 sr");
    const uint16_t wh = __half_as_ushort(__float2half_rn(w32));
    const float vh = half_ref(wh) + acc;
    const uint16_t sr = finish<DType::F16, 1>(wh, acc, rb);
    const float want = round_fp16_stochastic_value(vh, rb);
    CHECK(half_ref(sr) == want || (std::isinf(want) && std::isinf(half_ref(sr))), "f16 sr");
    const uint16_t rn = finish<DType::F16, 0>(wh, acc, rb);
    // nearest: no float16 is closer to vh than the result (ties go to the even one)
    const double d = std::fabs(double(half_ref(rn)) - double(vh));
    const double dn = std::fabs(double(half_ref(uint16_t(rn + 1))) - double(vh));
    const double dp = std::fabs(double(half_ref(uint16_t(rn - 1))) - double(vh));
    CHECK(d <= dn && d <= dp, "f16 rn");
  }
}

int main() {
  check_philox();
  check_bf16();
  check_f16_decode();
  check_finish();
  if (failures) {
    std::printf("kseed_cuda_host_check: %d failures\n", failures);
    return 1;
  }
  std::printf("kseed_cuda_host_check: OK\n");
  return 0;
}
