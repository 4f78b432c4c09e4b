// SPDX-License-Identifier: Apache-2.0
// One argument struct per op (flash-attention's Params idiom), passed unchanged through every
// backend (CPU, CUDA, CUDA emulator) and filled once by the bindings: no entry point repeats a
// long list of positional pointers and sizes. Plain aggregates, so kernels take them by value.
#pragma once

#include <cstdint>

#include "diffrepro/config.h"
#include "diffrepro/status.h"

namespace diffrepro {

// Largest k of nn_search on the CUDA kernels (and their emulator); the CPU path has no limit.
inline constexpr int kSearchMaxK = 128;

// Empirical optimal denoiser over one chunk of training rows (global index of row n is
// row_offset + n). T = float (speed path) or double (reference path).
//
// True logits are l_n = -||x_q - y_n||^2 / (2 sigma_q^2) + lw_n, with lw_n = log_weights[n] a
// per-row log-weight (0 when log_weights is null; -inf excludes the row). Outputs (the
// DenoiserState of the Python API), per query:
//   max_logit + max_logit_lo : max_n l_n as an unevaluated float64 sum (hi + lo, see
//                              logits.h); lo keeps the digits a huge ||x||^2 / 2 sigma^2 would
//                              otherwise round away, so chunk states merge exactly at any scale
//   sum_exp, sum_exp_sq      : sum_n exp(l_n - max), sum_n exp(l_n - max)^2
//   weighted_sum             : sum_n exp(l_n - max) y_n (y_n as stored, uncentred)
//   nearest_index            : the row of highest logit l_n (with log-weights: the mode of the
//                              weights; without: the nearest row), ranked in float64 by
//                              nearest_rank_key (logits.h), lowest index among equal keys
//   nearest_sqdist           : ||x_q - y_nearest||^2 in float64 from the decoded values
template <class T>
struct DenoiserArgs {
  const T* x;                 // [Q, D] queries x~ = x / s
  const void* y;              // [N, D] training rows of storage type y_type
  RowType y_type;
  index_t Q, N, D;
  const T* center;            // [D] centring vector c (logits are invariant to a common shift)
  const double* inv_sigma2;   // [Q] 1 / sigma^2
  index_t row_offset;
  double* max_logit;          // [Q]
  double* max_logit_lo;       // [Q]
  double* sum_exp;            // [Q]
  double* sum_exp_sq;         // [Q]
  T* weighted_sum;            // [Q, D]
  index_t* nearest_index;     // [Q]
  double* nearest_sqdist;     // [Q]
  const double* log_weights = nullptr;  // [N] or null: per-row log-weights lw_n (finite or -inf)
};

// Certified pruning of the empirical denoiser (pruned_denoiser_cpu): the N rows are cut into
// n_tiles = ceil(N / tile_rows) tiles of tile_rows rows (the last may be shorter) and tile t
// enters query q's softmax only when active[q * n_tiles + t] != 0 (both products of a skipped
// pair are skipped; a query with no active tile keeps the empty state: max_logit = -inf,
// nearest_index = -1). For every computed pair the two largest scores
// g_n = <x_q - c, y_n - c> - ||y_n - c||^2 / 2 of the tile go to tile_best / tile_second (-inf
// when the tile has one row), so the caller has the tile's two smallest squared distances
// ||x_q - c||^2 - 2 g (up to score_error_gamma); other entries are left untouched.
// The CUDA kernel (pruned_denoiser_cuda, and its emulator) needs tile_rows to be a multiple of its
// row tile TN (8, 32 or 64 by configuration) or >= N, and keeps splits on tile boundaries; it
// returns kInvalidArgument otherwise (api_cuda.h). The CPU path takes any tile_rows >= 1.
template <class T>
struct PruneArgs {
  const std::uint8_t* active;  // [Q, n_tiles]
  index_t tile_rows;
  T* tile_best;                // [Q, n_tiles]
  T* tile_second;              // [Q, n_tiles]
};

// Top-k search over one chunk of reference rows. inner_product: largest <q, r> first; otherwise
// smallest ||q - r||^2 first, reported as the float64 distance rounded to float32. Equal scores
// go to the lower global index; when k > N the tail is padding (index -1, worst score).
struct SearchArgs {
  const float* queries;       // [Q, D]
  const void* refs;           // [N, D] reference rows of storage type refs_type
  RowType refs_type;
  index_t Q, N, D;
  int k;
  bool inner_product;
  const float* center;        // [D] or nullptr: L2 scores are formed on q - c and r - c (CPU)
  index_t row_offset;
  float* values;              // [Q, k]
  index_t* indices;           // [Q, k]
};

// Knobs of the backends. Each backend reads its own and ignores the others.
struct Tuning {
  index_t tile_rows = 0;      // CPU: rows per tile (0: tiling.h's planner)
  int workers = 1;            // CPU: threads
  int config = -1;            // CUDA / emulator: tile configuration (-1: automatic)
  int splits = 0;             // CUDA / emulator: row splits across blocks (0: automatic)
  void* workspace = nullptr;  // CUDA / emulator: scratch of <op>_workspace_bytes bytes
};

}  // namespace diffrepro
