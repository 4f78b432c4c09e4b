// SPDX-License-Identifier: Apache-2.0
// Host build of the CUDA nearest-neighbour kernels: nn_search_kernel.cuh compiled by the host
// compiler, so exec_ctx.cuh maps every launch onto the thread emulator.
#if defined(__CUDACC__)
#error "csrc/emu is host-only: compile it with the host C++20 compiler"
#endif

#include "api_emu.h"
#include "../cuda/nn_search_kernel.cuh"

namespace diffrepro {
static_assert(kNNSearchEmuMaxK == detail::kNNMaxK, "emulator and kernel max k must agree");

Status nn_search_emu(const float* queries, const void* refs, RowType refs_type, index_t Q,
                     index_t N, index_t D, int k, bool inner_product, index_t row_offset,
                     float* values, index_t* indices, void* workspace, int config, int splits) {
  return detail::nn_run(queries, refs, refs_type, Q, N, D, k, inner_product, row_offset, values,
                        indices, workspace, /*stream=*/nullptr, config, splits);
}

std::size_t nn_search_emu_workspace_bytes(index_t Q, index_t N, index_t D, int k, int config,
                                          int splits) {
  return detail::nn_workspace_bytes(Q, N, D, k, config, splits);
}

}  // namespace diffrepro
