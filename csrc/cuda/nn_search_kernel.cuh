// SPDX-License-Identifier: Apache-2.0
// Nearest-neighbour search kernels: fused tile scores -> per-query top-k over one chunk of
// reference rows, then a cross-split merge; and the launch plan. One source for nvcc and for the
// CPU emulator (exec_ctx.cuh).
#pragma once

#include <cmath>
#include <cstddef>

#include "diffrepro/args.h"
#include "diffrepro/config.h"
#include "diffrepro/rows.h"
#include "diffrepro/status.h"
#include "diffrepro/topk.h"
#include "exec_ctx.cuh"
#include "tile_gemm.cuh"

namespace diffrepro {
namespace detail {

// Tile configurations (see TileConfig) with the capacity KCAP of the per-query top-k lists kept
// in shared memory: TQ * KCAP * (4 + 8) bytes, i.e. 6 KB for 32 x 16 and 24 KB for 16 x 128, so
// the lists plus the staged slices stay below the 48 KB static shared-memory limit.
// 0: 32x32 tile, k <= 16 (the common k = 1..10 case at large Q).
// 1: 16x64 tile, k <= kSearchMaxK = 128 (also the small-Q choice: 16-query tiles waste less).
// 2: 8x8 tile on one warp, k <= kSearchMaxK: for the emulator's ragged-edge tests.
template <class Cfg_, int KCAP_>
struct NNConfig {
  using Cfg = Cfg_;
  static constexpr int KCAP = KCAP_;
};
using NNCfgLarge = NNConfig<TileConfig<32, 32, 16, 256, 2, 2>, 16>;
using NNCfgWideK = NNConfig<TileConfig<16, 64, 16, 256, 1, 4>, kSearchMaxK>;
using NNCfgTiny = NNConfig<TileConfig<8, 8, 4, 32, 1, 2>, kSearchMaxK>;
inline constexpr int kNNConfigs = 3;

inline int nn_auto_config(index_t Q, int k) { return (k <= NNCfgLarge::KCAP && Q > 16) ? 0 : 1; }

inline void nn_config_shape(int config, int& TQ, int& TN, int& kcap) {
  switch (config) {
    case 1: TQ = NNCfgWideK::Cfg::TQ; TN = NNCfgWideK::Cfg::TN; kcap = NNCfgWideK::KCAP; break;
    case 2: TQ = NNCfgTiny::Cfg::TQ; TN = NNCfgTiny::Cfg::TN; kcap = NNCfgTiny::KCAP; break;
    default: TQ = NNCfgLarge::Cfg::TQ; TN = NNCfgLarge::Cfg::TN; kcap = NNCfgLarge::KCAP; break;
  }
}

// ------------------------------------------------------------------------------------------------
// Kernel 1: blockIdx.x = query tile, blockIdx.y = split of the reference rows. For every TN-tile
// the block accumulates scores in registers over TK-slices of D (inner product, or the squared
// L2 distance summed directly as (q - r)^2: no ||q||^2 - 2 q.r + ||r||^2 cancellation, so the
// result is >= 0 by construction and needs no clamp, and stays accurate when q and r share a
// large offset; the winners' values are then recomputed in float64 by kernel 2), writes them
// to a shared [TQ, TN] tile, and one thread per query pushes the
// tile's candidates into its sorted top-k list in shared memory. Candidates are pushed in
// increasing row order and topk_better breaks equal scores towards the lower index, so ties
// resolve to the lowest index regardless of the tiling.
// ------------------------------------------------------------------------------------------------
template <RowType R, class NC, bool IP>
DR_KERNEL void nn_search_partial_kernel(
    SearchArgs a,               // inputs (outputs unused: the lists go to out_*)
    index_t rows_per_split,
    float* out_values,          // [S, Q, k] best first (padding: -inf for ip, +inf for l2)
    index_t* out_indices) {     // [S, Q, k] global indices (padding: -1)
  using Cfg = typename NC::Cfg;
  constexpr int TQ = Cfg::TQ, TN = Cfg::TN, TK = Cfg::TK, NT = Cfg::NT;
  constexpr int RQ = Cfg::RQ, RN = Cfg::RN, KCAP = NC::KCAP;
  DR_SHARED float xs[TQ][TK + 1];
  DR_SHARED float rs[TN][TK + 1];
  DR_SHARED float sc[TQ][TN + 1];
  DR_SHARED float top_v[TQ][KCAP];
  DR_SHARED index_t top_i[TQ][KCAP];

  const index_t Q = a.Q, N = a.N, D = a.D;
  const int k = a.k;
  const int tid = static_cast<int>(dr_tid());
  const int tq = tid / Cfg::kThreadsN;
  const int tn = tid % Cfg::kThreadsN;
  const index_t q0 = static_cast<index_t>(dr_bid_x()) * TQ;
  const int split = static_cast<int>(dr_bid_y());
  const index_t n_begin = split * rows_per_split;
  const index_t n_end = n_begin + rows_per_split < N ? n_begin + rows_per_split : N;
  const int q_valid = Q - q0 < TQ ? static_cast<int>(Q - q0) : TQ;
  const float* xq = a.queries + q0 * D;

  for (int q = tid; q < TQ; q += NT) topk_init(top_v[q], top_i[q], k, IP);

  for (index_t n0 = n_begin; n0 < n_end; n0 += TN) {  // uniform across the block
    const int n_valid = n_end - n0 < TN ? static_cast<int>(n_end - n0) : TN;
    float acc[RQ][RN];
    for (int i = 0; i < RQ; ++i)
      for (int j = 0; j < RN; ++j) acc[i][j] = 0.0f;
    for (index_t d0 = 0; d0 < D; d0 += TK) {
      stage_slice<TQ, TK, NT>(xs, q_valid, d0, D, [&](int r, index_t d) { return xq[r * D + d]; });
      stage_slice<TN, TK, NT>(rs, n_valid, d0, D, [&](int r, index_t d) {
        return load_row_value<float>(R, a.refs, (n0 + r) * D + d);
      });
      dr_sync();
      if (IP) {
        micro_tile_update<Cfg>(xs, rs, acc, tq, tn, [](float c, float a, float b) { return c + a * b; });
      } else {
        micro_tile_update<Cfg>(xs, rs, acc, tq, tn, [](float c, float a, float b) {
          const float t = a - b;  // zero padding on both sides contributes 0
          return c + t * t;
        });
      }
      dr_sync();
    }
    for (int i = 0; i < RQ; ++i)
      for (int j = 0; j < RN; ++j) sc[tq + i * (TQ / RQ)][tn + j * Cfg::kThreadsN] = acc[i][j];
    dr_sync();
    // Epilogue: a candidate that does not beat the current k-th entry costs one comparison
    // (topk_push's early exit), so after the first tiles most of this loop is a scan.
    for (int q = tid; q < q_valid; q += NT)
      for (int n = 0; n < n_valid; ++n) topk_push(top_v[q], top_i[q], k, sc[q][n], a.row_offset + n0 + n, IP);
    dr_sync();  // sc is overwritten by the next tile
  }

  for (int q = tid; q < q_valid; q += NT) {
    const index_t o = (split * Q + q0 + q) * k;
    for (int j = 0; j < k; ++j) {
      out_values[o + j] = top_v[q][j];
      out_indices[o + j] = top_i[q][j];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Kernel 2: one thread per query folds the S split lists in split order with topk_merge (ties
// between splits go to the lower index, which also is the earlier split), then recomputes the
// winners' values in float64 and re-sorts the list (topk_refine_f64, the CPU path's function),
// so both backends report the same values for either metric. No barriers, so the early return
// for padding threads is safe. Runs in place (part_* alias the outputs) when S = 1.
// ------------------------------------------------------------------------------------------------
inline constexpr int kNNMergeThreads = 64;

template <RowType R, bool IP>
DR_KERNEL void nn_search_merge_kernel(
    SearchArgs a,                // inputs and final outputs
    int S,
    const float* part_values,    // [S, Q, k]
    const index_t* part_indices) {  // [S, Q, k]
  const index_t Q = a.Q;
  const int k = a.k;
  const index_t q = static_cast<index_t>(dr_bid_x()) * kNNMergeThreads + dr_tid();
  if (q >= Q) return;
  // Two lists in registers / local memory, ping-ponged; k <= kSearchMaxK.
  float cur_v[kSearchMaxK], tmp_v[kSearchMaxK];
  index_t cur_i[kSearchMaxK], tmp_i[kSearchMaxK];
  for (int j = 0; j < k; ++j) {
    cur_v[j] = part_values[q * k + j];
    cur_i[j] = part_indices[q * k + j];
  }
  for (int s = 1; s < S; ++s) {
    const index_t o = (s * Q + q) * k;
    topk_merge(cur_v, cur_i, part_values + o, part_indices + o, k, IP, tmp_v, tmp_i);
    for (int j = 0; j < k; ++j) {
      cur_v[j] = tmp_v[j];
      cur_i[j] = tmp_i[j];
    }
  }
  topk_refine_f64(a.queries + q * a.D, R, a.refs, a.row_offset, a.D, IP, cur_v, cur_i, k);
  for (int j = 0; j < k; ++j) {
    a.values[q * k + j] = cur_v[j];
    a.indices[q * k + j] = cur_i[j];
  }
}

// ------------------------------------------------------------------------------------------------
// Plan and launch (shared by the CUDA launcher and the emulator module).
// ------------------------------------------------------------------------------------------------
inline std::size_t nn_workspace_bytes(index_t Q, index_t N, index_t D, int k, int config,
                                      int forced_splits) {
  (void)D;
  if (Q <= 0 || N <= 0 || k <= 0) return 0;
  if (config < 0) config = nn_auto_config(Q, k);
  int TQ, TN, kcap;
  nn_config_shape(config, TQ, TN, kcap);
  const SplitPlan p = plan_splits(Q, N, TQ, TN, forced_splits);
  if (p.splits <= 1) return 0;
  const std::size_t e = static_cast<std::size_t>(p.splits) * static_cast<std::size_t>(Q) *
                        static_cast<std::size_t>(k);
  return align_up(e * sizeof(float)) + align_up(e * sizeof(index_t));
}

template <RowType R, class NC, bool IP>
Status nn_launch_cfg(const SearchArgs& a, const Tuning& t, void* stream) {
  using Cfg = typename NC::Cfg;
  if (a.k > NC::KCAP) return Status::kInvalidArgument;
  const SplitPlan p = plan_splits(a.Q, a.N, Cfg::TQ, Cfg::TN, t.splits);
  float* pv = a.values;
  index_t* pi = a.indices;
  if (p.splits > 1) {
    if (t.workspace == nullptr) return Status::kInvalidArgument;
    const std::size_t e = static_cast<std::size_t>(p.splits) * static_cast<std::size_t>(a.Q) *
                          static_cast<std::size_t>(a.k);
    pv = static_cast<float*>(t.workspace);
    pi = reinterpret_cast<index_t*>(static_cast<char*>(t.workspace) + align_up(e * sizeof(float)));
  }
  Status st = launch_kernel(&nn_search_partial_kernel<R, NC, IP>,
                            Dim2{static_cast<unsigned>(p.q_tiles), static_cast<unsigned>(p.splits)},
                            Dim2{Cfg::NT, 1}, stream, a, p.rows_per_split, pv, pi);
  if (st != Status::kOk) return st;
  const index_t blocks = (a.Q + kNNMergeThreads - 1) / kNNMergeThreads;
  return launch_kernel(&nn_search_merge_kernel<R, IP>, Dim2{static_cast<unsigned>(blocks), 1},
                       Dim2{kNNMergeThreads, 1}, stream, a, p.splits,
                       static_cast<const float*>(pv), static_cast<const index_t*>(pi));
}

template <RowType R, bool IP>
Status nn_launch_rows(int config, const SearchArgs& a, const Tuning& t, void* stream) {
  switch (config) {
    case 1: return nn_launch_cfg<R, NNCfgWideK, IP>(a, t, stream);
    case 2: return nn_launch_cfg<R, NNCfgTiny, IP>(a, t, stream);
    default: return nn_launch_cfg<R, NNCfgLarge, IP>(a, t, stream);
  }
}

template <RowType R>
Status nn_launch_metric(int config, const SearchArgs& a, const Tuning& t, void* stream) {
  return a.inner_product ? nn_launch_rows<R, true>(config, a, t, stream)
                         : nn_launch_rows<R, false>(config, a, t, stream);
}

// Validates sizes and dispatches on storage type, metric and configuration (t.config < 0 and
// t.splits <= 0: automatic). Q = 0 is a no-op. a.center is not used: the kernels sum (q - r)^2
// directly, which needs no centring.
inline Status nn_run(const SearchArgs& a, const Tuning& t, void* stream) {
  if (a.Q < 0 || a.N < 1 || a.D < 1 || a.k < 1 || a.k > kSearchMaxK || a.row_offset < 0)
    return Status::kInvalidArgument;
  if (t.config >= kNNConfigs || t.splits > kMaxSplits) return Status::kInvalidArgument;
  if (a.Q == 0) return Status::kOk;
  if (a.Q > index_t(0x7fffffff)) return Status::kInvalidArgument;
  if (!a.queries || !a.refs || !a.values || !a.indices) return Status::kInvalidArgument;
  const int config = t.config < 0 ? nn_auto_config(a.Q, a.k) : t.config;
  switch (a.refs_type) {
    case RowType::kFloat32: return nn_launch_metric<RowType::kFloat32>(config, a, t, stream);
    case RowType::kFloat16: return nn_launch_metric<RowType::kFloat16>(config, a, t, stream);
    case RowType::kUInt8: return nn_launch_metric<RowType::kUInt8>(config, a, t, stream);
    case RowType::kFloat64: return nn_launch_metric<RowType::kFloat64>(config, a, t, stream);
  }
  return Status::kInvalidArgument;
}

}  // namespace detail
}  // namespace diffrepro
