// SPDX-License-Identifier: Apache-2.0
// Empirical optimal denoiser on the CPU: one streaming pass over training tiles per query block.
// For each tile, product 1 gives the scores, the online softmax turns them into weights in place,
// and product 2 adds the weighted tile to the accumulator while the tile is still in cache.
// With a PruneArgs mask (pruned_denoiser_cpu) each tile runs for its active queries only, gathered
// into the products; neighbouring prune tiles with the same active queries run as one kernel tile
// of up to kDenoiserTileRows rows (a fully active call then streams like the dense one), and
// kernel tiles are dealt to the workers round-robin so that the few active tiles of a late,
// sparse call spread over all of them.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "diffrepro/api_cpu.h"
#include "diffrepro/logits.h"
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
// Pruned: a tile active for at least (kWholeRatio - 1) / kWholeRatio of the block's queries runs
// the products over the whole block, the inactive queries' weights zeroed: gathering the active
// queries and scattering their sums back costs more than the few wasted rows.
constexpr index_t kWholeRatio = 8;

// One worker's running state for a block of nq queries.
template <class T>
struct DenoiserWorker {
  std::vector<T> tile;        // [TN, D] centred training rows y - c
  std::vector<T> tile_norm2;  // [TN]    ||y - c||^2
  std::vector<double> tile_norm;  // [TN] ||y - c|| (for the score error bound)
  std::vector<T> scores;      // [TQ, TN] scores, then weights (in place)
  std::vector<T> acc;         // [TQ, D]  sum_n w_n (y_n - c)
  std::vector<T> gathered;    // [TQ, D]  pruned: the tile's active centred queries
  std::vector<T> part;        // [TQ, D]  pruned: their second product
  std::vector<double> adjusted;  // [TN] log-weights: one query's scores g + sigma^2 lw (float64)
  std::vector<index_t> members;  // pruned: the tile's active queries (block-local)
  std::vector<std::uint8_t> on;  // pruned: [TQ] is the query active for the tile
  std::vector<SoftmaxState<double>> state;  // [TQ] max kept in score units g
  std::vector<double> lower;        // [TQ] max_n (g_n - error bound): a lower bound of the best
  std::vector<double> best_sqdist;  // [TQ] float64 distance of the nearest candidate
  std::vector<double> best_key;     // [TQ] its nearest_rank_key (= best_sqdist without log-weights)
  std::vector<index_t> best_index;  // [TQ] its global index (-1: none yet)

  void reset(index_t nq, index_t TN, index_t D) {
    tile.resize(TN * D);
    tile_norm2.resize(TN);
    tile_norm.resize(TN);
    scores.resize(nq * TN);
    adjusted.resize(TN);
    acc.assign(nq * D, T(0));
    members.resize(nq);
    on.resize(nq);
    state.assign(nq, softmax_init<double>());
    lower.assign(nq, -INFINITY);
    best_sqdist.assign(nq, INFINITY);
    best_key.assign(nq, INFINITY);
    best_index.assign(nq, -1);
  }
};

// Per-call constants shared by the workers.
template <class T>
struct DenoiserCall {
  const DenoiserArgs<T>& a;
  const T* xc;          // [Q, D] centred queries x - c
  const double* x_norm;  // [Q] ||x - c||
  double gamma;         // score_error_gamma<T>(D)
  const PruneArgs<T>* prune;  // nullptr: dense
  index_t n_tiles;
};

// Nearest row: the float scores of two rows closer than their rounding error cannot be told
// apart (exact duplicates at different positions of a GEMM tile get different roundings), so
// every row whose score may still be the best is a candidate, and candidates are ranked by their
// float64 distance and then by index (nearest_better). Few rows pass the bound in practice: a row
// must be within the float rounding of the best score seen so far. With log-weights, g holds the
// weighted scores g + sigma^2 lw (float64), rows of log-weight -inf are never candidates, and
// candidates are ranked by nearest_rank_key (the largest weight).
template <class T, class S>
void nearest_candidates(DenoiserWorker<T>& w, const DenoiserCall<T>& c, index_t q0, index_t q,
                        const S* g, index_t n0, index_t nt) {
  const DenoiserArgs<T>& a = c.a;
  const index_t gq = q0 + q;
  const double sigma2 = 1.0 / a.inv_sigma2[gq];
  for (index_t j = 0; j < nt; ++j) {
    double err = score_error(c.gamma, c.x_norm[gq], w.tile_norm[j], w.tile_norm2[j]);
    const double gj = static_cast<double>(g[j]);
    if (a.log_weights != nullptr) {
      const double lw = a.log_weights[n0 + j];
      if (lw == -INFINITY) continue;  // weight 0: never the mode
      err += weighted_score_error(gj, lw, sigma2);
    }
    if (gj + err < w.lower[q]) continue;  // provably farther than a row already seen
    if (gj - err > w.lower[q]) w.lower[q] = gj - err;
    const double d2 = row_sqdist_f64<T>(a.x + gq * a.D, a.y_type, a.y, n0 + j, a.D);
    const double key = nearest_rank_key(d2, a.log_weights, n0 + j, a.inv_sigma2[gq]);
    const index_t gi = a.row_offset + n0 + j;
    if (nearest_better(key, gi, w.best_key[q], w.best_index[q])) {
      w.best_key[q] = key;
      w.best_sqdist[q] = d2;
      w.best_index[q] = gi;
    }
  }
}

