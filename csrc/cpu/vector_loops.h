// SPDX-License-Identifier: Apache-2.0
// The CPU paths' elementwise loops outside the BLAS, compiled for x86-64-v4 (AVX-512),
// x86-64-v3 (AVX2 + FMA) and the baseline, and chosen at load time for the running CPU
// (GCC target_clones; a single generic build elsewhere).
#pragma once

#include "diffrepro/config.h"
#include "diffrepro/status.h"

namespace diffrepro::detail {

// dst[n, :] = decode(src row n) - center, norm2[n] = ||dst[n, :]||^2 (accumulated in double).
void load_centred_rows(RowType type, const void* src, index_t rows, index_t D, const float* center,
                       float* dst, float* norm2);
void load_centred_rows(RowType type, const void* src, index_t rows, index_t D,
                       const double* center, double* dst, double* norm2);

// dst[e] = decode(src[e]) for e < count (no centring).
void load_rows(RowType type, const void* src, index_t count, float* dst);

// ||v||^2, accumulated in double.
double squared_norm(const float* v, index_t n);

// a *= r.
void scale(float* a, float r, index_t n);
void scale(double* a, double r, index_t n);

// acc[q, :] += sum_j p[q, j] tile[j, :] over the non-zero p only: the second product when the
// softmax weights are sparse (small sigma), where a dense GEMM would mostly add exact zeros.
void sparse_accumulate(const float* p, index_t nq, index_t nt, const float* tile, index_t D,
                       float* acc);
void sparse_accumulate(const double* p, index_t nq, index_t nt, const double* tile, index_t D,
                       double* acc);

// The clone the loader picked: "avx512", "avx2" or "generic".
const char* vector_isa();

}  // namespace diffrepro::detail
