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

std::size_t empirical_denoiser_emu_workspace_bytes(index_t Q, index_t N, index_t D, int config,
                                                   int splits) {
  // Same sizing rule as empirical_denoiser_cuda_workspace_bytes (double accumulators).
  return detail::denoiser_workspace_bytes(Q, N, D, config, splits, sizeof(double));
}

}  // namespace diffrepro
