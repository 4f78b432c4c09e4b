// SPDX-License-Identifier: Apache-2.0
// Execution-context layer: kernels are written once against these names and compile either with
// nvcc (real CUDA) or with a host C++20 compiler, where a CPU emulator runs them (one OS thread per
// CUDA thread of a block, std::barrier for __syncthreads, per-warp buffers for shuffles).
//
// This is the one .cuh that must also compile with g++ -std=c++20: it is the seam between the two
// worlds, so it tests __CUDACC__ itself (config.h does the same for DR_HD).
//
// Vocabulary (identical under both compilers):
//   DR_KERNEL           __global__ (emulation: an ordinary function)
//   DR_DEVICE           device helper called from kernels (forceinline)
//   DR_SHARED           __shared__ (emulation: function-static; blocks of one launch run one after
//                       another and launches are serialised, so no two blocks ever share it)
//   dr_sync()           __syncthreads(); it must be reached by every thread of the block, in
//                       uniform control flow, or the emulator deadlocks (as real CUDA may hang)
//   dr_tid_x/y, dr_bid_x/y, dr_bdim_x/y, dr_gdim_x/y, dr_tid() (linear), dr_lane(), dr_warp()
//   dr_shfl_xor/down/idx(v, ...)   full-warp shuffles of 4- or 8-byte values; all 32 lanes of the
//                       warp must call them (blocks are multiples of 32 threads in our kernels)
//   launch_kernel(kernel, grid, block, stream, args...) -> Status; after a real launch it checks
//                       cudaGetLastError() (never synchronises: the caller's stream orders work)
#pragma once

#include <cstdint>

#include "diffrepro/config.h"
#include "diffrepro/status.h"

namespace diffrepro {

// Grid / block extent, 1-D or 2-D (z is always 1 in this project).
struct Dim2 {
  unsigned x = 1;
  unsigned y = 1;
};

// Threads per warp. Every kernel's block size is a multiple of this.
inline constexpr int kWarpSize = 32;

}  // namespace diffrepro

#if defined(__CUDACC__)
// ------------------------------------------------------------------------------------------------
// Real CUDA.
// ------------------------------------------------------------------------------------------------
#include <cuda_runtime.h>

#include <utility>

#define DR_KERNEL __global__
#define DR_DEVICE __device__ __forceinline__
#define DR_SHARED __shared__

namespace diffrepro {

DR_DEVICE void dr_sync() { __syncthreads(); }
DR_DEVICE unsigned dr_tid_x() { return threadIdx.x; }
DR_DEVICE unsigned dr_tid_y() { return threadIdx.y; }
DR_DEVICE unsigned dr_bid_x() { return blockIdx.x; }
DR_DEVICE unsigned dr_bid_y() { return blockIdx.y; }
DR_DEVICE unsigned dr_bdim_x() { return blockDim.x; }
DR_DEVICE unsigned dr_bdim_y() { return blockDim.y; }
DR_DEVICE unsigned dr_gdim_x() { return gridDim.x; }
DR_DEVICE unsigned dr_gdim_y() { return gridDim.y; }

template <class V>
DR_DEVICE V dr_shfl_xor(V v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
template <class V>
DR_DEVICE V dr_shfl_down(V v, int delta) {
  return __shfl_down_sync(0xffffffffu, v, delta);
}
template <class V>
DR_DEVICE V dr_shfl_idx(V v, int src_lane) {
  return __shfl_sync(0xffffffffu, v, src_lane);
}
DR_DEVICE void dr_syncwarp() { __syncwarp(); }

namespace detail {
// Message of the last failed launch on this host thread (cudaGetErrorName: cudaGetErrorString).
inline thread_local char g_last_cuda_error[256] = "";

inline Status record_cuda_error(cudaError_t e) {
  if (e == cudaSuccess) return Status::kOk;
  const char* name = cudaGetErrorName(e);
  const char* text = cudaGetErrorString(e);
  int i = 0;
  for (const char* p = name; p && *p && i < 120; ++p) g_last_cuda_error[i++] = *p;
  g_last_cuda_error[i++] = ':';
  g_last_cuda_error[i++] = ' ';
  for (const char* p = text; p && *p && i < 254; ++p) g_last_cuda_error[i++] = *p;
  g_last_cuda_error[i] = '\0';
  return Status::kCudaError;
}
}  // namespace detail

// Launches on `stream` (a cudaStream_t passed as void*; nullptr = legacy default stream) and
// reports launch errors (bad configuration, no device, missing kernel image) as kCudaError.
template <class... P, class... A>
Status launch_kernel(void (*kernel)(P...), Dim2 grid, Dim2 block, void* stream, A&&... args) {
  kernel<<<dim3(grid.x, grid.y, 1), dim3(block.x, block.y, 1), 0,
           static_cast<cudaStream_t>(stream)>>>(std::forward<A>(args)...);
  return detail::record_cuda_error(cudaGetLastError());
}

}  // namespace diffrepro

#else
// ------------------------------------------------------------------------------------------------
// CPU emulation (host C++20).
// ------------------------------------------------------------------------------------------------
#include <barrier>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define DR_KERNEL
#define DR_DEVICE inline
#define DR_SHARED static

namespace diffrepro {
namespace emu {

// Per-OS-thread view of "which CUDA thread am I". Set by the launcher before the kernel runs.
struct ThreadCtx {
  Dim2 tid, bid, bdim, gdim;
  std::barrier<>* block_bar = nullptr;  // all threads of the block (__syncthreads)
  std::barrier<>* warp_bar = nullptr;   // the 32 (or fewer, last warp) threads of this warp
  std::uint64_t* warp_buf = nullptr;    // two banks of one 8-byte slot per lane of this warp
  unsigned shfl_bank = 0;               // bank of this thread's next shuffle (alternates)
};
inline thread_local ThreadCtx t_ctx;

// Serialises launches: function-static "shared memory" is one object per kernel instantiation,
// so two launches running at once (two Python threads without the GIL) would trample it.
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Runs `body` for every block of `grid` (x fastest, then y) with `block` concurrent OS threads.
// Threads are created once per launch and walk the blocks in order; a barrier after each block
// guarantees no thread starts block b+1 while another still reads block b's shared memory.
inline void run_grid(Dim2 grid, Dim2 block, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  const unsigned nt = block.x * block.y;
  if (nt == 0 || grid.x == 0 || grid.y == 0) return;
  const unsigned nw = (nt + kWarpSize - 1) / kWarpSize;
  std::barrier<> block_bar(static_cast<std::ptrdiff_t>(nt));
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  for (unsigned w = 0; w < nw; ++w) {
    const unsigned lanes = nt - w * kWarpSize < unsigned(kWarpSize) ? nt - w * kWarpSize : kWarpSize;
    warp_bars.emplace_back(std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(lanes)));
  }
  std::vector<std::uint64_t> warp_buf(std::size_t(nw) * 2 * kWarpSize, 0);
  std::vector<std::thread> threads;
  threads.reserve(nt);
  for (unsigned t = 0; t < nt; ++t) {
    threads.emplace_back([&, t] {
      ThreadCtx& c = t_ctx;
      c.tid = Dim2{t % block.x, t / block.x};
      c.bdim = block;
      c.gdim = grid;
      c.block_bar = &block_bar;
      c.warp_bar = warp_bars[t / kWarpSize].get();
      c.warp_buf = &warp_buf[std::size_t(t / kWarpSize) * 2 * kWarpSize];
      c.shfl_bank = 0;
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          c.bid = Dim2{bx, by};
          body();
          block_bar.arrive_and_wait();  // end of block: shared memory may be reused
        }
      }
    });
  }
  for (auto& th : threads) th.join();
}

}  // namespace emu

