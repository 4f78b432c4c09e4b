// SPDX-License-Identifier: Apache-2.0
// CUDA entry points of the nearest-neighbour search: the plan and kernels of nn_search_kernel.cuh
// (the same source the emulator tests run). The partial kernel, then the merge kernel (split
// merge and float64 values of the winners); launch_kernel checks cudaGetLastError().
#include "diffrepro/api_cuda.h"
#include "nn_search_kernel.cuh"

namespace diffrepro {

Status nn_search_cuda(const SearchArgs& a, const Tuning& t, void* stream) {
  return detail::nn_run(a, t, stream);
}

std::size_t nn_search_cuda_workspace_bytes(index_t Q, index_t N, index_t D, int k, int config,
                                           int splits) {
  return detail::nn_workspace_bytes(Q, N, D, k, config, splits);
}

}  // namespace diffrepro
