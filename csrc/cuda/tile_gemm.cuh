// SPDX-License-Identifier: Apache-2.0
// Register-blocked tile "GEMM" pieces shared by the denoiser and the NN-search kernels: tile
// configurations, zero-padded staging of a [rows, TK] slice into shared memory, the per-thread
// micro-tile update, and the split-N plan. Written against exec_ctx.cuh (nvcc and emulator).
#pragma once

#include <cstddef>

#include "diffrepro/config.h"
#include "exec_ctx.cuh"

namespace diffrepro {
namespace detail {

// A block computes a TQ x TN tile of query/row scores with NT threads; thread t owns an RQ x RN
// register micro-tile at rows tq + i*(TQ/RQ), columns tn + j*(TN/RN) (strided, so that the 16 or
// 32 threads reading one shared row hit different banks). The feature axis D is walked in slices
// of TK columns, which is what bounds shared memory independently of D (D = 3072 for CIFAR).
template <int TQ_, int TN_, int TK_, int NT_, int RQ_, int RN_>
struct TileConfig {
  static constexpr int TQ = TQ_;
  static constexpr int TN = TN_;
  static constexpr int TK = TK_;
  static constexpr int NT = NT_;
  static constexpr int RQ = RQ_;
  static constexpr int RN = RN_;
  static constexpr int kThreadsN = TN / RN;  // threads along the row (N) axis of the tile
  static constexpr int kWarps = NT / kWarpSize;
  static_assert(TQ % RQ == 0 && TN % RN == 0, "micro-tile must divide the tile");
  static_assert((TQ / RQ) * (TN / RN) == NT, "one micro-tile per thread");
  static_assert(NT % kWarpSize == 0, "whole warps only (shuffles are full-warp)");
  static_assert(TN <= NT && TQ <= NT, "per-row / per-query helpers use one thread each");
};

// Copies rows [0, ROWS) x columns [d0, d0 + TK) of a logical matrix into dst, calling
// load(r, d) for in-range entries and writing 0 elsewhere. Zero padding is neutral for every
// product and squared difference computed from the tile, so ragged edges (rows past Q or N, D not
// a multiple of TK) need no special case in the inner loop. Consecutive threads take consecutive
// d, so global reads are coalesced along the row.
template <int ROWS, int TK, int NT, class T, class Load>
DR_DEVICE void stage_slice(T (*dst)[TK + 1], int valid_rows, index_t d0, index_t D, Load load) {
  for (int e = static_cast<int>(dr_tid()); e < ROWS * TK; e += NT) {
    const int r = e / TK;
    const int kk = e % TK;
    const index_t d = d0 + kk;
    dst[r][kk] = (r < valid_rows && d < D) ? load(r, d) : T(0);
  }
}

// acc[i][j] = op(acc[i][j], xs[row i][kk], ys[col j][kk]) over the TK staged columns.
template <class Cfg, class T, class Op>
DR_DEVICE void micro_tile_update(const T (*xs)[Cfg::TK + 1], const T (*ys)[Cfg::TK + 1],
                                 T (&acc)[Cfg::RQ][Cfg::RN], int tq, int tn, Op op) {
  for (int kk = 0; kk < Cfg::TK; ++kk) {
    T a[Cfg::RQ];
    T b[Cfg::RN];
    for (int i = 0; i < Cfg::RQ; ++i) a[i] = xs[tq + i * (Cfg::TQ / Cfg::RQ)][kk];
    for (int j = 0; j < Cfg::RN; ++j) b[j] = ys[tn + j * Cfg::kThreadsN][kk];
    for (int i = 0; i < Cfg::RQ; ++i)
      for (int j = 0; j < Cfg::RN; ++j) acc[i][j] = op(acc[i][j], a[i], b[j]);
  }
}

// Split of the N rows across gridDim.y blocks. Blocks of one query tile each stream a contiguous
// range of whole TN-tiles, producing partial states merged afterwards in split order. The plan
// depends only on (Q, N, tile shape, override) and never on the device, so a given call is
// reproducible bit for bit on every GPU with the same configuration.
struct SplitPlan {
  index_t q_tiles;         // gridDim.x
  int splits;              // gridDim.y (>= 1; every split owns at least one row)
  index_t rows_per_split;  // a multiple of TN
};

// Most splits a plan uses: bounds the merge kernels' per-query coefficient arrays.
inline constexpr int kMaxSplits = 64;
// Aim for about this many blocks per launch (two waves on a 132-SM H100); fixed, not queried.
inline constexpr index_t kTargetBlocks = 256;
// A split streams at least this many tiles, so its partial state is worth the merge traffic.
inline constexpr index_t kMinTilesPerSplit = 4;

inline SplitPlan plan_splits(index_t Q, index_t N, int TQ, int TN, int forced_splits) {
  SplitPlan p{};
  p.q_tiles = (Q + TQ - 1) / TQ;
  const index_t n_tiles = (N + TN - 1) / TN;
  index_t s;
  if (forced_splits > 0) {
    s = forced_splits;
  } else {
    s = (kTargetBlocks + p.q_tiles - 1) / p.q_tiles;
    const index_t by_work = n_tiles / kMinTilesPerSplit;
    if (s > by_work) s = by_work;
  }
  if (s > kMaxSplits) s = kMaxSplits;
  if (s > n_tiles) s = n_tiles;
  if (s < 1) s = 1;
  const index_t tiles_per_split = (n_tiles + s - 1) / s;
  p.rows_per_split = tiles_per_split * TN;
  // Recount so that no split is empty (e.g. 5 tiles over 4 splits -> 2,2,1 = 3 splits).
  p.splits = static_cast<int>((N + p.rows_per_split - 1) / p.rows_per_split);
  if (p.splits < 1) p.splits = 1;
  return p;
}

// Rounds a byte count up to 256 so that every workspace section stays aligned for any type.
inline constexpr std::size_t align_up(std::size_t b) { return (b + 255) / 256 * 256; }

}  // namespace detail
}  // namespace diffrepro
