// SPDX-License-Identifier: Apache-2.0
// CPU entry points. Raw pointers and sizes only (no torch); every function returns a Status.
// Row-major, contiguous buffers. Sizes: Q queries, N training/reference rows, D features.
#pragma once

#include "diffrepro/config.h"
#include "diffrepro/status.h"

namespace diffrepro {

// Partial state of the empirical optimal denoiser over one chunk of training rows
// (global row index = row_offset + n). T = float (speed path) or double (reference path).
//
// Logits are l_n = -||x_q - y_n||^2 / (2 sigma_q^2). The products run on centred data
// (x - center, y - center), so a large common offset costs no accuracy; ||x||^2 is dropped from
// the products (it cannot change the weights) and added back in float64 to report the true
// max logit. Outputs (the DenoiserState of the Python API):
//   max_logit, sum_exp, sum_exp_sq : softmax state per query, sums relative to max_logit
//   weighted_sum                   : sum_n exp(l_n - max_logit) y_n  (y_n as stored, uncentred)
//   nearest_index, nearest_sqdist  : argmax_n l_n (lowest index among equal scores) and its
//                                    squared distance recomputed in float64
// Deterministic for fixed (Q, N, D, tile sizes, workers).
// Errors: kInvalidArgument for N < 1, Q < 1, D < 1 or a row type that T cannot decode.
template <class T>
Status empirical_denoiser_cpu(const T* x,                    // [Q, D] queries x/s
                              const void* y, RowType y_type,  // [N, D] training rows
                              index_t Q, index_t N, index_t D,
                              const T* center,            // [D]
                              const double* inv_sigma2,   // [Q] 1/sigma^2
                              index_t row_offset, index_t tile_rows, int workers,
                              double* max_logit,          // [Q]
                              double* sum_exp,            // [Q]
                              double* sum_exp_sq,         // [Q]
                              T* weighted_sum,            // [Q, D]
                              index_t* nearest_index,     // [Q]
                              double* nearest_sqdist);    // [Q]

// Top-k nearest references per query over one chunk of reference rows.
// inner_product: largest <q, r> first; otherwise smallest ||q - r||^2 (clamped at 0) first.
// Ties go to the lower index; rows beyond the chunk's N are padding (index -1, worst score).
// Errors: kInvalidArgument for k < 1, Q < 1, D < 1 or N < 0.
Status nn_search_cpu(const float* queries,                 // [Q, D]
                     const void* refs, RowType refs_type,  // [N, D]
                     index_t Q, index_t N, index_t D, int k, bool inner_product,
                     index_t row_offset, index_t tile_rows, int workers,
                     float* values,                        // [Q, k]
                     index_t* indices);                    // [Q, k]

// Which BLAS core and vector ISA the CPU path uses (for build_info()).
const char* cpu_gemm_core();
const char* cpu_isa();

}  // namespace diffrepro
