// The multi-tensor plan of one apply call, shared by the CPU binding (csrc/ops_cpu.cpp), the CUDA
// binding and kernels (csrc/cuda/) and the CUDA emulation (tests/cuda_emu): torch-free, host and device.
//
// An apply call updates a list of tensors, each with its own stream id, out[i] = round(base[i] + acc)
// with base == out for the in-place update.  The plan groups the tensors by dtype (one CUDA launch, one
// CPU parallel loop per group), cuts each tensor into tiles of a fixed number of elements and numbers
// the tiles of a group consecutively: row r of a group owns tiles [first_tile, first_tile + tiles_of(n)).
// A worker (a CUDA CTA, a CPU thread's tile) finds its row by binary search on first_tile (find_row).
//
// The Triton backend mirrors this layout in an int64 table whose rows are the fields of PlanRow in
// this order (kseed_kernels/_spec.py: PLAN_FIELDS; tests/test_layout.py checks the two agree).
#pragma once
#include <cstdint>
#include <map>
#include <vector>

#include "kseed_core.h"  // KSEED_HD
#include "kseed_types.h"

namespace kseed {

// One tensor of an apply call (also a row of the CUDA device-side table; 40 bytes).
struct PlanRow {
  const void* src;     // elements read: the base (== dst for the in-place update)
  void* dst;           // elements written, numel contiguous elements of the group's dtype
  int64_t numel;
  uint32_t stream;     // the tensor's stream id
  uint32_t reserved;   // project_seeds (a read-only call, rows in list order): the tensor's DType
  int64_t first_tile;  // index of the tensor's first tile within its group
};
static_assert(sizeof(PlanRow) == 40, "PlanRow must be 40 bytes");

// The benchmark-floor op (kseed::_noise_floor) writes one float per this many elements on every device
// (the CUDA apply tile, kseed::cuda::kTileElems).
constexpr int64_t kFloorTileElems = 2048;

inline int64_t tiles_of(int64_t numel, int64_t tile_elems) {
  return (numel + tile_elems - 1) / tile_elems;
}

// The last row whose first_tile <= tile (rows sorted by first_tile, the first one 0; n >= 1).
KSEED_HD int find_row(const PlanRow* rows, int n, int64_t tile) {
  int lo = 0, size = n;
  while (size > 1) {
    const int half = size >> 1;
    if (rows[lo + half].first_tile <= tile) lo += half;
    size -= half;
  }
  return lo;
}

// The tensors of one dtype, with the number of tiles they hold and whether every src and dst pointer is
// aligned for 4-element vector I/O (16 bytes for float32, 8 for the 16-bit types).
struct PlanGroup {
  DType dtype = DType::F32;
  std::vector<PlanRow> rows;
  int64_t tiles = 0;
  bool aligned = true;
};

class ApplyPlan {
 public:
  explicit ApplyPlan(int64_t tile_elems) : tile_elems_(tile_elems) {}

  // Adds a tensor of numel > 0 elements of `dtype`: read at src, written at dst (src == dst: in place).
  void add(DType dtype, const void* src, void* dst, int64_t numel, uint32_t stream) {
    PlanGroup& g = by_dtype_[int(dtype)];
    g.dtype = dtype;
    g.rows.push_back({src, dst, numel, stream, 0u, g.tiles});
    g.tiles += tiles_of(numel, tile_elems_);
    const uintptr_t align = uintptr_t(4 * dtype_size(dtype));
    g.aligned = g.aligned && reinterpret_cast<uintptr_t>(src) % align == 0 &&
                reinterpret_cast<uintptr_t>(dst) % align == 0;
  }
  bool empty() const { return by_dtype_.empty(); }
  int64_t tile_elems() const { return tile_elems_; }
  // The groups, float32 first, then bfloat16, then float16.
  std::vector<PlanGroup> groups() const {
    std::vector<PlanGroup> out;
    for (const auto& kv : by_dtype_) out.push_back(kv.second);
    return out;
  }

 private:
  int64_t tile_elems_;
  std::map<int, PlanGroup> by_dtype_;
};

}  // namespace kseed
