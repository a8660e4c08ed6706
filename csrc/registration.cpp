// The one home of the torch.ops.kseed operator definitions: every schema (TORCH_LIBRARY(kseed)), the
// Meta implementations (shapes only, for FakeTensor / torch.compile) and the Python module init of
// kseed_kernels._C.  The per-device files only implement: csrc/ops_cpu.cpp (CPU, and the CPU settings
// ops) and csrc/cuda/kseed_cuda_ops.cpp (CUDA).
//
// The module has no pybind11 and uses only Python's limited API (as pytorch/extension-cpp does): importing
// it registers the ops; the settings of the CPU kernels are ops too (kseed::cpu_isa, ...).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "kseed_plan.h"

namespace {

at::Tensor philox4x32_10_meta(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK_VALUE(counter.dim() >= 1 && counter.size(-1) == 4,
                    "kseed: counter must have shape [..., 4]");
  TORCH_CHECK_VALUE(key.dim() >= 1 && key.size(-1) == 2, "kseed: key must have shape [..., 2]");
  return at::empty(counter.sizes(), counter.options());
}
void noise_out_meta(at::Tensor&, int64_t, int64_t, int64_t) {}  // gaussian_, rademacher_
void apply_seeds_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                      int64_t) {}
void apply_seeds_multi_meta(at::TensorList, at::IntArrayRef, const at::Tensor&, const at::Tensor&,
                            int64_t, int64_t, int64_t) {}
void apply_seeds_out_meta(const at::Tensor& base, at::Tensor& out, const at::Tensor&,
                          const at::Tensor&, int64_t, int64_t, int64_t, int64_t) {
  TORCH_CHECK_VALUE(base.sizes() == out.sizes(), "kseed: base has shape ", base.sizes(),
                    " but out has shape ", out.sizes());
}
void apply_seeds_multi_out_meta(at::TensorList, at::TensorList, at::IntArrayRef, const at::Tensor&,
                                const at::Tensor&, int64_t, int64_t, int64_t) {}
at::Tensor noise_floor_meta(const at::Tensor& like, const at::Tensor&, const at::Tensor&,
                            int64_t numel, int64_t, int64_t) {
  TORCH_CHECK_VALUE(numel > 0, "kseed: numel must be > 0");
  return at::empty({kseed::tiles_of(numel, kseed::kFloorTileElems)}, like.options().dtype(at::kFloat));
}

at::Tensor project_seeds_meta(at::TensorList tensors, at::IntArrayRef, const at::Tensor& seeds, int64_t) {
  TORCH_CHECK_VALUE(seeds.dim() == 1, "kseed: seeds must be 1-d [K], got ", seeds.dim(), " dims");
  const at::TensorOptions like = tensors.empty() ? seeds.options() : tensors[0].options();
  return at::empty({seeds.size(0)}, like.dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY(kseed, m) {
  // Philox4x32-10 of counter [..., 4] and key [..., 2] (int64 tensors of uint32 words).
  m.def("philox4x32_10(Tensor counter, Tensor key) -> Tensor");
  // out[j] = z(seed, stream, offset + j).
  m.def("gaussian_(Tensor(a!) out, int seed, int stream, int offset) -> ()");
  // out[j] = r(seed, stream, offset + j), +-1.0 (docs/SPEC.md section 8).
  m.def("rademacher_(Tensor(a!) out, int seed, int stream, int offset) -> ()");
  // In place: tensor = round(tensor + sum_k coefs[k] n(seeds[k], stream, i)); rounding 0 nearest,
  // 1 stochastic with key sr_key; seeds and sr_key are uint64 bit patterns in int64; noise selects n:
  // 0 the Gaussian z, 1 the Rademacher r (kseed_types.h: enum Noise).
  m.def("apply_seeds_(Tensor(a!) tensor, Tensor seeds, Tensor coefs, int stream, int rounding, "
        "int sr_key, int noise=0) -> ()");
  m.def("apply_seeds_multi_(Tensor(a!)[] tensors, int[] streams, Tensor seeds, Tensor coefs, "
        "int rounding, int sr_key, int noise=0) -> ()");
  // Out of place: out = round(base + sum_k ...), base only read (same shape and dtype, no overlap).
  m.def("apply_seeds_out(Tensor base, Tensor(a!) out, Tensor seeds, Tensor coefs, int stream, "
        "int rounding, int sr_key, int noise=0) -> ()");
  m.def("apply_seeds_multi_out(Tensor[] bases, Tensor(a!)[] outs, int[] streams, Tensor seeds, "
        "Tensor coefs, int rounding, int sr_key, int noise=0) -> ()");
  // Benchmark floor: the generate-and-sum work of an apply (noise family `noise`) over numel elements
  // of one stream, no weight read or written; one float per kFloorTileElems elements, on like's device.
  m.def("_noise_floor(Tensor like, Tensor seeds, Tensor coefs, int numel, int stream, int noise=0) "
        "-> Tensor");
  // The transpose of apply (docs/SPEC.md section 9): float32 [K], c_k = sum over the tensors (list order)
  // and their elements of x_i * n(seeds[k], streams[t], i) in the spec's fixed order; the tensors are
  // only read.  On the tensors' device (the CPU for an empty list).
  m.def("project_seeds(Tensor[] tensors, int[] streams, Tensor seeds, int noise=0) -> Tensor");
  // Settings of the CPU kernels (implemented in csrc/ops_cpu.cpp).
  m.def("cpu_isa() -> str");               // the SIMD path the next call uses
  m.def("cpu_best_isa() -> str");          // the fastest path this CPU runs
  m.def("cpu_supported_isas() -> str[]");  // every path this CPU (and build) runs
  m.def("set_cpu_isa(str? name) -> ()");   // force a path; None: automatic
  m.def("cpu_tile_elems() -> int");        // elements per tile of the threaded loop
  m.def("set_cpu_tile_elems(int n) -> ()");
}

TORCH_LIBRARY_IMPL(kseed, Meta, m) {
  m.impl("philox4x32_10", &philox4x32_10_meta);
  m.impl("gaussian_", &noise_out_meta);
  m.impl("rademacher_", &noise_out_meta);
  m.impl("apply_seeds_", &apply_seeds_meta);
  m.impl("apply_seeds_multi_", &apply_seeds_multi_meta);
  m.impl("apply_seeds_out", &apply_seeds_out_meta);
  m.impl("apply_seeds_multi_out", &apply_seeds_multi_out_meta);
  m.impl("_noise_floor", &noise_floor_meta);
  m.impl("project_seeds", &project_seeds_meta);
}

// ------------------------------------------------------------------ Python module kseed_kernels._C
// Importing the module loads this library, whose static initialisers register the ops above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "kseed compiled kernels: importing registers the torch.ops.kseed operators",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