// One query's tile of scores g (centred products minus half norms) into the softmax state:
// nearest candidates, then the weights written over g. Returns the factor of the accumulator.
// Log-weights: the scores are shifted by sigma^2 lw in float64 first (weighted_score).
template <class T>
T push_query_tile(DenoiserWorker<T>& w, const DenoiserCall<T>& c, index_t q0, index_t q, T* g,
                  index_t n0, index_t nt) {
  const double inv_sigma2 = c.a.inv_sigma2[q0 + q];
  if (c.a.log_weights == nullptr) {
    nearest_candidates(w, c, q0, q, g, n0, nt);
    return softmax_push_scores(w.state[q], g, nt, static_cast<T>(inv_sigma2), g);
  }
  double* adj = w.adjusted.data();
  const double sigma2 = 1.0 / inv_sigma2;
  for (index_t j = 0; j < nt; ++j)
    adj[j] = weighted_score(static_cast<double>(g[j]), c.a.log_weights[n0 + j], sigma2);
  nearest_candidates(w, c, q0, q, adj, n0, nt);
  const double r = softmax_push_scores(w.state[q], adj, nt, inv_sigma2, adj);
  for (index_t j = 0; j < nt; ++j) g[j] = static_cast<T>(adj[j]);
  return static_cast<T>(r);
}

// The queries of the block that tile `tile` is computed for: all of them (dense), or those the
// prune mask marks active. Returns their number.
template <class T>
index_t tile_members(DenoiserWorker<T>& w, const DenoiserCall<T>& c, index_t q0, index_t nq,
                     index_t tile) {
  if (c.prune == nullptr) return nq;
  index_t na = 0;
  for (index_t q = 0; q < nq; ++q) {
    w.on[q] = c.prune->active[(q0 + q) * c.n_tiles + tile] != 0;
    if (w.on[q]) w.members[na++] = q;
  }
  return na;
}

