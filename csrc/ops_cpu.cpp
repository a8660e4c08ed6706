// CPU implementations of the torch.ops.kseed operators (schemas: csrc/registration.cpp): argument
// checks (op_checks.h), then the torch-free tile kernels of cpu/kseed_cpu.h threaded over the tiles of
// the call's plan (kseed_plan.h) with at::parallel_for.  Also the CPU settings ops (SIMD path, tile).
//
// The public Python API (kseed_kernels.ops) validates every argument first; the checks here repeat
// the ones a direct torch.ops.kseed call needs so that bad inputs raise instead of crashing.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/kseed_cpu.h"
#include "kseed_plan.h"
#include "op_checks.h"

namespace {

using kseed::DType;
using kseed::PlanGroup;
using kseed::PlanRow;
using kseed::cpu::Isa;

using kseed::checks::kU32;

constexpr c10::DeviceType kCPU = c10::DeviceType::CPU;

Isa current_isa() {
  Isa isa;
  const char* err = nullptr;
  TORCH_CHECK_VALUE(kseed::cpu::resolve_isa(&isa, &err), err);
  return isa;
}

// Every tile of every group of the call's plan: dst = round(src + sum_k coefs[k] n(seeds[k], stream, e)),
// n the call's noise family.
void run_apply(at::TensorList bases, at::TensorList outs, at::IntArrayRef streams,
               const at::Tensor& seeds, const at::Tensor& coefs, int64_t rounding, int64_t sr_key,
               int64_t noise) {
  const kseed::checks::ApplyCall call = kseed::checks::read_apply(
      bases, outs, streams, seeds, coefs, rounding, sr_key, noise, kCPU, kseed::cpu::tile_elems());
  if (call.empty()) return;
  const Isa isa = current_isa();
  const int64_t tile = call.plan.tile_elems();
  const kseed::checks::SeedsCoefs& sc = call.sc;
  for (const PlanGroup& g : call.plan.groups()) {
    const PlanRow* rows = g.rows.data();
    const int nrows = int(g.rows.size());
    const size_t es = size_t(kseed::dtype_size(g.dtype));
    at::parallel_for(0, g.tiles, 1, [&](int64_t begin, int64_t end) {
      int r = kseed::find_row(rows, nrows, begin);
      for (int64_t t = begin; t < end; ++t) {
        while (r + 1 < nrows && rows[r + 1].first_tile <= t) ++r;
        const PlanRow& x = rows[r];
        const int64_t e0 = (t - x.first_tile) * tile;
        const int64_t len = std::min(tile, x.numel - e0);
        kseed::cpu::apply_tile(isa, g.dtype, call.noise,
                               static_cast<const char*>(x.src) + es * size_t(e0),
                               static_cast<char*>(x.dst) + es * size_t(e0), uint64_t(e0), len,
                               sc.s(), sc.c(), sc.K, x.stream, call.rounding, call.sr_key);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------- ops
at::Tensor philox4x32_10_cpu(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK_VALUE(counter.device().is_cpu() && key.device().is_cpu(),
                    "kseed (CPU): counter and key must be CPU tensors");
  TORCH_CHECK_TYPE(counter.scalar_type() == at::kLong && key.scalar_type() == at::kLong,
                   "kseed: counter and key must be int64 tensors, got ", counter.scalar_type(),
                   " and ", key.scalar_type());
  TORCH_CHECK_VALUE(counter.dim() >= 1 && counter.size(-1) == 4,
                    "kseed: counter must have shape [..., 4], got ", counter.sizes());
  TORCH_CHECK_VALUE(key.dim() >= 1 && key.size(-1) == 2, "kseed: key must have shape [..., 2], got ",
                    key.sizes());
  TORCH_CHECK_VALUE(counter.sizes().slice(0, counter.dim() - 1) == key.sizes().slice(0, key.dim() - 1),
                    "kseed: counter [..., 4] and key [..., 2] must have the same leading shape, got ",
                    counter.sizes(), " and ", key.sizes());
  const at::Tensor c = counter.contiguous(), k = key.contiguous();
  at::Tensor out = at::empty_like(c, c.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t rows = c.numel() / 4;
  const int64_t* cp = c.data_ptr<int64_t>();
  const int64_t* kp = k.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.numel(); ++i) {
    TORCH_CHECK_VALUE(cp[i] >= 0 && cp[i] < kU32, "kseed: counter must hold values in [0, 2^32)");
  }
  for (int64_t i = 0; i < k.numel(); ++i) {
    TORCH_CHECK_VALUE(kp[i] >= 0 && kp[i] < kU32, "kseed: key must hold values in [0, 2^32)");
  }
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t* x = cp + 4 * r;
      const int64_t* y = kp + 2 * r;
      const kseed::Block b = kseed::philox(uint32_t(x[0]), uint32_t(x[1]), uint32_t(x[2]),
                                           uint32_t(x[3]), uint32_t(y[0]), uint32_t(y[1]));
      op[4 * r] = b.x0;
      op[4 * r + 1] = b.x1;
      op[4 * r + 2] = b.x2;
      op[4 * r + 3] = b.x3;
    }
  });
  return out;
}

// out[j] = the noise of (seed, stream, offset + j), one tile generator (gaussian_tile, rademacher_tile)
// per tile of the output.
using NoiseTile = void (*)(Isa, float*, uint64_t, uint32_t, uint64_t, int64_t);
void noise_cpu(at::Tensor& out, int64_t seed, int64_t stream, int64_t offset, NoiseTile tile_fn) {
  const uint32_t st = kseed::checks::check_noise_out(out, stream, offset, kCPU);
  const int64_t n = out.numel();
  if (n == 0) return;
  const Isa isa = current_isa();
  const int64_t tile = kseed::cpu::tile_elems();
  float* p = out.data_ptr<float>();
  at::parallel_for(0, kseed::tiles_of(n, tile), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j0 = t * tile;
      const int64_t len = std::min(tile, n - j0);
      tile_fn(isa, p + j0, uint64_t(seed), st, uint64_t(offset + j0), len);
    }
  });
}

void gaussian_cpu(at::Tensor& out, int64_t seed, int64_t stream, int64_t offset) {
  noise_cpu(out, seed, stream, offset, &kseed::cpu::gaussian_tile);
}

void rademacher_cpu(at::Tensor& out, int64_t seed, int64_t stream, int64_t offset) {
  noise_cpu(out, seed, stream, offset, &kseed::cpu::rademacher_tile);
}

// Benchmark floor on the CPU: per tile of kFloorTileElems elements, the noise sum into a float32 scratch
// tile (no weight read or written), then the tile's sum.
at::Tensor noise_floor_cpu(const at::Tensor& like, const at::Tensor& seeds, const at::Tensor& coefs,
                           int64_t numel, int64_t stream, int64_t noise) {
  const kseed::checks::FloorArgs args =
      kseed::checks::read_floor(like, seeds, coefs, numel, stream, noise, at::kCPU);
  const kseed::Noise nz = args.noise;
  const uint32_t st = args.stream;
  const kseed::checks::SeedsCoefs& sc = args.sc;
  const int64_t tile = kseed::kFloorTileElems;
  static_assert(kseed::kFloorTileElems <= kseed::cpu::kMaxTile, "floor tile too long");
  at::Tensor out = at::empty({kseed::tiles_of(numel, tile)}, like.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const Isa isa = current_isa();
  at::parallel_for(0, out.numel(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(size_t(tile), 0.0f);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t len = std::min(tile, numel - t * tile);
      std::fill(buf.begin(), buf.end(), 0.0f);
      if (sc.K > 0) {
        kseed::cpu::apply_tile(isa, DType::F32, nz, buf.data(), buf.data(), uint64_t(t * tile), len,
                               sc.s(), sc.c(), sc.K, st, kseed::kRoundNearest, 0);
      }
      float s = 0.0f;
      for (int64_t j = 0; j < len; ++j) s += buf[size_t(j)];
      op[t] = s;
    }
  });
  return out;
}

// project_seeds (docs/SPEC.md section 9): the call's blocks in list order, cut into chunks that bound
// the scratch of block sums (K floats a block; and at most tile_elems() blocks, the split setting the
// tests vary); each chunk's blocks run in parallel (one task a block: widen it once, then every seed),
// then its block sums are added in block order in float64.
at::Tensor project_seeds_cpu(at::TensorList tensors, at::IntArrayRef streams, const at::Tensor& seeds,
                             int64_t noise) {
  const kseed::checks::ProjectCall call = kseed::checks::read_project(
      tensors, streams, seeds, noise, kCPU, kseed::spec::PROJECT_BLOCK);
  const int64_t K = call.sc.K;
  at::Tensor out = at::zeros({K}, at::TensorOptions().dtype(at::kFloat));
  if (call.empty()) return out;
  const Isa isa = current_isa();
  const PlanRow* rows = call.rows.data();
  const int nrows = int(call.rows.size());
  const kseed::cpu::IeeeSubnormals ieee;  // this thread's float64 sums and the final float32 rounding
  constexpr int64_t kScratchFloats = int64_t(1) << 22;  // 16 MiB of block sums at most
  const int64_t chunk = std::max<int64_t>(1, std::min(kScratchFloats / K, kseed::cpu::tile_elems()));
  std::vector<float> sums(size_t(std::min(chunk, call.blocks) * K));
  std::vector<double> total(size_t(K), 0.0);
  for (int64_t c0 = 0; c0 < call.blocks; c0 += chunk) {
    const int64_t c1 = std::min(call.blocks, c0 + chunk);
    at::parallel_for(c0, c1, 1, [&](int64_t begin, int64_t end) {
      int r = kseed::find_row(rows, nrows, begin);
      for (int64_t b = begin; b < end; ++b) {
        while (r + 1 < nrows && rows[r + 1].first_tile <= b) ++r;
        const PlanRow& x = rows[r];
        const DType dt = DType(x.reserved);
        const int64_t e0 = (b - x.first_tile) * kseed::spec::PROJECT_BLOCK;
        const int64_t len = std::min(kseed::spec::PROJECT_BLOCK, x.numel - e0);
        const char* src = static_cast<const char*>(x.src) + size_t(kseed::dtype_size(dt)) * size_t(e0);
        kseed::cpu::project_block(isa, dt, call.noise, src, len, uint64_t(b - x.first_tile), call.sc.s(), K,
                                  x.stream, sums.data() + size_t((b - c0) * K));
      }
    });
    for (int64_t b = c0; b < c1; ++b) {  // spec 9.1 step 4, block order
      const float* sb = sums.data() + size_t((b - c0) * K);
      for (int64_t k = 0; k < K; ++k) total[size_t(k)] += double(sb[k]);
    }
  }
  float* op = out.data_ptr<float>();
  for (int64_t k = 0; k < K; ++k) op[k] = float(total[size_t(k)]);
  return out;
}

// ------------------------------------------------------------------------------- settings ops
std::string cpu_isa() { return kseed::cpu::isa_name(current_isa()); }

std::string cpu_best_isa() { return kseed::cpu::isa_name(kseed::cpu::best_isa()); }

std::vector<std::string> cpu_supported_isas() {
  std::vector<std::string> out;
  for (int i = 0; i < kseed::cpu::kNumIsas; ++i) {
    if (kseed::cpu::isa_supported(Isa(i))) out.emplace_back(kseed::cpu::isa_name(Isa(i)));
  }
  return out;
}

void set_cpu_isa(c10::optional<c10::string_view> name) {
  if (!name.has_value()) {
    kseed::cpu::clear_isa_override();
    return;
  }
  const std::string s(name->data(), name->size());
  std::string known;
  for (int i = 0; i < kseed::cpu::kNumIsas; ++i) {
    known += std::string(i ? ", '" : "'") + kseed::cpu::isa_name(Isa(i)) + "'";
  }
  Isa isa;
  TORCH_CHECK_VALUE(kseed::cpu::parse_isa(s.c_str(), &isa), "isa must be one of ", known,
                    " or None, got '", s, "'");
  TORCH_CHECK_VALUE(kseed::cpu::set_isa_override(isa), "isa '", s, "' is not supported on this CPU");
}

int64_t cpu_tile_elems() { return kseed::cpu::tile_elems(); }

void set_cpu_tile_elems(int64_t n) {
  TORCH_CHECK_VALUE(n >= 1 && n <= kseed::cpu::kMaxTile, "tile must be in [1, ", kseed::cpu::kMaxTile,
                    "], got ", n);
  kseed::cpu::set_tile_elems(n);
}

}  // namespace

TORCH_LIBRARY_IMPL(kseed, CPU, m) {
  m.impl("philox4x32_10", &philox4x32_10_cpu);
  m.impl("gaussian_", &gaussian_cpu);
  m.impl("rademacher_", &rademacher_cpu);
  kseed::checks::impl_apply_ops<run_apply>(m);
  m.impl("_noise_floor", &noise_floor_cpu);
  m.impl("project_seeds", &project_seeds_cpu);
}

// The settings take no tensor, so no device selects them: they are registered for every dispatch key.
TORCH_LIBRARY_IMPL(kseed, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", &cpu_isa);
  m.impl("cpu_best_isa", &cpu_best_isa);
  m.impl("cpu_supported_isas", &cpu_supported_isas);
  m.impl("set_cpu_isa", &set_cpu_isa);
  m.impl("cpu_tile_elems", &cpu_tile_elems);
  m.impl("set_cpu_tile_elems", &set_cpu_tile_elems);
}
