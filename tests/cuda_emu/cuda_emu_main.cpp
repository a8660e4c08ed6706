// Runs kseed's CUDA kernels under the host emulation (cuda_emu.h) on one job file and writes the
// result, for tests/test_cuda_emu.py to compare bitwise against the reference backend.
//
//   cuda_emu JOB OUT
//
// JOB (little-endian): "KSEEDEMU", int32 op, then
//   op 0 (apply):    int64 K, int32 rounding, uint64 sr_key, int32 noise, int32 n; uint64 seeds[K];
//                    float coefs[K];
//                    n x { int32 dtype (0 f32, 1 bf16, 2 f16), uint32 stream, int64 numel,
//                          int64 shift, numel elements }
//                    shift > 0 places the tensor `shift` elements past an aligned address, so that its
//                    dtype group takes the kernels' unaligned (scalar I/O) path, as the torch binding
//                    would (csrc/cuda/kseed_cuda_ops.cpp: one aligned flag per dtype group).
//   op 3 (apply out of place): as op 0, with an int64 out_shift after each tensor's shift: the tensor
//                    is the base (only read; the run fails if it changes) and the result goes to a
//                    separate guarded buffer placed out_shift elements past an aligned address.
//   op 1 (gaussian): uint64 seed, uint32 stream, uint64 offset, int64 numel
//   op 2 (floor):    int64 K, uint32 stream, int64 numel, int32 noise; uint64 seeds[K]; float coefs[K]
//   op 4 (rademacher): as op 1
//   op 5 (project_seeds): int64 K, int32 noise, int64 chunk_blocks, int32 n; uint64 seeds[K];
//                    n x { int32 dtype, uint32 stream, int64 numel, int64 shift, numel elements }
//                    (the tensors in list order; the call's block sums chunk_blocks blocks at a time)
// noise: 0 gaussian, 1 rademacher (csrc/kseed_types.h: enum Noise).
// OUT: op 0 the n tensors' elements after the update, in order (op 3: the n outs); ops 1 and 4
// float[numel]; op 2 one float per tile; op 5 float[K].  Prints the number of launches and emulated threads.
#include "cuda_emu.h"

#include <cstring>
#include <fstream>
#include <map>
#include <string>

#include "../../csrc/cuda/kseed_cuda_kernels.cu"

extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }

namespace {

using kseed::cuda::DType;

struct Reader {
  std::vector<char> buf;
  size_t at = 0;
  template <typename T>
  T get() {
    T v;
    need(sizeof v);
    std::memcpy(&v, buf.data() + at, sizeof v);
    at += sizeof v;
    return v;
  }
  void bytes(void* dst, size_t n) {
    need(n);
    std::memcpy(dst, buf.data() + at, n);
    at += n;
  }
  void need(size_t n) const {
    if (at + n > buf.size()) {
      std::fprintf(stderr, "cuda_emu: job file truncated\n");
      std::exit(2);
    }
  }
};

void fail(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "cuda_emu: %s returned error %d\n", what, int(err));
    std::exit(1);
  }
}

size_t elem_size(int dtype) { return dtype == 0 ? 4 : 2; }

