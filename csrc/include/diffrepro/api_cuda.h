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

// Certified pruning (PruneArgs, device pointers): the state of empirical_denoiser_cuda over the
// (query, prune tile) pairs that p.active marks, with pruned_denoiser_cpu's semantics (empty
// state for a query without an active tile: max_logit = -inf, sum_exp = 0, weighted_sum = 0,
// nearest_index = -1; tile_best / tile_second of every computed pair, others untouched).
// Mapping onto the kernel (TN = 32 / 64 / 8 rows per block tile for configs 0 / 1 / 2):
//   * p.tile_rows must be a multiple of TN, or >= N (one prune tile); so every TN tile lies in
//     one prune tile. t.config = -1 takes the dense choice if it fits, else config 0, else 2;
//     pruned_denoiser_cuda_config tells which runs (-1: kInvalidArgument, nothing fits).
//   * row splits hold whole prune tiles, so one block owns each (query, prune tile) pair and
//     writes its two best scores directly (no merge, no atomics).
//   * a TN tile whose prune tile is inactive for every query of the block's query tile is
//     skipped (neither product; one barrier per prune tile); inside a partially active tile the
//     inactive queries' scores are -inf (no weight, no nearest candidate) and their
//     accumulators are not touched.
// With every pair active and one split (or the same split boundaries) the state equals
// empirical_denoiser_cuda's bit for bit. Deterministic; t.workspace sized by
// pruned_denoiser_cuda_workspace_bytes with the same knobs and tile_rows.
// Errors: as empirical_denoiser_cuda, plus kInvalidArgument for a tile_rows no config fits.
Status pruned_denoiser_cuda(const DenoiserArgs<float>& a, const PruneArgs<float>& p, const Tuning& t,
                            void* stream);
Status pruned_denoiser_cuda(const DenoiserArgs<double>& a, const PruneArgs<double>& p,
                            const Tuning& t, void* stream);

std::size_t pruned_denoiser_cuda_workspace_bytes(index_t Q, index_t N, index_t D, index_t tile_rows,
                                                 int config = -1, int splits = 0);

// The configuration pruned_denoiser_cuda runs for (Q, N, tile_rows, config), -1 if none fits.
int pruned_denoiser_cuda_config(index_t Q, index_t N, index_t tile_rows, int config = -1);

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
