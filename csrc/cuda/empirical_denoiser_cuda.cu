// SPDX-License-Identifier: Apache-2.0
// CUDA entry points of the empirical denoiser: the plan and kernels of
// empirical_denoiser_kernel.cuh (the same source the emulator tests run). launch_kernel checks
// cudaGetLastError() after each of the (at most two) launches.
#include "diffrepro/api_cuda.h"
#include "empirical_denoiser_kernel.cuh"

namespace diffrepro {

Status empirical_denoiser_cuda(const DenoiserArgs<float>& a, const Tuning& t, void* stream) {
  return detail::denoiser_run<float>(a, t, stream);
}

Status empirical_denoiser_cuda(const DenoiserArgs<double>& a, const Tuning& t, void* stream) {
  return detail::denoiser_run<double>(a, t, stream);
}

Status pruned_denoiser_cuda(const DenoiserArgs<float>& a, const PruneArgs<float>& p, const Tuning& t,
                            void* stream) {
  return detail::denoiser_run<float, /*kPrune=*/true>(a, t, stream, p);
}

Status pruned_denoiser_cuda(const DenoiserArgs<double>& a, const PruneArgs<double>& p,
                            const Tuning& t, void* stream) {
  return detail::denoiser_run<double, /*kPrune=*/true>(a, t, stream, p);
}

std::size_t pruned_denoiser_cuda_workspace_bytes(index_t Q, index_t N, index_t D, index_t tile_rows,
                                                 int config, int splits) {
  return detail::denoiser_workspace_bytes(Q, N, D, config, splits, sizeof(double), tile_rows);
}

int pruned_denoiser_cuda_config(index_t Q, index_t N, index_t tile_rows, int config) {
  return detail::pruned_config(Q, N, tile_rows, config);
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