inline void dr_sync() { emu::t_ctx.block_bar->arrive_and_wait(); }
inline unsigned dr_tid_x() { return emu::t_ctx.tid.x; }
inline unsigned dr_tid_y() { return emu::t_ctx.tid.y; }
inline unsigned dr_bid_x() { return emu::t_ctx.bid.x; }
inline unsigned dr_bid_y() { return emu::t_ctx.bid.y; }
inline unsigned dr_bdim_x() { return emu::t_ctx.bdim.x; }
inline unsigned dr_bdim_y() { return emu::t_ctx.bdim.y; }
inline unsigned dr_gdim_x() { return emu::t_ctx.gdim.x; }
inline unsigned dr_gdim_y() { return emu::t_ctx.gdim.y; }
inline void dr_syncwarp() { emu::t_ctx.warp_bar->arrive_and_wait(); }

namespace emu {
// Generic shuffle: every lane publishes its value, the warp meets, each lane reads the slot of
// `src(lane)`. Consecutive shuffles alternate between two banks, so one barrier per shuffle
// suffices: a lane can only write bank b again (two shuffles later) after the whole warp has
// passed the barrier of the shuffle in between, i.e. after every lane finished reading bank b.
// A source lane outside the warp returns the caller's own value, as __shfl_down_sync does.
template <class V, class SrcFn>
V shuffle(V v, SrcFn src) {
  static_assert(sizeof(V) <= sizeof(std::uint64_t) && std::is_trivially_copyable_v<V>,
                "emulated shuffles move values of at most 8 bytes");
  ThreadCtx& c = t_ctx;
  const unsigned lin = c.tid.x + c.tid.y * c.bdim.x;
  const unsigned lane = lin % kWarpSize;
  const unsigned nt = c.bdim.x * c.bdim.y;
  const unsigned lanes = nt - (lin - lane) < unsigned(kWarpSize) ? nt - (lin - lane) : kWarpSize;
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  std::uint64_t* bank = c.warp_buf + c.shfl_bank * kWarpSize;
  c.shfl_bank ^= 1u;
  bank[lane] = bits;
  c.warp_bar->arrive_and_wait();
  const int s = src(static_cast<int>(lane));
  V r = v;
  if (s >= 0 && s < static_cast<int>(lanes)) std::memcpy(&r, &bank[s], sizeof(V));
  return r;
}
}  // namespace emu

template <class V>
inline V dr_shfl_xor(V v, int lane_mask) {
  return emu::shuffle(v, [lane_mask](int l) { return l ^ lane_mask; });
}
template <class V>
inline V dr_shfl_down(V v, int delta) {
  return emu::shuffle(v, [delta](int l) { return l + delta < kWarpSize ? l + delta : -1; });
}
template <class V>
inline V dr_shfl_idx(V v, int src_lane) {
  return emu::shuffle(v, [src_lane](int) { return src_lane; });
}

// Emulated launch: runs the whole grid synchronously on the calling thread's behalf. There is no
// launch error to report; the stream is ignored (host memory, sequential semantics).
template <class... P, class... A>
Status launch_kernel(void (*kernel)(P...), Dim2 grid, Dim2 block, void* /*stream*/, A&&... args) {
  emu::run_grid(grid, block, [&] { kernel(args...); });
  return Status::kOk;
}

}  // namespace diffrepro

#endif

namespace diffrepro {

// Linear thread index within the block, lane and warp (row-major over (x, y), as CUDA numbers
// threads into warps).
DR_DEVICE unsigned dr_tid() { return dr_tid_x() + dr_tid_y() * dr_bdim_x(); }
DR_DEVICE unsigned dr_lane() { return dr_tid() % kWarpSize; }
DR_DEVICE unsigned dr_warp() { return dr_tid() / kWarpSize; }

}  // namespace diffrepro