// Rows [n0, n0 + nt) as one kernel tile. Dense: `tile` is the kernel tile. Pruned: the rows are
// prune tiles tile .. tile + n_sub - 1, all with the same active queries (the mask of `tile`).
template <class T>
void process_tile(DenoiserWorker<T>& w, const DenoiserCall<T>& c, index_t q0, index_t nq,
                  index_t tile, index_t n_sub, index_t n0, index_t nt) {
  const index_t na = tile_members(w, c, q0, nq, tile);
  if (na == 0) return;  // not even read
  const index_t D = c.a.D;
  detail::load_centred_rows(c.a.y_type,
                            static_cast<const char*>(c.a.y) + n0 * D * row_bytes(c.a.y_type), nt,
                            D, c.a.center, w.tile.data(), w.tile_norm2.data());
  // all: the products run over every query of the block (no gather, no scatter); the inactive
  // ones, if any, get zero weights and no softmax update.
  const bool all = na * kWholeRatio >= nq * (kWholeRatio - 1);
  const index_t nr = all ? nq : na;  // rows of the products
  auto member = [&](index_t i) { return all ? i : w.members[i]; };
  if (!all) {
    w.gathered.resize(nq * D);
    for (index_t i = 0; i < na; ++i)
      std::copy_n(c.xc + (q0 + w.members[i]) * D, D, w.gathered.data() + i * D);
  }
  T* s = w.scores.data();
  index_t nonzero = 0;
  // Scores g = <x - c, y - c> - ||y - c||^2 / 2 = logit * sigma^2 + ||x - c||^2 / 2 (per query).
  detail::gemm(true, nr, nt, D, T(1), all ? c.xc + q0 * D : w.gathered.data(), D, w.tile.data(), D,
               T(0), s, nt);
  for (index_t j = 0; j < nt; ++j) w.tile_norm[j] = std::sqrt(static_cast<double>(w.tile_norm2[j]));
  for (index_t i = 0; i < nr; ++i) {
    const index_t q = member(i);
    T* g = s + i * nt;
    if (c.prune != nullptr && !w.on[q]) {  // computed over the whole block, but not active
      std::fill_n(g, nt, T(0));
      continue;
    }
    for (index_t j = 0; j < nt; ++j) g[j] -= T(0.5) * w.tile_norm2[j];
    if (c.prune != nullptr) {  // each prune tile's two best scores, for the caller's bounds
      const index_t rows = c.prune->tile_rows;
      for (index_t sub = 0; sub < n_sub; ++sub) {
        T first = -static_cast<T>(INFINITY), second = -static_cast<T>(INFINITY);
        for (index_t j = sub * rows; j < std::min(nt, (sub + 1) * rows); ++j) {
          if (g[j] > first) {
            second = first;
            first = g[j];
          } else if (g[j] > second) {
            second = g[j];
          }
        }
        c.prune->tile_best[(q0 + q) * c.n_tiles + tile + sub] = first;
        c.prune->tile_second[(q0 + q) * c.n_tiles + tile + sub] = second;
      }
    }
    const T r = push_query_tile(w, c, q0, q, g, n0, nt);
    if (r != T(1)) detail::scale(w.acc.data() + q * D, r, D);
    for (index_t j = 0; j < nt; ++j) nonzero += g[j] != T(0);
  }
  // Small sigma: most weights underflow to exactly 0 and the second product would mostly add
  // zeros; below 1 non-zero in kSparseRatio the weighted rows are added one by one instead.
  if (nonzero * kSparseRatio <= na * nt) {
    for (index_t i = 0; i < nr; ++i)
      detail::sparse_accumulate(s + i * nt, 1, nt, w.tile.data(), D, w.acc.data() + member(i) * D);
  } else if (all) {
    detail::gemm(false, nq, D, nt, T(1), s, nt, w.tile.data(), D, T(1), w.acc.data(), D);
  } else {
    w.part.resize(nq * D);
    detail::gemm(false, na, D, nt, T(1), s, nt, w.tile.data(), D, T(0), w.part.data(), D);
    for (index_t i = 0; i < na; ++i) {
      T* acc = w.acc.data() + w.members[i] * D;
      const T* p = w.part.data() + i * D;
      for (index_t d = 0; d < D; ++d) acc[d] += p[d];
    }
  }
}

// Pruned: the kernel tiles of a query block, as (first prune tile, count): runs of up to
// `per` neighbouring prune tiles whose active queries in the block are the same.
inline void group_tiles(const std::uint8_t* active, index_t n_tiles, index_t q0, index_t nq,
                        index_t per, std::vector<index_t>& first, std::vector<index_t>& count) {
  first.clear();
  count.clear();
  auto same = [&](index_t a, index_t b) {
    for (index_t q = q0; q < q0 + nq; ++q)
      if ((active[q * n_tiles + a] != 0) != (active[q * n_tiles + b] != 0)) return false;
    return true;
  };
  for (index_t t = 0; t < n_tiles;) {
    index_t m = 1;
    while (m < per && t + m < n_tiles && same(t, t + m)) ++m;
    first.push_back(t);
    count.push_back(m);
    t += m;
  }
}

}  // namespace

