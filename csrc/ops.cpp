// The torch.ops.kseed operators: schemas, CPU implementations (threaded over tiles of the torch-free
// kernels in cpu/kseed_cpu.h) and Meta implementations (shapes only, for FakeTensor / torch.compile).
//
// The public Python API (kseed_kernels.ops) validates every argument first; the checks here repeat
// the ones a direct torch.ops.kseed call needs so that bad inputs raise instead of crashing.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/irange.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/kseed_cpu.h"
#include "op_checks.h"

namespace {

using kseed::cpu::DType;
using kseed::cpu::Isa;

using kseed::checks::check_rounding;
using kseed::checks::check_stream;
using kseed::checks::kMaxIndex;
using kseed::checks::kU32;

Isa current_isa() {
  Isa isa;
  const char* err = nullptr;
  TORCH_CHECK_VALUE(kseed::cpu::resolve_isa(&isa, &err), err);
  return isa;
}

DType dtype_of(const at::Tensor& t, const char* what) {
  kseed::checks::check_float_dtype(t, what);
  return t.scalar_type() == at::kFloat ? DType::F32
         : t.scalar_type() == at::kBFloat16 ? DType::BF16 : DType::F16;
}

void check_weight(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "kseed (CPU): ", what, " must be a CPU tensor, got ",
                    t.device());
  kseed::checks::check_weight_layout(t, what);
}

// seeds (int64 [K], uint64 bit patterns) and coefs (finite float32 [K]) as host vectors.
void read_seeds_coefs(const at::Tensor& seeds, const at::Tensor& coefs, std::vector<uint64_t>* s,
                      std::vector<float>* c) {
  TORCH_CHECK_VALUE(seeds.device().is_cpu(), "kseed (CPU): seeds must be a CPU tensor");
  TORCH_CHECK_VALUE(coefs.device().is_cpu(), "kseed (CPU): coefs must be a CPU tensor");
  kseed::checks::check_seeds_coefs(seeds, coefs);
  const at::Tensor sc = seeds.contiguous(), cc = coefs.contiguous();
  const int64_t K = sc.numel();
  s->resize(size_t(K));
  c->resize(size_t(K));
  const int64_t* sp = sc.data_ptr<int64_t>();
  const float* cp = cc.data_ptr<float>();
  kseed::checks::check_finite_coefs(cp, K);
  for (const auto k : c10::irange(K)) {
    (*s)[size_t(k)] = uint64_t(sp[k]);
    (*c)[size_t(k)] = cp[k];
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

void gaussian_cpu(at::Tensor& out, int64_t seed, int64_t stream, int64_t offset) {
  TORCH_CHECK_VALUE(out.device().is_cpu(), "kseed (CPU): out must be a CPU tensor");
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, "kseed: out must be float32, got ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 1, "kseed: out must be 1-d, got ", out.dim(), " dims");
  TORCH_CHECK_VALUE(out.is_contiguous(), "kseed: out must be contiguous");
  const uint32_t st = check_stream(stream, "stream");
  TORCH_CHECK_VALUE(offset >= 0 && offset <= kMaxIndex - out.numel(),
                    "kseed: offset must be >= 0 with offset + numel <= 2^62, got offset ", offset);
  const int64_t n = out.numel();
  if (n == 0) return;
  const Isa isa = current_isa();
  const int64_t tile = kseed::cpu::tile_elems();
  const int64_t ntiles = (n + tile - 1) / tile;
  float* p = out.data_ptr<float>();
  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j0 = t * tile;
      const int64_t len = std::min(tile, n - j0);
      kseed::cpu::gaussian_tile(isa, p + j0, uint64_t(seed), st, uint64_t(offset + j0), len);
    }
  });
}

struct Work {
  char* data;
  DType dtype;
  int64_t numel;
  uint32_t stream;
  int64_t first_item;  // index of this tensor's first tile among all work items
};

void run_apply(const std::vector<Work>& work, int64_t n_items, const std::vector<uint64_t>& seeds,
               const std::vector<float>& coefs, int rounding, uint64_t sr_key) {
  if (n_items == 0 || seeds.empty()) return;
  const Isa isa = current_isa();
  const int64_t tile = kseed::cpu::tile_elems();
  const int64_t K = int64_t(seeds.size());
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    // The tensor of item `begin`: the last one whose first item is <= begin.
    size_t w = size_t(std::upper_bound(work.begin(), work.end(), begin,
                                       [](int64_t v, const Work& x) { return v < x.first_item; }) -
                      work.begin()) - 1;
    for (int64_t it = begin; it < end; ++it) {
      while (w + 1 < work.size() && work[w + 1].first_item <= it) ++w;
      const Work& x = work[w];
      const int64_t e0 = (it - x.first_item) * tile;
      const int64_t len = std::min(tile, x.numel - e0);
      const size_t es = x.dtype == DType::F32 ? 4 : 2;
      kseed::cpu::apply_tile(isa, x.dtype, x.data + es * size_t(e0), x.data + es * size_t(e0), uint64_t(e0), len, seeds.data(),
                             coefs.data(), K, x.stream, rounding, sr_key);
    }
  });
}

void apply_seeds_cpu(at::Tensor& tensor, const at::Tensor& seeds, const at::Tensor& coefs,
                     int64_t stream, int64_t rounding, int64_t sr_key) {
  check_weight(tensor, "tensor");
  const uint32_t st = check_stream(stream, "stream");
  const int r = check_rounding(rounding);
  std::vector<uint64_t> s;
  std::vector<float> c;
  read_seeds_coefs(seeds, coefs, &s, &c);
  if (s.empty() || tensor.numel() == 0) return;
  const int64_t tile = kseed::cpu::tile_elems();
  std::vector<Work> work{{static_cast<char*>(tensor.data_ptr()), dtype_of(tensor, "tensor"),
                          tensor.numel(), st, 0}};
  run_apply(work, (tensor.numel() + tile - 1) / tile, s, c, r, uint64_t(sr_key));
}

