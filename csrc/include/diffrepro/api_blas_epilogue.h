// SPDX-License-Identifier: Apache-2.0
// CUDA entry points of the BLAS engine's epilogue kernels (csrc/cuda/blas_epilogue.cuh): device
// pointers, a cudaStream_t passed as void* (the stream torch's GEMMs run on), Status returned.
// The float64 running state (the max in score units s = <x', y'> - |y'|^2 / 2, sum_exp,
// sum_exp_sq, the [Q, D] accumulator, the nearest row's squared distance and index) lives in
// caller-owned buffers, initialised to (-inf, 0, 0, 0, +inf, -1); the caller forms the max logit
// from the max score once (logits.h: logit_from_score).
#pragma once

#include "diffrepro/config.h"
#include "diffrepro/status.h"

namespace diffrepro {

// Largest k of blas_chunk_topk_cuda (the list capacity of its widest instantiation).
inline constexpr int kBlasTopkMaxK = 128;

// g: [Q, C] chunk products x'.y'^T (row stride ldg); p: [Q, C] weights out (row stride ldp);
// y_half [C], x_half [Q] (halved squared norms of the centred rows / queries), inv_sigma2 [Q];
// x: [Q, D] uncentred queries x~ and rows: the chunk's [C, D] rows of storage type rows_type (for
// the float64 distances of the nearest-row candidates); unit_roundoff: of the GEMM's product
// (2^-24 float32, 2^-53 float64, larger for split products). The running state, the nearest row
// and scale_old [Q] (the factor for the float64 accumulator) are updated in place.
Status blas_softmax_chunk_cuda(const float* g, index_t ldg, index_t Q, index_t C, const double* y_half,
                               const double* x_half, const double* inv_sigma2, const float* x, const void* rows,
                               RowType rows_type, index_t D, double unit_roundoff, index_t chunk_offset,
                               double* max_score, double* sum_exp, double* sum_exp_sq, double* scale_old,
                               double* nearest_sqdist, index_t* nearest_index, float* p, index_t ldp,
                               void* stream);
Status blas_softmax_chunk_cuda(const double* g, index_t ldg, index_t Q, index_t C, const double* y_half,
                               const double* x_half, const double* inv_sigma2, const double* x, const void* rows,
                               RowType rows_type, index_t D, double unit_roundoff, index_t chunk_offset,
                               double* max_score, double* sum_exp, double* sum_exp_sq, double* scale_old,
                               double* nearest_sqdist, index_t* nearest_index, double* p, index_t ldp,
                               void* stream);

// acc [Q, D] float64 = scale_old * acc + a (a: [Q, D] GEMM output, row stride lda). Q <= 65,535.
Status blas_scale_accumulate_cuda(const float* a, index_t lda, index_t Q, index_t D, const double* scale_old,
                                  double* acc, void* stream);
Status blas_scale_accumulate_cuda(const double* a, index_t lda, index_t Q, index_t D, const double* scale_old,
                                  double* acc, void* stream);

// Top-k of each row of a [Q, C] score chunk (k <= kBlasTopkMaxK), then the merge with running lists.
Status blas_chunk_topk_cuda(const float* scores, index_t lds, index_t Q, index_t C, int k, bool largest,
                            index_t chunk_offset, float* out_values, index_t* out_indices, void* stream);
Status blas_merge_topk_cuda(index_t Q, int k, bool largest, const float* run_v, const index_t* run_i,
                            const float* chunk_v, const index_t* chunk_i, float* out_v, index_t* out_i,
                            void* stream);

}  // namespace diffrepro