// A buffer of `n` bytes placed `lead` bytes after a 64-byte boundary, with guard bytes on both sides
// (at least 256 after it); check() fails the run if a kernel wrote outside the buffer.
struct Guarded {
  static constexpr unsigned char kGuard = 0xA5;
  std::vector<unsigned char> storage;
  size_t begin = 0, size = 0;
  char* alloc(size_t n, size_t lead) {
    storage.assign(n + lead + 64 + 256 + 64, kGuard);
    const size_t base = (64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64 + 64;
    begin = base + lead;
    size = n;
    return reinterpret_cast<char*>(storage.data() + begin);
  }
  void check(const char* what) const {
    for (size_t i = 0; i < storage.size(); ++i) {
      if ((i < begin || i >= begin + size) && storage[i] != kGuard) {
        std::fprintf(stderr, "cuda_emu: out-of-bounds write next to a %s (byte %lld from its start)\n",
                     what, (long long)i - (long long)begin);
        std::exit(4);
      }
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: cuda_emu JOB OUT\n");
    return 2;
  }
  Reader r;
  {
    std::ifstream f(argv[1], std::ios::binary);
    r.buf.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  char magic[8];
  r.bytes(magic, 8);
  if (std::memcmp(magic, "KSEEDEMU", 8) != 0) {
    std::fprintf(stderr, "cuda_emu: not a job file\n");
    return 2;
  }
  const int op = r.get<int32_t>();
  std::vector<char> out;
  if (op == 0 || op == 2 || op == 3) {
    int64_t K = 0, numel = 0;
    int rounding = 0, n = 0, noise = 0;
    uint64_t sr_key = 0;
    uint32_t stream = 0;
    if (op != 2) {
      K = r.get<int64_t>();
      rounding = r.get<int32_t>();
      sr_key = r.get<uint64_t>();
      noise = r.get<int32_t>();
      n = r.get<int32_t>();
    } else {
      K = r.get<int64_t>();
      stream = r.get<uint32_t>();
      numel = r.get<int64_t>();
      noise = r.get<int32_t>();
    }
    std::vector<uint64_t> seeds(static_cast<size_t>(K));
    std::vector<float> coefs(static_cast<size_t>(K));
    r.bytes(seeds.data(), size_t(K) * 8);
    r.bytes(coefs.data(), size_t(K) * 4);
    if (op == 2) {
      const size_t tiles = size_t(kseed::cuda::tiles_of(numel));
      Guarded mem;
      float* res = reinterpret_cast<float*>(mem.alloc(tiles * 4, 0));
      fail(kseed::cuda::launch_noise_floor(res, numel, seeds.data(), coefs.data(), K, stream,
                                           kseed::Noise(noise), nullptr),
           "launch_noise_floor");
      mem.check("floor output");
      out.assign(reinterpret_cast<char*>(res), reinterpret_cast<char*>(res) + tiles * 4);
    } else {
      // One guarded buffer per tensor, the tensor `shift` elements past a 64-byte boundary; out of
      // place, a second one for the result.
      struct T {
        int dtype;
        int64_t numel, shift, out_shift;
        Guarded mem, out_mem;
        char* data;
        char* out;
        std::vector<char> before;
      };
      const bool in_place = op == 0;
      std::vector<T> ts(static_cast<size_t>(n));
      kseed::ApplyPlan plan(kseed::cuda::kTileElems);
      for (T& t : ts) {
        t.dtype = r.get<int32_t>();
        const uint32_t st = r.get<uint32_t>();
        t.numel = r.get<int64_t>();
        t.shift = r.get<int64_t>();
        t.out_shift = in_place ? 0 : r.get<int64_t>();
        const size_t es = elem_size(t.dtype);
        t.data = t.mem.alloc(size_t(t.numel) * es, size_t(t.shift) * es);
        r.bytes(t.data, size_t(t.numel) * es);
        t.before.assign(t.data, t.data + size_t(t.numel) * es);
        t.out = in_place ? t.data : t.out_mem.alloc(size_t(t.numel) * es, size_t(t.out_shift) * es);
        if (!in_place) std::memset(t.out, 0x5A, size_t(t.numel) * es);
        if (t.numel > 0) plan.add(DType(t.dtype), t.data, t.out, t.numel, st);
      }
      for (const kseed::PlanGroup& g : plan.groups()) {
        fail(kseed::cuda::launch_apply(g.dtype, g.rows.data(), int(g.rows.size()), g.tiles,
                                       seeds.data(), coefs.data(), K, rounding, sr_key,
                                       kseed::Noise(noise), g.aligned, nullptr),
             "launch_apply");
      }
      for (const T& t : ts) {
        t.mem.check("tensor");
        const size_t nb = size_t(t.numel) * elem_size(t.dtype);
        if (!in_place) {
          t.out_mem.check("out");
          if (std::memcmp(t.before.data(), t.data, nb) != 0) {
            std::fprintf(stderr, "cuda_emu: an out-of-place apply wrote into its base\n");
            std::exit(5);
          }
        }
        out.insert(out.end(), t.out, t.out + nb);
      }
    }
  } else if (op == 1 || op == 4) {
    const uint64_t seed = r.get<uint64_t>();
    const uint32_t stream = r.get<uint32_t>();
    const uint64_t offset = r.get<uint64_t>();
    const int64_t numel = r.get<int64_t>();
    Guarded mem;
    float* res = reinterpret_cast<float*>(mem.alloc(size_t(numel) * 4, 0));
    if (op == 1) {
      fail(kseed::cuda::launch_gaussian(res, numel, seed, stream, offset, nullptr),
           "launch_gaussian");
    } else {
      fail(kseed::cuda::launch_rademacher(res, numel, seed, stream, offset, nullptr),
           "launch_rademacher");
    }
    mem.check("noise output");
    out.assign(reinterpret_cast<char*>(res), reinterpret_cast<char*>(res) + size_t(numel) * 4);
  } else if (op == 5) {
    const int64_t K = r.get<int64_t>();
    const int noise = r.get<int32_t>();
    const int64_t chunk = r.get<int64_t>();
    const int n = r.get<int32_t>();
    std::vector<uint64_t> seeds(static_cast<size_t>(K));
    r.bytes(seeds.data(), size_t(K) * 8);
    std::vector<Guarded> mems(static_cast<size_t>(n));
    std::vector<kseed::PlanRow> rows;
    int64_t blocks = 0;
    for (Guarded& m : mems) {  // as kseed::checks::read_project: list order, empty tensors skipped
      const int dtype = r.get<int32_t>();
      const uint32_t st = r.get<uint32_t>();
      const int64_t numel = r.get<int64_t>();
      const int64_t shift = r.get<int64_t>();
      const size_t es = elem_size(dtype);
      char* data = m.alloc(size_t(numel) * es, size_t(shift) * es);
      r.bytes(data, size_t(numel) * es);
      if (numel == 0) continue;
      rows.push_back({data, nullptr, numel, st, uint32_t(dtype), blocks});
      blocks += kseed::tiles_of(numel, kseed::spec::PROJECT_BLOCK);
    }
    const int64_t cb = chunk < blocks ? chunk : blocks;
    Guarded sums_mem, out_mem;
    float* sums = reinterpret_cast<float*>(sums_mem.alloc(size_t(cb * K) * 4, 0));
    std::vector<double> acc(static_cast<size_t>(K), 0.0);
    float* res = reinterpret_cast<float*>(out_mem.alloc(size_t(K) * 4, 0));
    std::memset(res, 0, size_t(K) * 4);  // as the binding: no block gives +0.0
    fail(kseed::cuda::launch_project(rows.data(), int(rows.size()), blocks, seeds.data(), K, kseed::Noise(noise),
                                     chunk, sums, acc.data(), res, nullptr),
         "launch_project");
    sums_mem.check("block sums");
    out_mem.check("project output");
    out.assign(reinterpret_cast<char*>(res), reinterpret_cast<char*>(res) + size_t(K) * 4);
  } else {
    std::fprintf(stderr, "cuda_emu: unknown op %d\n", op);
    return 2;
  }
  if (r.at != r.buf.size()) {
    std::fprintf(stderr, "cuda_emu: %zu trailing bytes in the job file\n", r.buf.size() - r.at);
    return 2;
  }
  std::ofstream f(argv[2], std::ios::binary);
  f.write(out.data(), std::streamsize(out.size()));
  std::printf("cuda_emu: %llu launches, %llu threads\n", ::kseed_emu::g_launches,
              ::kseed_emu::g_threads);
  return f ? 0 : 1;
}