void apply_seeds_multi_cpu(at::TensorList tensors, at::IntArrayRef streams, const at::Tensor& seeds,
                           const at::Tensor& coefs, int64_t rounding, int64_t sr_key) {
  TORCH_CHECK_VALUE(tensors.size() == streams.size(),
                    "kseed: tensors and streams must have the same length, got ", tensors.size(),
                    " and ", streams.size());
  const int r = check_rounding(rounding);
  std::vector<uint64_t> s;
  std::vector<float> c;
  read_seeds_coefs(seeds, coefs, &s, &c);
  const int64_t tile = kseed::cpu::tile_elems();
  std::vector<Work> work;
  int64_t items = 0;
  for (const auto i : c10::irange(tensors.size())) {
    const std::string what = "tensors[" + std::to_string(i) + "]";
    check_weight(tensors[i], what.c_str());
    const uint32_t st = check_stream(streams[i], "streams[i]");
    const int64_t n = tensors[i].numel();
    if (n == 0) continue;
    for (const Work& x : work) {
      TORCH_CHECK_VALUE(x.data != tensors[i].data_ptr(), "kseed: ", what,
                        " shares its storage with an earlier tensor; list each tensor once");
    }
    work.push_back({static_cast<char*>(tensors[i].data_ptr()), dtype_of(tensors[i], what.c_str()), n,
                    st, items});
    items += (n + tile - 1) / tile;
  }
  run_apply(work, items, s, c, r, uint64_t(sr_key));
}

// ----------------------------------------------------------------------------------- Meta impls
at::Tensor philox4x32_10_meta(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK_VALUE(counter.dim() >= 1 && counter.size(-1) == 4,
                    "kseed: counter must have shape [..., 4]");
  TORCH_CHECK_VALUE(key.dim() >= 1 && key.size(-1) == 2, "kseed: key must have shape [..., 2]");
  return at::empty(counter.sizes(), counter.options());
}
void gaussian_meta(at::Tensor&, int64_t, int64_t, int64_t) {}
void apply_seeds_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t) {}
void apply_seeds_multi_meta(at::TensorList, at::IntArrayRef, const at::Tensor&, const at::Tensor&,
                            int64_t, int64_t) {}

}  // namespace

TORCH_LIBRARY(kseed, m) {
  m.def("philox4x32_10(Tensor counter, Tensor key) -> Tensor");
  m.def("gaussian_(Tensor(a!) out, int seed, int stream, int offset) -> ()");
  m.def("apply_seeds_(Tensor(a!) tensor, Tensor seeds, Tensor coefs, int stream, int rounding, "
        "int sr_key) -> ()");
  m.def("apply_seeds_multi_(Tensor(a!)[] tensors, int[] streams, Tensor seeds, Tensor coefs, "
        "int rounding, int sr_key) -> ()");
}

TORCH_LIBRARY_IMPL(kseed, CPU, m) {
  m.impl("philox4x32_10", &philox4x32_10_cpu);
  m.impl("gaussian_", &gaussian_cpu);
  m.impl("apply_seeds_", &apply_seeds_cpu);
  m.impl("apply_seeds_multi_", &apply_seeds_multi_cpu);
}

TORCH_LIBRARY_IMPL(kseed, Meta, m) {
  m.impl("philox4x32_10", &philox4x32_10_meta);
  m.impl("gaussian_", &gaussian_meta);
  m.impl("apply_seeds_", &apply_seeds_meta);
  m.impl("apply_seeds_multi_", &apply_seeds_multi_meta);
}

// ------------------------------------------------------------------ Python module kseed_kernels._C
// Small helpers for choosing the SIMD path (kseed_kernels.backends.cpu wraps them).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  namespace py = pybind11;
  mod.doc() = "kseed compiled kernels: registers the torch.ops.kseed operators";
  mod.def("isa", []() { return std::string(kseed::cpu::isa_name(current_isa())); },
          "The SIMD path the next call will use.");
  mod.def("best_isa", []() { return std::string(kseed::cpu::isa_name(kseed::cpu::best_isa())); });
  mod.def("supported_isas", []() {
    std::vector<std::string> out;
    for (int i = 0; i < kseed::cpu::kNumIsas; ++i) {
      if (kseed::cpu::isa_supported(Isa(i))) out.emplace_back(kseed::cpu::isa_name(Isa(i)));
    }
    return out;
  });
  mod.def("set_isa", [](py::object name) {
    if (name.is_none()) {
      kseed::cpu::clear_isa_override();
      return;
    }
    const std::string s = name.cast<std::string>();
    Isa isa;
    if (!kseed::cpu::parse_isa(s.c_str(), &isa)) {
      throw py::value_error("isa must be one of 'scalar', 'avx2', 'avx512', 'neon' or None, got '" + s + "'");
    }
    if (!kseed::cpu::set_isa_override(isa)) {
      throw py::value_error("isa '" + s + "' is not supported on this CPU");
    }
  });
  mod.def("tile_elems", []() { return kseed::cpu::tile_elems(); });
  mod.def("set_tile_elems", [](int64_t n) {
    if (n < 1 || n > kseed::cpu::kMaxTile) {
      throw py::value_error("tile must be in [1, " + std::to_string(kseed::cpu::kMaxTile) + "]");
    }
    kseed::cpu::set_tile_elems(n);
  });
}