namespace {

template <class T>
Status denoise(const DenoiserArgs<T>& a, const PruneArgs<T>* prune, const Tuning& t) {
  const index_t Q = a.Q, N = a.N, D = a.D;
  if (Q < 1 || N < 1 || D < 1) return Status::kInvalidArgument;
  if (prune != nullptr && prune->tile_rows < 1) return Status::kInvalidArgument;
  const index_t TN = prune != nullptr ? std::min(prune->tile_rows, N)
                                      : plan_tile_rows(t.tile_rows, kDenoiserTileRows, N,
                                                       D * index_t(sizeof(T)));
  const index_t n_tiles = (N + TN - 1) / TN;
  // Pruned: prune tiles per kernel tile at most (rows of the dense kernel's tile, capped by N).
  const index_t per = prune != nullptr ? std::max<index_t>(1, std::min(kDenoiserTileRows, N) / TN) : 1;
  const int P = static_cast<int>(std::max<index_t>(1, std::min<index_t>(t.workers, n_tiles)));

  // Centred queries, and h = ||x - c||^2 / 2 in double-double for the logits (logits.h).
  std::vector<T> xc(Q * D);
  std::vector<double> x_norm(Q), h_hi(Q), h_lo(Q);
  for (index_t q = 0; q < Q; ++q) {
    for (index_t d = 0; d < D; ++d) xc[q * D + d] = a.x[q * D + d] - a.center[d];
    half_sqnorm_dd(a.x + q * D, a.center, D, h_hi[q], h_lo[q]);
    x_norm[q] = std::sqrt(2.0 * h_hi[q]);
  }
  const DenoiserCall<T> call{a, xc.data(), x_norm.data(), score_error_gamma<T>(D), prune, n_tiles};

  std::vector<DenoiserWorker<T>> pool(P);
  std::vector<double> merged(D);
  std::vector<index_t> group_first, group_count;
  for (index_t q0 = 0; q0 < Q; q0 += kQueryBlock) {
    const index_t nq = std::min(kQueryBlock, Q - q0);
    if (prune != nullptr) group_tiles(prune->active, n_tiles, q0, nq, per, group_first, group_count);
    // Dense: workers own contiguous shards of tiles, so shard order is row order. Pruned: kernel
    // tiles round-robin (the active ones are few and may sit together); ties are decided by index.
    detail::parallel_for_workers(P, [&](int w) {
      DenoiserWorker<T>& wk = pool[w];
      wk.reset(nq, TN * per, D);
      if (prune != nullptr) {
        for (std::size_t g = w; g < group_first.size(); g += P) {
          const index_t n0 = group_first[g] * TN;
          process_tile(wk, call, q0, nq, group_first[g], group_count[g], n0,
                       std::min(TN * group_count[g], N - n0));
        }
        return;
      }
      long long t0, t1;
      detail::worker_range(n_tiles, w, P, t0, t1);
      for (index_t tile = t0; tile < t1; ++tile)
        process_tile(wk, call, q0, nq, tile, 1, tile * TN, std::min(TN, N - tile * TN));
    });
    for (index_t q = 0; q < nq; ++q) {
      const index_t gq = q0 + q;
      // Workers merge in score units: the same scores give the same answer for any number of
      // workers, however large ||x - c||^2 is.
      SoftmaxState<double> total = softmax_init<double>();
      std::fill(merged.begin(), merged.end(), 0.0);
      double best_sqdist = INFINITY, best_key = INFINITY;
      index_t best_index = -1;
      for (int w = 0; w < P; ++w) {
        const DenoiserWorker<T>& wk = pool[w];
        const MergeScales<double> f = softmax_merge(total, wk.state[q], a.inv_sigma2[gq]);
        const T* acc = wk.acc.data() + q * D;
        for (index_t d = 0; d < D; ++d) merged[d] = merged[d] * f.a + f.b * acc[d];
        if (nearest_better(wk.best_key[q], wk.best_index[q], best_key, best_index)) {
          best_key = wk.best_key[q];
          best_sqdist = wk.best_sqdist[q];
          best_index = wk.best_index[q];
        }
      }
      if (total.max == -INFINITY) {  // pruned: no tile of this chunk was active for the query
        a.max_logit[gq] = -INFINITY;
        a.max_logit_lo[gq] = 0.0;
      } else {
        logit_from_score(total.max, h_hi[gq], h_lo[gq], a.inv_sigma2[gq], a.max_logit[gq],
                         a.max_logit_lo[gq]);
      }
      a.sum_exp[gq] = total.sum;
      a.sum_exp_sq[gq] = total.sum_sq;
      // The products ran on y - c; sum_n w_n y_n = sum_n w_n (y_n - c) + c * sum_n w_n.
      for (index_t d = 0; d < D; ++d)
        a.weighted_sum[gq * D + d] = static_cast<T>(merged[d] + total.sum * a.center[d]);
      a.nearest_index[gq] = best_index;
      a.nearest_sqdist[gq] = best_sqdist;
    }
  }
  return Status::kOk;
}

}  // namespace

template <class T>
Status empirical_denoiser_cpu(const DenoiserArgs<T>& a, const Tuning& t) {
  return denoise<T>(a, nullptr, t);
}

template <class T>
Status pruned_denoiser_cpu(const DenoiserArgs<T>& a, const PruneArgs<T>& p, const Tuning& t) {
  return denoise<T>(a, &p, t);
}

template Status empirical_denoiser_cpu<float>(const DenoiserArgs<float>&, const Tuning&);
template Status empirical_denoiser_cpu<double>(const DenoiserArgs<double>&, const Tuning&);
template Status pruned_denoiser_cpu<float>(const DenoiserArgs<float>&, const PruneArgs<float>&,
                                           const Tuning&);
template Status pruned_denoiser_cpu<double>(const DenoiserArgs<double>&,
                                            const PruneArgs<double>&, const Tuning&);

}  // namespace diffrepro
