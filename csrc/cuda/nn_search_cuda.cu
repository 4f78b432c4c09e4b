// SPDX-License-Identifier: Apache-2.0
// CUDA entry points of the nearest-neighbour search: a file-static launcher over the plan and
// kernels of nn_search_kernel.cuh (the same source the emulator tests run).
#include "diffrepro/api_cuda.h"
#include "nn_search_kernel.cuh"

namespace diffrepro {
static_assert(kNNSearchCudaMaxK == detail::kNNMaxK, "public and kernel max k must agree");

namespace {

// Partial kernel, then (only when the rows were split across blocks) the merge kernel; each
// launch is followed by cudaGetLastError() inside launch_kernel.
Status launch_nn_search(const float* queries, const void* refs, RowType refs_type, index_t Q,
                        index_t N, index_t D, int k, bool inner_product, index_t row_offset,
                        float* values, index_t* indices, void* workspace, void* stream,
                        int config, int splits) {
  return detail::nn_run(queries, refs, refs_type, Q, N, D, k, inner_product, row_offset, values,
                        indices, workspace, stream, config, splits);
}

}  // namespace

Status nn_search_cuda(const float* queries, const void* refs, RowType refs_type, index_t Q,
                      index_t N, index_t D, int k, bool inner_product, index_t row_offset,
                      float* values, index_t* indices, void* workspace, void* stream, int config,
                      int splits) {
  return launch_nn_search(queries, refs, refs_type, Q, N, D, k, inner_product, row_offset,
                          values, indices, workspace, stream, config, splits);
}

std::size_t nn_search_cuda_workspace_bytes(index_t Q, index_t N, index_t D, int k, int config,
                                           int splits) {
  return detail::nn_workspace_bytes(Q, N, D, k, config, splits);
}

}  // namespace diffrepro
