// SPDX-License-Identifier: Apache-2.0
// Host build of the CUDA empirical-denoiser kernels: empirical_denoiser_kernel.cuh compiled by
// the host compiler, so exec_ctx.cuh maps every launch onto the thread emulator.
#if defined(__CUDACC__)
#error "csrc/emu is host-only: compile it with the host C++20 compiler"
#endif

#include "api_emu.h"
#include "../cuda/empirical_denoiser_kernel.cuh"

namespace diffrepro {

template <class T>
Status empirical_denoiser_emu(const DenoiserArgs<T>& a, const Tuning& t) {
  return detail::denoiser_run<T>(a, t, /*stream=*/nullptr);
}

template Status empirical_denoiser_emu<float>(const DenoiserArgs<float>&, const Tuning&);
template Status empirical_denoiser_emu<double>(const DenoiserArgs<double>&, const Tuning&);

template <class T>
Status pruned_denoiser_emu(const DenoiserArgs<T>& a, const PruneArgs<T>& p, const Tuning& t) {
  return detail::denoiser_run<T, /*kPrune=*/true>(a, t, /*stream=*/nullptr, p);
}

template Status pruned_denoiser_emu<float>(const DenoiserArgs<float>&, const PruneArgs<float>&,
                                           const Tuning&);
template Status pruned_denoiser_emu<double>(const DenoiserArgs<double>&, const PruneArgs<double>&,
                                            const Tuning&);

std::size_t pruned_denoiser_emu_workspace_bytes(index_t Q, index_t N, index_t D, index_t tile_rows,
                                                int config, int splits) {
  return detail::denoiser_workspace_bytes(Q, N, D, config, splits, sizeof(double), tile_rows);
}

int pruned_denoiser_emu_config(index_t Q, index_t N, index_t tile_rows, int config) {
  return detail::pruned_config(Q, N, tile_rows, config);
}

std::size_t empirical_denoiser_emu_workspace_bytes(index_t Q, index_t N, index_t D, int config,
                                                   int splits) {
  // Same sizing rule as empirical_denoiser_cuda_workspace_bytes (double accumulators).
  return detail::denoiser_workspace_bytes(Q, N, D, config, splits, sizeof(double));
}

}  // namespace diffrepro
