// Torch-free benchmark of the CPU tile kernels (csrc/cpu/kseed_cpu.h): the fused apply with both noise
// families (issue 12) on the same buffers, in the same run, against a plain add pass.
//
//   cmake --build build/cmake --target kseed_bench_tiles && build/cmake/kseed_bench_tiles [options]
//     --threads T   worker threads (default 2); the tiles of kMaxTile elements are split into T
//                   contiguous ranges, as at::parallel_for does in the op layer
//     --repeats R   medians of R timed runs (default 5); each timed run repeats the call until it
//                   lasts at least 50 ms and reports the time per call; the K = 1 rows also time
//                   the add pass in the same loop
//     --isa NAME    scalar, avx2, avx512, neon or "all" (default: the fastest this CPU runs)
//     --quick       K up to 256, R = 3
//     --gaussian-only   time the Gaussian apply only (to compare builds: the Rademacher columns read 0)
//
// The buffer is the 10.4M-parameter LLaMA-shaped model of bench/bench_cpu.py as one flat tensor
// (10424576 elements, stream 0) for K = 1, 2, 32; K = 256 and 1024 use its first 262144 elements (the
// accumulator lives in L1 at large K, so the size does not change the rate; bench_cpu.py slices the same
// way).  In-place applies, round to nearest.  Rates are element-seed updates per second; the add pass
// (a[i] = a[i] + b[i] over the same element count, fp32) is the K = 1 memory reference.  The Gaussian
// and Rademacher runs of one row alternate, so a shared machine's load hits both alike: read ratios.
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "cpu/kseed_cpu.h"

using namespace kseed;
using namespace kseed::cpu;

namespace {

int g_threads = 2;

// Runs fn(begin_tile, end_tile) on g_threads threads over ntiles tiles (contiguous ranges).
template <typename F>
void parallel_tiles(int64_t ntiles, F fn) {
  const int t = int(std::min<int64_t>(g_threads, ntiles));
  if (t <= 1) {
    fn(int64_t(0), ntiles);
    return;
  }
  std::vector<std::thread> pool;
  for (int i = 0; i < t; ++i) {
    const int64_t b = ntiles * i / t, e = ntiles * (i + 1) / t;
    pool.emplace_back([=] { fn(b, e); });
  }
  for (auto& th : pool) th.join();
}

void apply(Isa isa, DType dt, Noise noise, void* w, int64_t n, const std::vector<uint64_t>& seeds,
           const std::vector<float>& coefs) {
  const int64_t es = dtype_size(dt);
  const int64_t ntiles = (n + kMaxTile - 1) / kMaxTile;
  parallel_tiles(ntiles, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t e0 = t * kMaxTile, m = std::min(kMaxTile, n - e0);
      void* p = static_cast<unsigned char*>(w) + es * e0;
      apply_tile(isa, dt, noise, p, p, uint64_t(e0), m, seeds.data(), coefs.data(), int64_t(seeds.size()), 0,
                 kRoundNearest, 0);
    }
  });
}

void add_pass(float* a, const float* b, int64_t n) {
  const int64_t ntiles = (n + kMaxTile - 1) / kMaxTile;
  parallel_tiles(ntiles, [&](int64_t lo, int64_t hi) {
    const int64_t e = std::min(hi * kMaxTile, n);
    for (int64_t i = lo * kMaxTile; i < e; ++i) a[i] = a[i] + b[i];
  });
}

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Seconds per call of fn: the call repeated until it lasts 50 ms.
template <typename F>
double timed(F fn, int64_t* inner) {
  if (*inner == 0) {  // calibrate once per row
    const double t0 = now();
    fn();
    const double t = now() - t0;
    *inner = std::max<int64_t>(1, int64_t(std::ceil(0.05 / std::max(t, 1e-7))));
  }
  const double t0 = now();
  for (int64_t i = 0; i < *inner; ++i) fn();
  return (now() - t0) / double(*inner);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

double load_average() {
  double l = NAN;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &l) != 1) l = NAN;
    std::fclose(f);
  }
  return l;
}

}  // namespace

