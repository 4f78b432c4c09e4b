// SPDX-License-Identifier: Apache-2.0
// Declarations of the CUDA entry points. Pointers are device pointers, the stream is a
// cudaStream_t passed as void* (nullptr = legacy default stream); no CUDA header is needed here.
// Nothing synchronises: results are ready when the caller's stream reaches them.
#pragma once

#include <cstddef>

#include "diffrepro/config.h"
#include "diffrepro/status.h"

namespace diffrepro {

// Largest k accepted by nn_search_cuda (kInvalidArgument above it).
inline constexpr int kNNSearchCudaMaxK = 128;

// Empirical denoiser, partial-state form over one chunk of training rows (global index of row n
// is row_offset + n). With x' = x - c and y'_n = y_n - c, the true logits are
//   l_n = (x'.y'_n - 1/2 ||y'_n||^2 - 1/2 ||x'||^2) * inv_sigma2   (= -||x - y_n||^2 / (2 sigma^2))
// where the dot products are formed in T and the logits in float64. Outputs per query:
//   max_logit = max_n l_n, sum_exp = sum_n exp(l_n - max), sum_exp_sq = sum_n exp(l_n - max)^2,
//   weighted_sum = sum_n exp(l_n - max) y_n (uncentred rows, accumulated in T),
//   nearest_index = argmax_n l_n (global; lowest index wins exact ties),
//   nearest_sqdist = ||x - y_nearest||^2 recomputed in float64 from the stored values.
// The states merge across chunks with softmax_merge (online_softmax.h). Deterministic for fixed
// sizes and configuration (no floating-point atomics; fixed split and reduction order).
// Errors: kInvalidArgument (N < 1, D < 1, Q < 0, null pointer, missing workspace, bad config),
// kCudaError (launch failure; see cuda_last_error_message()). Q = 0 does nothing.
// `config` (-1 auto, 0..2) and `splits` (0 auto, 1..64) are tuning/testing knobs; the workspace
// must be sized with the same values.
Status empirical_denoiser_cuda(
    const float* x,              // [Q, D] queries x~ = x / s
    const void* y,               // [N, D] rows, storage y_type (float32, float64, uint8, float16)
    RowType y_type,
    index_t Q, index_t N, index_t D,
    const float* center,         // [D] centring vector c
    const double* inv_sigma2,    // [Q] 1 / sigma^2
    index_t row_offset,
    void* workspace,             // [empirical_denoiser_cuda_workspace_bytes(Q, N, D)] bytes
    double* max_logit,           // [Q]
    double* sum_exp,             // [Q]
    double* sum_exp_sq,          // [Q]
    float* weighted_sum,         // [Q, D]
    index_t* nearest_index,      // [Q]
    double* nearest_sqdist,      // [Q]
    void* stream, int config = -1, int splits = 0);

// Same in float64 (the reference path: x, center and weighted_sum in double).
Status empirical_denoiser_cuda(
    const double* x,             // [Q, D]
    const void* y, RowType y_type,  // [N, D]
    index_t Q, index_t N, index_t D,
    const double* center,        // [D]
    const double* inv_sigma2,    // [Q]
    index_t row_offset,
    void* workspace,             // [empirical_denoiser_cuda_workspace_bytes(Q, N, D)] bytes
    double* max_logit,           // [Q]
    double* sum_exp,             // [Q]
    double* sum_exp_sq,          // [Q]
    double* weighted_sum,        // [Q, D]
    index_t* nearest_index,      // [Q]
    double* nearest_sqdist,      // [Q]
    void* stream, int config = -1, int splits = 0);

// Scratch bytes for empirical_denoiser_cuda (enough for float and double; 0 when one split of the
// rows suffices, e.g. large Q). Depends only on the arguments, never on the device.
std::size_t empirical_denoiser_cuda_workspace_bytes(index_t Q, index_t N, index_t D,
                                                    int config = -1, int splits = 0);

// Partial top-k search over one chunk of reference rows. Scores are inner products
// (inner_product = true, larger is better) or squared L2 distances (>= 0, smaller is better),
// accumulated in float32. values/indices are sorted best first; equal scores go to the lower
// global index (row_offset + n); when k > N the tail is padded with -inf (ip) / +inf (l2) and
// index -1, which loses to every real entry when chunk results are merged (topk.h).
// Errors: kInvalidArgument (k < 1 or k > kNNSearchCudaMaxK, N < 1, D < 1, null pointers, missing
// workspace, bad config), kCudaError.
Status nn_search_cuda(
    const float* queries,        // [Q, D]
    const void* refs,            // [N, D] storage refs_type (float32, float16, uint8, float64)
    RowType refs_type,
    index_t Q, index_t N, index_t D, int k, bool inner_product,
    index_t row_offset,
    float* values,               // [Q, k]
    index_t* indices,            // [Q, k]
    void* workspace,             // [nn_search_cuda_workspace_bytes(Q, N, D, k)] bytes
    void* stream, int config = -1, int splits = 0);

std::size_t nn_search_cuda_workspace_bytes(index_t Q, index_t N, index_t D, int k,
                                           int config = -1, int splits = 0);

// "cudaErrorName: description" of the last failed launch on this host thread ("" if none).
const char* cuda_last_error_message();

// Comma-separated __CUDA_ARCH_LIST__ the kernels were compiled for (e.g. "750,800,900").
const char* cuda_compiled_archs();

}  // namespace diffrepro
