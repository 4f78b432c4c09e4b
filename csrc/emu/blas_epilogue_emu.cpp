// SPDX-License-Identifier: Apache-2.0
// Host build of the BLAS engine's epilogue kernels (csrc/cuda/blas_epilogue.cuh) under the thread
// emulator, with C entry points (status code as int) so tests can drive them through ctypes on
// host buffers before they are bound into diffrepro._cuda_emu. Same argument order as the CUDA
// launchers, minus the stream.
#if defined(__CUDACC__)
#error "csrc/emu is host-only: compile it with the host C++20 compiler"
#endif

#include "../cuda/blas_epilogue.cuh"

using diffrepro::index_t;
using diffrepro::RowType;
namespace dd = diffrepro::detail;

#define DR_EMU_API extern "C" __attribute__((visibility("default"))) int

DR_EMU_API dr_emu_softmax_chunk_f32(const float* g, index_t ldg, index_t Q, index_t C, const double* y_half,
                                    const double* x_half, const double* inv_sigma2, const float* x, const void* rows,
                                    int rows_type, index_t D, double unit_roundoff, index_t chunk_offset,
                                    double* max_score, double* sum_exp, double* sum_exp_sq, double* scale_old,
                                    double* nearest_sqdist, index_t* nearest_index, float* p, index_t ldp) {
  return static_cast<int>(dd::softmax_chunk<float>(g, ldg, Q, C, y_half, x_half, inv_sigma2, x, rows,
                                               static_cast<RowType>(rows_type), D, unit_roundoff, chunk_offset,
                                               max_score, sum_exp, sum_exp_sq, scale_old, nearest_sqdist,
                                               nearest_index, p, ldp, nullptr));
}

DR_EMU_API dr_emu_softmax_chunk_f64(const double* g, index_t ldg, index_t Q, index_t C, const double* y_half,
                                    const double* x_half, const double* inv_sigma2, const double* x, const void* rows,
                                    int rows_type, index_t D, double unit_roundoff, index_t chunk_offset,
                                    double* max_score, double* sum_exp, double* sum_exp_sq, double* scale_old,
                                    double* nearest_sqdist, index_t* nearest_index, double* p, index_t ldp) {
  return static_cast<int>(dd::softmax_chunk<double>(g, ldg, Q, C, y_half, x_half, inv_sigma2, x, rows,
                                               static_cast<RowType>(rows_type), D, unit_roundoff, chunk_offset,
                                               max_score, sum_exp, sum_exp_sq, scale_old, nearest_sqdist,
                                               nearest_index, p, ldp, nullptr));
}

DR_EMU_API dr_emu_scale_accumulate_f32(const float* a, index_t lda, index_t Q, index_t D, const double* scale_old,
                                       double* acc) {
  return static_cast<int>(dd::scale_accumulate<float>(a, lda, Q, D, scale_old, acc, nullptr));
}

DR_EMU_API dr_emu_scale_accumulate_f64(const double* a, index_t lda, index_t Q, index_t D, const double* scale_old,
                                       double* acc) {
  return static_cast<int>(dd::scale_accumulate<double>(a, lda, Q, D, scale_old, acc, nullptr));
}

DR_EMU_API dr_emu_chunk_topk(const float* scores, index_t lds, index_t Q, index_t C, int k, bool largest,
                             index_t chunk_offset, float* out_values, index_t* out_indices) {
  return static_cast<int>(dd::chunk_topk(scores, lds, Q, C, k, largest, chunk_offset, out_values, out_indices,
                                         nullptr));
}

DR_EMU_API dr_emu_merge_topk(index_t Q, int k, bool largest, const float* run_v, const index_t* run_i,
                             const float* chunk_v, const index_t* chunk_i, float* out_v, index_t* out_i) {
  return static_cast<int>(dd::merge_topk(Q, k, largest, run_v, run_i, chunk_v, chunk_i, out_v, out_i, nullptr));
}