int main(int argc, char** argv) {
  int repeats = 5;
  bool quick = false, gaussian_only = false;
  std::string isa_arg;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) g_threads = std::max(1, std::atoi(argv[++i]));
    else if (a == "--repeats" && i + 1 < argc) repeats = std::max(1, std::atoi(argv[++i]));
    else if (a == "--isa" && i + 1 < argc) isa_arg = argv[++i];
    else if (a == "--quick") quick = true;
    else if (a == "--gaussian-only") gaussian_only = true;
    else {
      std::fprintf(stderr, "usage: %s [--threads T] [--repeats R] [--isa NAME|all] [--quick] [--gaussian-only]\n",
                   argv[0]);
      return 2;
    }
  }
  if (quick) repeats = std::min(repeats, 3);
  std::vector<Isa> isas;
  if (isa_arg.empty()) {
    isas.push_back(best_isa());
  } else if (isa_arg == "all") {
    for (int i = 0; i < kNumIsas; ++i)
      if (isa_supported(Isa(i))) isas.push_back(Isa(i));
  } else {
    Isa x;
    if (!parse_isa(isa_arg.c_str(), &x) || !isa_supported(x)) {
      std::fprintf(stderr, "--isa: unknown or unsupported path %s\n", isa_arg.c_str());
      return 2;
    }
    isas.push_back(x);
  }

  const int64_t full = 10424576, slice = 262144;
  std::vector<int64_t> ks = {1, 2, 32, 256, 1024};
  if (quick) ks.pop_back();
  std::printf("kseed_bench_tiles: %d threads, medians of %d; load average at start %.2f\n", g_threads, repeats,
              load_average());

  // The add pass (fp32, full size): the K = 1 memory reference, timed alternately with the K = 1 rows.
  std::vector<float> a(static_cast<size_t>(full), 0.5f), b(static_cast<size_t>(full), 1e-4f);
  add_pass(a.data(), b.data(), full);

  std::printf("\n%-7s %-5s %5s %9s %14s %14s %9s %12s\n", "path", "dtype", "K", "elements", "gauss M e-s/s",
              "rad M e-s/s", "rad/gauss", "rad/add(K=1)");
  for (Isa isa : isas) {
    for (DType dt : {DType::F32, DType::BF16}) {
      const bool f32 = dt == DType::F32;
      std::vector<float> w32(static_cast<size_t>(full));
      std::vector<uint16_t> w16(static_cast<size_t>(full));
      for (int64_t i = 0; i < full; ++i) {
        w32[size_t(i)] = 0.02f * float((i * 2654435761u) % 1000) / 1000.0f;
        w16[size_t(i)] = round_bf16_nearest(w32[size_t(i)]);
      }
      void* w = f32 ? static_cast<void*>(w32.data()) : static_cast<void*>(w16.data());
      for (int64_t K : ks) {
        const int64_t n = K >= 256 ? slice : full;
        std::vector<uint64_t> seeds(static_cast<size_t>(K));
        std::vector<float> coefs(static_cast<size_t>(K));
        for (int64_t k = 0; k < K; ++k) {
          seeds[size_t(k)] = 1000 + uint64_t(k);
          coefs[size_t(k)] = 1e-4f * float(1 + k % 5) * (k % 2 ? -1.0f : 1.0f);
        }
        std::vector<double> tg, tr, ta;
        int64_t ig = 0, ir = 0, ia = 0;
        apply(isa, dt, kNoiseGaussian, w, n, seeds, coefs);  // warm-up
        if (!gaussian_only) apply(isa, dt, kNoiseRademacher, w, n, seeds, coefs);
        for (int r = 0; r < repeats; ++r) {
          tg.push_back(timed([&] { apply(isa, dt, kNoiseGaussian, w, n, seeds, coefs); }, &ig));
          if (gaussian_only) tr.push_back(INFINITY);
          else tr.push_back(timed([&] { apply(isa, dt, kNoiseRademacher, w, n, seeds, coefs); }, &ir));
          if (K == 1) ta.push_back(timed([&] { add_pass(a.data(), b.data(), full); }, &ia));
        }
        const double g = double(n * K) / median(tg), rr = double(n * K) / median(tr);
        char vs_add[32] = "";
        if (K == 1) {
          std::snprintf(vs_add, sizeof vs_add, "%.2f", median(ta) / median(tr));
          std::printf("        (add pass a = a + b, fp32, %lld elements, same loop: %.1f M elements/s)\n",
                      (long long)full, double(full) / median(ta) / 1e6);
        }
        std::printf("%-7s %-5s %5lld %9lld %14.1f %14.1f %9.2f %12s\n", isa_name(isa), f32 ? "fp32" : "bf16",
                    (long long)K, (long long)n, g / 1e6, rr / 1e6, rr / g, vs_add);
        std::fflush(stdout);
      }
    }
  }
  std::printf("\nload average at end %.2f (rad/add > 1: the Rademacher K = 1 apply is faster than the add pass)\n",
              load_average());
  return 0;
}
