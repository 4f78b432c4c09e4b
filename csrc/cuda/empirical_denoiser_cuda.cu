// SPDX-License-Identifier: Apache-2.0
// CUDA entry points of the empirical denoiser: a file-static launcher over the plan and kernels
// of empirical_denoiser_kernel.cuh (the same source the emulator tests run).
#include "diffrepro/api_cuda.h"
#include "empirical_denoiser_kernel.cuh"

namespace diffrepro {
namespace {

// Checks cudaGetLastError() after each of its (at most two) launches, inside launch_kernel.
template <class T>
Status launch_empirical_denoiser(const T* x, const void* y, RowType y_type, index_t Q, index_t N,
                                 index_t D, const T* center, const double* inv_sigma2,
                                 index_t row_offset, void* workspace, double* max_logit,
                                 double* sum_exp, double* sum_exp_sq, T* weighted_sum,
                                 index_t* nearest_index, double* nearest_sqdist, void* stream,
                                 int config, int splits) {
  return detail::denoiser_run<T>(x, y, y_type, Q, N, D, center, inv_sigma2, row_offset,
                                 workspace, max_logit, sum_exp, sum_exp_sq, weighted_sum,
                                 nearest_index, nearest_sqdist, stream, config, splits);
}

}  // namespace

Status empirical_denoiser_cuda(const float* x, const void* y, RowType y_type, index_t Q,
                               index_t N, index_t D, const float* center,
                               const double* inv_sigma2, index_t row_offset, void* workspace,
                               double* max_logit, double* sum_exp, double* sum_exp_sq,
                               float* weighted_sum, index_t* nearest_index,
                               double* nearest_sqdist, void* stream, int config, int splits) {
  return launch_empirical_denoiser<float>(x, y, y_type, Q, N, D, center, inv_sigma2, row_offset,
                                          workspace, max_logit, sum_exp, sum_exp_sq,
                                          weighted_sum, nearest_index, nearest_sqdist, stream,
                                          config, splits);
}

Status empirical_denoiser_cuda(const double* x, const void* y, RowType y_type, index_t Q,
                               index_t N, index_t D, const double* center,
                               const double* inv_sigma2, index_t row_offset, void* workspace,
                               double* max_logit, double* sum_exp, double* sum_exp_sq,
                               double* weighted_sum, index_t* nearest_index,
                               double* nearest_sqdist, void* stream, int config, int splits) {
  return launch_empirical_denoiser<double>(x, y, y_type, Q, N, D, center, inv_sigma2, row_offset,
                                           workspace, max_logit, sum_exp, sum_exp_sq,
                                           weighted_sum, nearest_index, nearest_sqdist, stream,
                                           config, splits);
}

std::size_t empirical_denoiser_cuda_workspace_bytes(index_t Q, index_t N, index_t D, int config,
                                                    int splits) {
  // Sized for double accumulators so one number serves both precisions.
  return detail::denoiser_workspace_bytes(Q, N, D, config, splits, sizeof(double));
}

const char* cuda_last_error_message() { return detail::g_last_cuda_error; }

// nvcc defines __CUDA_ARCH_LIST__ (CUDA >= 11.5) in every compilation pass, host included.
#define DR_STR2(...) #__VA_ARGS__
#define DR_STR(...) DR_STR2(__VA_ARGS__)
const char* cuda_compiled_archs() {
#if defined(__CUDA_ARCH_LIST__)
  return DR_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

}  // namespace diffrepro
