// SPDX-License-Identifier: Apache-2.0
// Empirical optimal denoiser on the CPU: one streaming pass over training tiles per query block.
// For each tile, product 1 gives the scores, the online softmax turns them into weights in place,
// and product 2 adds the weighted tile to the accumulator while the tile is still in cache.
#include <cmath>
#include <vector>

#include "diffrepro/api_cpu.h"
#include "diffrepro/online_softmax.h"
#include "diffrepro/rows.h"
#include "diffrepro/tiling.h"
#include "diffrepro/topk.h"
#include "gemm.h"
#include "parallel.h"
#include "vector_loops.h"

namespace diffrepro {
namespace {

// The second product goes sparse below one non-zero weight in kSparseRatio (a dense GEMM runs
// several times faster per flop than row-by-row accumulation, so the switch pays off only then).
constexpr index_t kSparseRatio = 8;

// One worker's running state for a block of nq queries.
template <class T>
struct DenoiserWorker {
  std::vector<T> tile;        // [TN, D] centred training rows y - c
  std::vector<T> tile_norm2;  // [TN]    ||y - c||^2
  std::vector<T> scores;      // [TQ, TN] scores, then weights (in place)
  std::vector<T> acc;         // [TQ, D]  sum_n w_n (y_n - c)
  std::vector<SoftmaxState<double>> state;  // [TQ] max kept in score units g
  std::vector<T> best_score;                // [TQ]
  std::vector<index_t> best_index;          // [TQ]

