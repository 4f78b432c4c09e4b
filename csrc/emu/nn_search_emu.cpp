// SPDX-License-Identifier: Apache-2.0
// Host build of the CUDA nearest-neighbour kernels: nn_search_kernel.cuh compiled by the host
// compiler, so exec_ctx.cuh maps every launch onto the thread emulator.
#if defined(__CUDACC__)
#error "csrc/emu is host-only: compile it with the host C++20 compiler"
#endif

#include "api_emu.h"
#include "../cuda/nn_search_kernel.cuh"

namespace diffrepro {

Status nn_search_emu(const SearchArgs& a, const Tuning& t) {
  return detail::nn_run(a, t, /*stream=*/nullptr);
}

std::size_t nn_search_emu_workspace_bytes(index_t Q, index_t N, index_t D, int k, int config,
                                          int splits) {
  return detail::nn_workspace_bytes(Q, N, D, k, config, splits);
}

}  // namespace diffrepro
