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
Status empirical_denoiser_emu(const T* x, const void* y, RowType y_type, index_t Q, index_t N,
                              index_t D, const T* center, const double* inv_sigma2,
                              index_t row_offset, void* workspace, double* max_logit,
                              double* sum_exp, double* sum_exp_sq, T* weighted_sum,
                              index_t* nearest_index, double* nearest_sqdist, int config,
                              int splits) {
  return detail::denoiser_run<T>(x, y, y_type, Q, N, D, center, inv_sigma2, row_offset,
                                 workspace, max_logit, sum_exp, sum_exp_sq, weighted_sum,
                                 nearest_index, nearest_sqdist, /*stream=*/nullptr, config,
                                 splits);
}

template Status empirical_denoiser_emu<float>(const float*, const void*, RowType, index_t,
                                              index_t, index_t, const float*, const double*,
                                              index_t, void*, double*, double*, double*, float*,
                                              index_t*, double*, int, int);
template Status empirical_denoiser_emu<double>(const double*, const void*, RowType, index_t,
                                               index_t, index_t, const double*, const double*,
                                               index_t, void*, double*, double*, double*,
                                               double*, index_t*, double*, int, int);

std::size_t empirical_denoiser_emu_workspace_bytes(index_t Q, index_t N, index_t D, int config,
                                                   int splits) {
  // Same sizing rule as empirical_denoiser_cuda_workspace_bytes (double accumulators).
  return detail::denoiser_workspace_bytes(Q, N, D, config, splits, sizeof(double));
}

}  // namespace diffrepro