  void reset(index_t nq, index_t TN, index_t D) {
    tile.resize(TN * D);
    tile_norm2.resize(TN);
    scores.resize(nq * TN);
    acc.assign(nq * D, T(0));
    state.assign(nq, softmax_init<double>());
    best_score.assign(nq, -static_cast<T>(INFINITY));
    best_index.assign(nq, -1);
  }
};

template <class T>
void process_tile(DenoiserWorker<T>& w, const T* xc, const double* inv_sigma2, index_t nq,
                  index_t n0, index_t nt, index_t D, index_t row_offset) {
  T* s = w.scores.data();
  index_t nonzero = 0;
  // Scores g = <x - c, y - c> - ||y - c||^2 / 2 = logit * sigma^2 + (row constant).
  detail::gemm(true, nq, nt, D, T(1), xc, D, w.tile.data(), D, T(0), s, nt);
  for (index_t q = 0; q < nq; ++q) {
    T* g = s + q * nt;
    for (index_t j = 0; j < nt; ++j) {
      g[j] -= T(0.5) * w.tile_norm2[j];
      // Strict '>' over increasing rows: among equal scores the lowest index stays.
      if (g[j] > w.best_score[q]) {
        w.best_score[q] = g[j];
        w.best_index[q] = row_offset + n0 + j;
      }
    }
    const T r = softmax_push_scores(w.state[q], g, nt, static_cast<T>(inv_sigma2[q]), g);
    if (r != T(1)) detail::scale(w.acc.data() + q * D, r, D);
    for (index_t j = 0; j < nt; ++j) nonzero += g[j] != T(0);
  }
  // Small sigma: most weights underflow to exactly 0 and the second product would mostly add
  // zeros; below 1 non-zero in kSparseRatio the weighted rows are added one by one instead.
  if (nonzero * kSparseRatio <= nq * nt)
    detail::sparse_accumulate(s, nq, nt, w.tile.data(), D, w.acc.data());
  else
    detail::gemm(false, nq, D, nt, T(1), s, nt, w.tile.data(), D, T(1), w.acc.data(), D);
}

}  // namespace

template <class T>
Status empirical_denoiser_cpu(const T* x, const void* y, RowType y_type, index_t Q, index_t N,
                              index_t D, const T* center, const double* inv_sigma2,
                              index_t row_offset, index_t tile_rows, int workers,
                              double* max_logit, double* sum_exp, double* sum_exp_sq,
                              T* weighted_sum, index_t* nearest_index, double* nearest_sqdist) {
  if (Q < 1 || N < 1 || D < 1) return Status::kInvalidArgument;
  const index_t TN = plan_tile_rows(tile_rows, kDenoiserTileRows, N, D * index_t(sizeof(T)));
  const index_t n_tiles = (N + TN - 1) / TN;
  const int P = static_cast<int>(std::max<index_t>(1, std::min<index_t>(workers, n_tiles)));

  // Centred queries; ||x - c||^2 in double is the per-query constant added back at the end.
  std::vector<T> xc(Q * D);
  std::vector<double> x_norm2(Q, 0.0);
  for (index_t q = 0; q < Q; ++q)
    for (index_t d = 0; d < D; ++d) {
      const T v = x[q * D + d] - center[d];
      xc[q * D + d] = v;
      x_norm2[q] += static_cast<double>(v) * v;
    }

  std::vector<DenoiserWorker<T>> pool(P);
  std::vector<double> merged(D);
  for (index_t q0 = 0; q0 < Q; q0 += kQueryBlock) {
    const index_t nq = std::min(kQueryBlock, Q - q0);
    // Workers own contiguous shards of tiles, so shard order is row order.
    detail::parallel_for_workers(P, [&](int w) {
      long long t0, t1;
      detail::worker_range(n_tiles, w, P, t0, t1);
      DenoiserWorker<T>& wk = pool[w];
      wk.reset(nq, TN, D);
      for (index_t t = t0; t < t1; ++t) {
        const index_t n0 = t * TN, nt = std::min(TN, N - n0);
        detail::load_centred_rows(y_type, static_cast<const char*>(y) + n0 * D * row_bytes(y_type),
                                  nt, D, center, wk.tile.data(), wk.tile_norm2.data());
        process_tile(wk, xc.data() + q0 * D, inv_sigma2 + q0, nq, n0, nt, D, row_offset);
      }
    });
    for (index_t q = 0; q < nq; ++q) {
      const index_t gq = q0 + q;
      SoftmaxState<double> total = softmax_init<double>();
      std::fill(merged.begin(), merged.end(), 0.0);
      T best = -static_cast<T>(INFINITY);
      index_t best_index = -1;
      for (int w = 0; w < P; ++w) {
        const DenoiserWorker<T>& wk = pool[w];
        // Back to true logits: l = (g - ||x - c||^2 / 2) / sigma^2, in double.
        SoftmaxState<double> part = wk.state[q];
        part.max = (part.max - 0.5 * x_norm2[gq]) * inv_sigma2[gq];
        const MergeScales<double> f = softmax_merge(total, part);
        const T* a = wk.acc.data() + q * D;
        for (index_t d = 0; d < D; ++d) merged[d] = merged[d] * f.a + f.b * a[d];
        if (wk.best_score[q] > best) {  // earlier shards hold lower rows: strict '>'
          best = wk.best_score[q];
          best_index = wk.best_index[q];
        }
      }
      max_logit[gq] = total.max;
      sum_exp[gq] = total.sum;
      sum_exp_sq[gq] = total.sum_sq;
      // The products ran on y - c; sum_n w_n y_n = sum_n w_n (y_n - c) + c * sum_n w_n.
      for (index_t d = 0; d < D; ++d)
        weighted_sum[gq * D + d] = static_cast<T>(merged[d] + total.sum * center[d]);
      nearest_index[gq] = best_index;
      double dist = 0;
      const index_t local = best_index - row_offset;
      for (index_t d = 0; d < D; ++d) {
        const double diff = static_cast<double>(x[gq * D + d]) -
                            static_cast<double>(load_row_value<T>(y_type, y, local * D + d));
        dist += diff * diff;
      }
      nearest_sqdist[gq] = dist;
    }
  }
  return Status::kOk;
}

template Status empirical_denoiser_cpu<float>(const float*, const void*, RowType, index_t, index_t,
                                              index_t, const float*, const double*, index_t,
                                              index_t, int, double*, double*, double*, float*,
                                              index_t*, double*);
template Status empirical_denoiser_cpu<double>(const double*, const void*, RowType, index_t,
                                               index_t, index_t, const double*, const double*,
                                               index_t, index_t, int, double*, double*, double*,
                                               double*, index_t*, double*);

}  // namespace diffrepro
