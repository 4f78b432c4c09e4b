// SPDX-License-Identifier: Apache-2.0
// Entry points of the CUDA-kernel emulator: the same kernels and launch plan as api_cuda.h, run
// on host memory by host threads (exec_ctx.cuh). Same parameters as the CUDA twins, minus the
// stream. For tests only: an emulated launch runs one OS thread per CUDA thread of a block.
#pragma once

#include <cstddef>

#include "diffrepro/config.h"
#include "diffrepro/status.h"

namespace diffrepro {

// Largest k of nn_search_emu (the kernels' kNNMaxK; equal to kNNSearchCudaMaxK).
inline constexpr int kNNSearchEmuMaxK = 128;

template <class T>
Status empirical_denoiser_emu(const T* x,                     // [Q, D]
                              const void* y, RowType y_type,  // [N, D]
                              index_t Q, index_t N, index_t D,
                              const T* center,                // [D]
                              const double* inv_sigma2,       // [Q]
                              index_t row_offset,
                              void* workspace,                // [workspace_bytes] host bytes
                              double* max_logit,              // [Q]
                              double* sum_exp,                // [Q]
                              double* sum_exp_sq,             // [Q]
                              T* weighted_sum,                // [Q, D]
                              index_t* nearest_index,         // [Q]
                              double* nearest_sqdist,         // [Q]
                              int config, int splits);

std::size_t empirical_denoiser_emu_workspace_bytes(index_t Q, index_t N, index_t D, int config,
                                                   int splits);

Status nn_search_emu(const float* queries,                 // [Q, D]
                     const void* refs, RowType refs_type,  // [N, D]
                     index_t Q, index_t N, index_t D, int k, bool inner_product,
                     index_t row_offset,
                     float* values,                        // [Q, k]
                     index_t* indices,                     // [Q, k]
                     void* workspace,                      // [workspace_bytes] host bytes
                     int config, int splits);

std::size_t nn_search_emu_workspace_bytes(index_t Q, index_t N, index_t D, int k, int config,
                                          int splits);

}  // namespace diffrepro
