// SPDX-License-Identifier: Apache-2.0
// Row-major GEMM front end over the BLAS linked into _cpu (scipy-openblas32, a private,
// symbol-prefixed OpenBLAS: it cannot clash with numpy's or torch's BLAS and has its own core
// selection). Called single-threaded per worker: parallel.h owns the threads.
#pragma once

#include "diffrepro/config.h"

namespace diffrepro::detail {

// C[M, N] = alpha * A[M, K] * op(B) + beta * C, where op(B) = B^T when b_trans (B is [N, K])
// and B (B is [K, N]) otherwise. Leading dimensions are the row strides.
void gemm(bool b_trans, index_t M, index_t N, index_t K, float alpha, const float* A, index_t lda,
          const float* B, index_t ldb, float beta, float* C, index_t ldc);
void gemm(bool b_trans, index_t M, index_t N, index_t K, double alpha, const double* A,
          index_t lda, const double* B, index_t ldb, double beta, double* C, index_t ldc);

// Name of the BLAS core in use (e.g. "Haswell", "SkylakeX") and its thread setting.
const char* gemm_core_name();
void gemm_init_single_threaded();

}  // namespace diffrepro::detail
