// SPDX-License-Identifier: Apache-2.0
// Declarations of the CUDA entry points. Pointers in the argument structs are device pointers,
// the stream is a cudaStream_t passed as void* (nullptr = legacy default stream); no CUDA header
// is needed here. Nothing synchronises: results are ready when the caller's stream reaches them.
#pragma once

#include <cstddef>

#include "diffrepro/args.h"
#include "diffrepro/config.h"
#include "diffrepro/status.h"

namespace diffrepro {

// Empirical denoiser, partial-state form over one chunk of training rows (DenoiserArgs documents
// every field; x, center and weighted_sum are float32 or, for the reference path, float64).
// Dot products are formed in T on centred data, softmax weights in float64 in score units, so
// states merge across splits without ||x||^2 (logits.h). nearest_index is the argmax of the
// scores (exact duplicates score identically here; lowest index wins), nearest_sqdist its float64
// distance. Deterministic for fixed sizes and configuration (no floating-point atomics; fixed
// split and reduction order). Uses t.config (-1 auto, 0..2), t.splits (0 auto, 1..64) and
// t.workspace, which must be sized by empirical_denoiser_cuda_workspace_bytes with the same knobs.
// Errors: kInvalidArgument (N < 1, D < 1, Q < 0, null pointer, missing workspace, bad config),
// kCudaError (launch failure; see cuda_last_error_message()). Q = 0 does nothing.
Status empirical_denoiser_cuda(const DenoiserArgs<float>& a, const Tuning& t, void* stream);
Status empirical_denoiser_cuda(const DenoiserArgs<double>& a, const Tuning& t, void* stream);

// Scratch bytes for empirical_denoiser_cuda (enough for float and double; 0 when one split of the
// rows suffices, e.g. large Q). Depends only on the arguments, never on the device.
std::size_t empirical_denoiser_cuda_workspace_bytes(index_t Q, index_t N, index_t D,
                                                    int config = -1, int splits = 0);

// Partial top-k search over one chunk of reference rows (SearchArgs). Scores are inner products
// (larger is better) or squared L2 distances summed as (q - r)^2 in float32, the winners' then
// recomputed in float64. Sorted best first; equal scores go to the lower global index; when
// k > N the tail is padding (index -1), which loses to every real entry in merges (topk.h).
// Errors: kInvalidArgument (k < 1 or k > kSearchMaxK, N < 1, D < 1, null pointers, missing
// workspace, bad config), kCudaError.
Status nn_search_cuda(const SearchArgs& a, const Tuning& t, void* stream);

std::size_t nn_search_cuda_workspace_bytes(index_t Q, index_t N, index_t D, int k,
                                           int config = -1, int splits = 0);

// "cudaErrorName: description" of the last failed launch on this host thread ("" if none).
const char* cuda_last_error_message();

// Comma-separated __CUDA_ARCH_LIST__ the kernels were compiled for (e.g. "750,800,900").
const char* cuda_compiled_archs();

}  // namespace diffrepro
