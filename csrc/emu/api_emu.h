// SPDX-License-Identifier: Apache-2.0
// Entry points of the CUDA-kernel emulator: the same kernels and launch plan as api_cuda.h, run
// on host memory by host threads (exec_ctx.cuh). Same argument structs as the CUDA twins, minus
// the stream. For tests only: an emulated launch runs one OS thread per CUDA thread of a block.
#pragma once

#include <cstddef>

#include "diffrepro/args.h"
#include "diffrepro/config.h"
#include "diffrepro/status.h"

namespace diffrepro {

template <class T>
Status empirical_denoiser_emu(const DenoiserArgs<T>& a, const Tuning& t);

std::size_t empirical_denoiser_emu_workspace_bytes(index_t Q, index_t N, index_t D, int config,
                                                   int splits);

// The pruned kernel (pruned_denoiser_cuda's rules), and its workspace.
template <class T>
Status pruned_denoiser_emu(const DenoiserArgs<T>& a, const PruneArgs<T>& p, const Tuning& t);

std::size_t pruned_denoiser_emu_workspace_bytes(index_t Q, index_t N, index_t D, index_t tile_rows,
                                                int config, int splits);

// The configuration the pruned kernel runs for these sizes and tile_rows, -1 if none fits.
int pruned_denoiser_emu_config(index_t Q, index_t N, index_t tile_rows, int config);

Status nn_search_emu(const SearchArgs& a, const Tuning& t);

std::size_t nn_search_emu_workspace_bytes(index_t Q, index_t N, index_t D, int k, int config,
                                          int splits);

}  // namespace diffrepro
