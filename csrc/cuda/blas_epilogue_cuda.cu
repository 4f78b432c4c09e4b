// SPDX-License-Identifier: Apache-2.0
// CUDA entry points of the BLAS engine's epilogue kernels: thin wrappers over the launchers of
// blas_epilogue.cuh (the same source the emulator tests run).
#include "blas_epilogue.cuh"
#include "diffrepro/api_blas_epilogue.h"

namespace diffrepro {
static_assert(kBlasTopkMaxK == detail::kTopkMaxK, "public and kernel max k must agree");

Status blas_softmax_chunk_cuda(const float* g, index_t ldg, index_t Q, index_t C, const double* y_half,
                               const double* x_half, const double* inv_sigma2, const float* x, const void* rows,
                               RowType rows_type, index_t D, double unit_roundoff, index_t chunk_offset,
                               double* max_score, double* sum_exp, double* sum_exp_sq, double* scale_old,
                               double* nearest_sqdist, index_t* nearest_index, float* p, index_t ldp,
                               void* stream) {
  return detail::softmax_chunk<float>(g, ldg, Q, C, y_half, x_half, inv_sigma2, x, rows, rows_type, D, unit_roundoff,
                                  chunk_offset, max_score, sum_exp, sum_exp_sq, scale_old, nearest_sqdist,
                                  nearest_index, p, ldp, stream);
}

Status blas_softmax_chunk_cuda(const double* g, index_t ldg, index_t Q, index_t C, const double* y_half,
                               const double* x_half, const double* inv_sigma2, const double* x, const void* rows,
                               RowType rows_type, index_t D, double unit_roundoff, index_t chunk_offset,
                               double* max_score, double* sum_exp, double* sum_exp_sq, double* scale_old,
                               double* nearest_sqdist, index_t* nearest_index, double* p, index_t ldp,
                               void* stream) {
  return detail::softmax_chunk<double>(g, ldg, Q, C, y_half, x_half, inv_sigma2, x, rows, rows_type, D, unit_roundoff,
                                  chunk_offset, max_score, sum_exp, sum_exp_sq, scale_old, nearest_sqdist,
                                  nearest_index, p, ldp, stream);
}

Status blas_scale_accumulate_cuda(const float* a, index_t lda, index_t Q, index_t D, const double* scale_old,
                                  double* acc, void* stream) {
  return detail::scale_accumulate<float>(a, lda, Q, D, scale_old, acc, stream);
}

Status blas_scale_accumulate_cuda(const double* a, index_t lda, index_t Q, index_t D, const double* scale_old,
                                  double* acc, void* stream) {
  return detail::scale_accumulate<double>(a, lda, Q, D, scale_old, acc, stream);
}

Status blas_chunk_topk_cuda(const float* scores, index_t lds, index_t Q, index_t C, int k, bool largest,
                            index_t chunk_offset, float* out_values, index_t* out_indices, void* stream) {
  return detail::chunk_topk(scores, lds, Q, C, k, largest, chunk_offset, out_values, out_indices, stream);
}

Status blas_merge_topk_cuda(index_t Q, int k, bool largest, const float* run_v, const index_t* run_i,
                            const float* chunk_v, const index_t* chunk_i, float* out_v, index_t* out_i,
                            void* stream) {
  return detail::merge_topk(Q, k, largest, run_v, run_i, chunk_v, chunk_i, out_v, out_i, stream);
}

}  // namespace diffrepro
