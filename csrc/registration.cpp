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
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <vector>

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

// Autograd for the ops that write a tensor argument (Tensor(a!), lists too), as PyTorch's own in-place
// ops behave.  The ADInplaceOrView kernel bumps the version counter of every written tensor, so a tensor
// autograd saved and an op then changed makes backward() raise instead of silently using the new values.
// The Autograd kernel: the ops are not differentiable, so with grad mode on a tensor argument that
// requires grad is refused (a leaf in torch's words for in-place ops), never given a wrong history; under
// torch.no_grad() (how kseed_kernels calls them) they run and only bump the versions.
namespace {

// The tensors a call writes: the ones its schema marks written (alias info with isWrite).
std::vector<at::Tensor> written_tensors(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack.size() - args.size();
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::AliasInfo* alias = args[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& v = stack[first + i];
    if (v.isTensor()) {
      out.push_back(v.toTensor());
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorVector()) out.push_back(t);
    }
  }
  return out;
}

void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                           torch::jit::Stack* stack) {
  const std::vector<at::Tensor> written = written_tensors(op, *stack);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) {
    if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
  }
}

void refuse_requires_grad(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                          torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    for (const at::Tensor& t : written_tensors(op, *stack)) {
      TORCH_CHECK(!(t.defined() && t.requires_grad() && t.is_leaf()),
                  "a leaf Variable that requires grad is being used in an in-place operation (",
                  op.schema().name(), "); call it under torch.no_grad()");
    }
    const size_t n = op.schema().arguments().size();
    for (size_t i = stack->size() - n; i < stack->size(); ++i) {
      const c10::IValue& v = (*stack)[i];
      std::vector<at::Tensor> ts;
      if (v.isTensor()) ts.push_back(v.toTensor());
      else if (v.isTensorList()) ts = v.toTensorVector();
      for (const at::Tensor& t : ts) {
        TORCH_CHECK(!(t.defined() && t.requires_grad()), op.schema().name(),
                    " is not differentiable and one of its tensors requires grad; call it under "
                    "torch.no_grad()");
      }
    }
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

}  // namespace

#define KSEED_WRITING_OPS(X) \
  X("gaussian_") X("rademacher_") X("apply_seeds_") X("apply_seeds_multi_") X("apply_seeds_out") \
  X("apply_seeds_multi_out")
TORCH_LIBRARY_IMPL(kseed, ADInplaceOrView, m) {
#define KSEED_IMPL(name) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  KSEED_WRITING_OPS(KSEED_IMPL)
#undef KSEED_IMPL
}
TORCH_LIBRARY_IMPL(kseed, Autograd, m) {
#define KSEED_IMPL(name) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_requires_grad>());
  KSEED_WRITING_OPS(KSEED_IMPL)
#undef KSEED_IMPL
}
#undef KSEED_WRITING_OPS

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
