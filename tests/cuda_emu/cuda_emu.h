// A host emulation of the CUDA execution model: just enough of it to run kseed's CUDA kernels
// (csrc/cuda/kseed_cuda_kernels.cu) on the CPU, compiled by a host C++ compiler, so that a machine
// without a GPU tests their logic (tiling, the device-side tensor table, seed staging in shared memory,
// the K loop, vector and scalar element I/O, the tails, rounding) bitwise against the reference.
//
// Model: a launch runs its blocks one after another; each block runs blockDim.x OS threads, so
// __syncthreads() is a real barrier and __shared__ variables (function statics here) are shared by the
// block's threads.  __shfl_xor_sync is emulated with a block-wide exchange, so every thread of the block
// must call it (kseed's kernels do).  Device intrinsics (__fadd_rn, ...) are not used: without
// __CUDA_ARCH__ the scalar core takes its host path (plain IEEE ops, built with -ffp-contract=off).  The
// PTX of the real build is checked separately (tests/test_cuda_compile.py).
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace kseed_emu {

class Barrier {
 public:
  explicit Barrier(unsigned n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const unsigned long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen != gen_; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  unsigned n_, count_ = 0;
  unsigned long gen_ = 0;
};

inline thread_local uint3 t_thread;
inline thread_local uint3 t_block;
inline dim3 g_grid, g_block;  // of the launch in progress (launches run one at a time)
inline Barrier* g_barrier = nullptr;
inline std::vector<float> g_exchange;
inline unsigned long long g_launches = 0, g_threads = 0;

template <typename... P>
struct Launch {
  dim3 grid, block;
  void (*kernel)(P...);

  template <typename... A>
  void operator()(A... args) const {
    if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1 || block.x == 0 ||
        block.x > 1024) {
      std::fprintf(stderr, "cuda_emu: unsupported launch geometry\n");
      std::exit(3);
    }
    g_grid = grid;
    g_block = block;
    g_exchange.assign(block.x, 0.0f);
    ++g_launches;
    for (unsigned b = 0; b < grid.x; ++b) {
      Barrier barrier(block.x);
      g_barrier = &barrier;
      std::vector<std::thread> threads;
      threads.reserve(block.x);
      for (unsigned t = 0; t < block.x; ++t) {
        threads.emplace_back([=] {
          t_thread = uint3{t, 0, 0};
          t_block = uint3{b, 0, 0};
          kernel(P(args)...);
        });
      }
      for (std::thread& th : threads) th.join();
      g_threads += block.x;
      g_barrier = nullptr;
    }
  }
};

template <typename... P>
Launch<P...> launch(dim3 grid, dim3 block, void (*kernel)(P...)) {
  return Launch<P...>{grid, block, kernel};
}

}  // namespace kseed_emu

#define threadIdx (::kseed_emu::t_thread)
#define blockIdx (::kseed_emu::t_block)
#define blockDim (::kseed_emu::g_block)
#define gridDim (::kseed_emu::g_grid)

inline void __syncthreads() { ::kseed_emu::g_barrier->wait(); }

// Every thread of the block must call it (a block-wide exchange through a buffer).
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask, int width = 32) {
  const unsigned t = threadIdx.x;
  const unsigned src = (t & ~unsigned(width - 1)) | ((t ^ unsigned(lane_mask)) & unsigned(width - 1));
  ::kseed_emu::g_exchange[t] = v;
  __syncthreads();
  const float r = ::kseed_emu::g_exchange[src];
  __syncthreads();
  return r;
}

#define KSEED_LAUNCH(grid, block, cu_stream, ...) \
  ((void)(cu_stream), ::kseed_emu::launch(dim3(grid), dim3(block), __VA_ARGS__))
