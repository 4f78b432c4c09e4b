// SPDX-License-Identifier: Apache-2.0
// Empirical-denoiser kernels (partial online-softmax state over one chunk of training rows) and
// the launch plan that drives them. One source for nvcc and for the CPU emulator (exec_ctx.cuh):
// the emulator tests run exactly these kernels and exactly this plan.
#pragma once

#include <cmath>
#include <cstddef>

#include "diffrepro/args.h"
#include "diffrepro/config.h"
#include "diffrepro/logits.h"
#include "diffrepro/online_softmax.h"
#include "diffrepro/rows.h"
#include "diffrepro/status.h"
#include "diffrepro/topk.h"
#include "exec_ctx.cuh"
#include "tile_gemm.cuh"

namespace diffrepro {
namespace detail {

// Tile configurations. 0: 32x32 tiles, 2x2 micro-tiles on 256 threads (large Q). 1: 16x64, 1x4
// on 256 threads: for Q <= 16 a 32-query tile would leave half of every block idle. 2: 8x8 on one
// warp: exists for the emulator, where it exercises ragged edges with few OS threads.
// TK = 16 keeps the two staged slices at 2 x 32 x 17 x 4 B ~ 4.3 KB (float), so several blocks
// fit per SM; shared memory per block stays well under the 48 KB static limit even for double.
using DenoiserCfgLarge = TileConfig<32, 32, 16, 256, 2, 2>;
using DenoiserCfgNarrow = TileConfig<16, 64, 16, 256, 1, 4>;
using DenoiserCfgTiny = TileConfig<8, 8, 4, 32, 1, 2>;
inline constexpr int kDenoiserConfigs = 3;

inline int denoiser_auto_config(index_t Q) { return Q <= 16 ? 1 : 0; }

inline void denoiser_tile_shape(int config, int& TQ, int& TN) {
  switch (config) {
    case 1: TQ = DenoiserCfgNarrow::TQ; TN = DenoiserCfgNarrow::TN; break;
    case 2: TQ = DenoiserCfgTiny::TQ; TN = DenoiserCfgTiny::TN; break;
    default: TQ = DenoiserCfgLarge::TQ; TN = DenoiserCfgLarge::TN; break;
  }
}

// Partial state of one split (a contiguous range of training rows) for every query, with maxima
// in score units g (logits.h). The layout equals the final outputs', so a single-split launch
// writes straight into them (max_score then lives in max_logit until the merge kernel converts
// it; best_sqdist is already final; best_key, the nearest row's nearest_rank_key, is then unused
// and may be null).
template <class T>
struct DenoiserPartial {
  double* max_score;    // [S, Q] running max m of the scores g
  double* sum_exp;      // [S, Q] Z relative to m
  double* sum_exp_sq;   // [S, Q] Z2 relative to m
  double* best_sqdist;  // [S, Q] float64 squared distance of the nearest candidate
  index_t* best_index;  // [S, Q] its global row index (-1: none yet)
  double* best_key;     // [S, Q] its nearest_rank_key (logits.h), or null when S = 1
  T* weighted_sum;      // [S, Q, D] A relative to m, uncentred rows
};

// ------------------------------------------------------------------------------------------------
// Kernel 1: blockIdx.x = query tile, blockIdx.y = split of the training rows.
// For every TN-tile of rows of its split, the block
//   (a) walks D in TK-slices: stages x' = x~ - c and y' = y - c, accumulates g = x'.y' in
//       registers and 1/2||y'||^2 on one thread per row (centring first keeps the products small
//       when the data share a large offset, e.g. +100: then ||y||^2 ~ 3e7 D would swamp g);
//   (b) works in score units g = x'.y' - 1/2||y'||^2 (logits l = (g - 1/2||x'||^2) / sigma^2;
//       the ||x'||^2 term cancels in every softmax difference and enters only at the output,
//       logits.h), one warp per query: warp max, p = exp((g - tile max) / sigma^2) in float64
//       and sums by xor-butterflies (a fixed reduction tree, so the result does not depend on
//       scheduling), then merges the tile state into the running state with softmax_merge,
//       which returns the two scale factors; the nearest row by the CPU path's rule: every row
//       whose score lies within its rounding bound of the best is a candidate, ranked by float64
//       distance and then index (nearest_better);
//   (c) walks D again staging uncentred y and updates A[q, d] = fa A + fb sum_n p_qn y_nd.
//       A lives in global memory because TQ x D does not fit on chip for D = 3072; each (q, d)
//       belongs to one thread, so there are no atomics, and the traffic is O(TQ D) per tile
//       against O(TQ TN D) flops.
// ------------------------------------------------------------------------------------------------
template <class T, RowType R, class Cfg, bool kPrune>
DR_KERNEL void empirical_denoiser_partial_kernel(
    DenoiserArgs<T> a,          // inputs (outputs unused: the partial states go to `out`)
    index_t rows_per_split,
    DenoiserPartial<T> out,     // per-split partial states ([S, Q] / [S, Q, D])
    PruneArgs<T> prune) {       // kPrune only: mask and per-(query, prune tile) best scores
  constexpr int TQ = Cfg::TQ, TN = Cfg::TN, TK = Cfg::TK, NT = Cfg::NT;
  constexpr int RQ = Cfg::RQ, RN = Cfg::RN;
  // +1 column of padding: the micro-tile loop reads a column kk of 16/32 different rows at once.
  DR_SHARED T xs[TQ][TK + 1];     // x' slice
  DR_SHARED T ys[TN][TK + 1];     // y' slice (phase a), then uncentred y slice (phase c)
  DR_SHARED T ws[TQ][TN + 1];     // g tile, then p = exp(l - tile max)
  DR_SHARED T y_half_sq[TN];      // 1/2 ||y'_n||^2
  DR_SHARED double y_norm[TN];    // ||y'_n|| (for the score error bound)
  DR_SHARED double st_max[TQ], st_sum[TQ], st_sum_sq[TQ];
  DR_SHARED double st_lower[TQ];     // max_n (g_n - error bound): a lower bound of the best score
  DR_SHARED double st_best_d[TQ];    // float64 distance of the nearest candidate so far
  DR_SHARED double st_best_key[TQ];  // its nearest_rank_key (= st_best_d without log-weights)
  DR_SHARED index_t st_best_idx[TQ];
  DR_SHARED double x_norm[TQ];       // ||x~ - c|| (for the score error bound)
  DR_SHARED T scale_old[TQ], scale_new[TQ];  // softmax_merge factors of the current tile
  // Pruned kernel: active flags of the current prune tile (two buffers, alternating per prune
  // tile, so that a skipped tile needs one barrier only) and its two best scores so far.
  DR_SHARED unsigned char pr_active[2][TQ];
  DR_SHARED T pr_best[TQ], pr_second[TQ];

  const index_t Q = a.Q, N = a.N, D = a.D;
  const T* center = a.center;
  const int tid = static_cast<int>(dr_tid());
  const int lane = static_cast<int>(dr_lane());
  const int warp = static_cast<int>(dr_warp());
  const int tq = tid / Cfg::kThreadsN;
  const int tn = tid % Cfg::kThreadsN;
  const index_t q0 = static_cast<index_t>(dr_bid_x()) * TQ;
  const int split = static_cast<int>(dr_bid_y());
  const index_t n_begin = split * rows_per_split;
  const index_t n_end = n_begin + rows_per_split < N ? n_begin + rows_per_split : N;
  const int q_valid = Q - q0 < TQ ? static_cast<int>(Q - q0) : TQ;
  const double neg_inf = -static_cast<double>(INFINITY);
  const double gamma = score_error_gamma<T>(D);

  for (int q = tid; q < TQ; q += NT) {
    const SoftmaxState<double> s0 = softmax_init<double>();
    st_max[q] = s0.max;
    st_sum[q] = s0.sum;
    st_sum_sq[q] = s0.sum_sq;
    st_lower[q] = neg_inf;
    st_best_d[q] = static_cast<double>(INFINITY);
    st_best_key[q] = static_cast<double>(INFINITY);
    st_best_idx[q] = -1;
    double h_hi = 0.0, h_lo = 0.0;
    if (q < q_valid) half_sqnorm_dd(a.x + (q0 + q) * D, center, D, h_hi, h_lo);
    x_norm[q] = sqrt(2.0 * h_hi);
  }
  // (The first dr_sync below orders these writes before any read.)

  const T* xq = a.x + q0 * D;
  bool first = true;
  // Pruned: prune tile pt covers rows [pt * tile_rows, (pt + 1) * tile_rows); tile_rows is a
  // multiple of TN (or >= N: one tile) and splits start on prune-tile boundaries, so every TN
  // tile lies in one prune tile and one block owns each (query, prune tile) pair.
  const index_t n_ptiles = kPrune ? (N + prune.tile_rows - 1) / prune.tile_rows : 0;
  int pbuf = 0;
  for (index_t n0 = n_begin; n0 < n_end; n0 += TN) {  // uniform across the block
    if constexpr (kPrune) {
      if (n0 % prune.tile_rows == 0) {  // first TN tile of a prune tile
        const index_t pt = n0 / prune.tile_rows;
        pbuf = static_cast<int>(pt & 1);
        for (int q = tid; q < TQ; q += NT) {
          pr_active[pbuf][q] = q < q_valid && prune.active[(q0 + q) * n_ptiles + pt] != 0;
          pr_best[q] = -static_cast<T>(INFINITY);
          pr_second[q] = -static_cast<T>(INFINITY);
        }
        dr_sync();
        bool any = false;  // the same answer on every thread: the skip is block-uniform
        for (int q = 0; q < TQ; ++q) any = any || pr_active[pbuf][q] != 0;
        if (!any) {  // no query of the block wants this prune tile: neither product runs
          const index_t next = n0 + prune.tile_rows;
          n0 = (next < n_end ? next : n_end) - TN;  // the loop's += TN lands on `next`
          continue;
        }
      }
    }
    const int n_valid = n_end - n0 < TN ? static_cast<int>(n_end - n0) : TN;
    T acc[RQ][RN];
    for (int i = 0; i < RQ; ++i)
      for (int j = 0; j < RN; ++j) acc[i][j] = T(0);
    T y_acc = T(0);

    // (a) g = x'.y' over D, TK columns at a time.
    for (index_t d0 = 0; d0 < D; d0 += TK) {
      stage_slice<TQ, TK, NT>(xs, q_valid, d0, D,
                              [&](int r, index_t d) { return xq[r * D + d] - center[d]; });
      stage_slice<TN, TK, NT>(ys, n_valid, d0, D, [&](int r, index_t d) {
        return load_row_value<T>(R, a.y, (n0 + r) * D + d) - center[d];
      });
      dr_sync();
      if (tid < TN)
        for (int kk = 0; kk < TK; ++kk) y_acc += ys[tid][kk] * ys[tid][kk];
      micro_tile_update<Cfg>(xs, ys, acc, tq, tn, [](T c, T a, T b) { return c + a * b; });
      dr_sync();
    }
    if (tid < TN) {
      y_half_sq[tid] = T(0.5) * y_acc;
      y_norm[tid] = sqrt(static_cast<double>(y_acc));
    }
    dr_sync();
    for (int i = 0; i < RQ; ++i)
      for (int j = 0; j < RN; ++j) {
        const int n = tn + j * Cfg::kThreadsN;
        ws[tq + i * (TQ / RQ)][n] = acc[i][j] - y_half_sq[n];  // g in T
      }
    dr_sync();

    // (b) One warp per query row of the tile; lanes stride over the TN columns. Loop bounds
    // depend only on the warp index, so all 32 lanes reach every shuffle together.
    for (int qq = warp; qq < TQ; qq += Cfg::kWarps) {
      // Pruned: an inactive (query, tile) pair is a padding query of this tile: its scores are
      // -inf, so it adds nothing to the state and no nearest candidate.
      const bool q_ok = qq < q_valid && (!kPrune || pr_active[pbuf][qq] != 0);
      const double isg = qq < q_valid ? a.inv_sigma2[q0 + qq] : 0.0;
      const double sigma2 = qq < q_valid ? 1.0 / isg : 0.0;
      // Padding columns (rows past the split) and padding queries get g = -inf; they then
      // weigh exactly 0 below, because softmax_rescale maps -inf to 0 without forming
      // -inf - (-inf). Log-weights shift the scores by sigma^2 lw in float64 (weighted_score);
      // a row of log-weight -inf gets -inf too.
      auto score = [&](int n) -> double {
        if (!(q_ok && n < n_valid)) return neg_inf;
        const double g = static_cast<double>(ws[qq][n]);
        return a.log_weights ? weighted_score(g, a.log_weights[n0 + n], sigma2) : g;
      };
      // The score's rounding bound (+inf for an excluded row, which is never a candidate).
      auto bound = [&](int n, double g) -> double {
        const double e = score_error(gamma, x_norm[qq], y_norm[n], 2.0 * y_half_sq[n]);
        return a.log_weights ? e + weighted_score_error(g, a.log_weights[n0 + n], sigma2) : e;
      };
      double m_loc = neg_inf;
      double lower = st_lower[qq];
      for (int n = lane; n < TN; n += kWarpSize) {
        const double g = score(n);
        m_loc = g > m_loc ? g : m_loc;
        const double lo = g == neg_inf ? neg_inf : g - bound(n, g);
        lower = lo > lower ? lo : lower;
      }
      for (int off = kWarpSize / 2; off > 0; off /= 2) {
        const double m_o = dr_shfl_xor(m_loc, off);
        m_loc = m_o > m_loc ? m_o : m_loc;
        const double l_o = dr_shfl_xor(lower, off);
        lower = l_o > lower ? l_o : lower;
      }
      // Nearest row (the CPU path's rule, empirical_denoiser_cpu.cpp): float scores of two rows
      // closer than their rounding error cannot be told apart (exact duplicates, near-ties), so
      // every row whose score may still be the best is a candidate, ranked by its float64
      // distance (row_sqdist_f64, summed in the CPU's order) and then by index. Typically one
      // candidate per query and tile that improves the best.
      // With log-weights, candidates are ranked by nearest_rank_key (the largest weight).
      double best_d = static_cast<double>(INFINITY), best_k = static_cast<double>(INFINITY);
      index_t best_i = -1;
      for (int n = lane; q_ok && n < n_valid; n += kWarpSize) {
        const double g = score(n);
        if (g == neg_inf || g + bound(n, g) < lower) continue;
        const double d2 = row_sqdist_f64<T>(a.x + (q0 + qq) * D, R, a.y, n0 + n, D);
        const double key = nearest_rank_key(d2, a.log_weights, n0 + n, isg);
        const index_t gi = a.row_offset + n0 + n;
        if (nearest_better(key, gi, best_k, best_i)) {
          best_k = key;
          best_d = d2;
          best_i = gi;
        }
      }
      for (int off = kWarpSize / 2; off > 0; off /= 2) {
        const double d_o = dr_shfl_xor(best_d, off);
        const double k_o = dr_shfl_xor(best_k, off);
        const index_t i_o = dr_shfl_xor(best_i, off);
        if (nearest_better(k_o, i_o, best_k, best_i)) {
          best_k = k_o;
          best_d = d_o;
          best_i = i_o;
        }
      }
      if constexpr (kPrune) {
        // The two largest scores of the prune tile (a multiset: a duplicate counts twice, as in
        // the CPU loop), by the same fixed butterfly; max is exact, so the order is irrelevant.
        T b1 = -static_cast<T>(INFINITY), b2 = -static_cast<T>(INFINITY);
        for (int n = lane; q_ok && n < n_valid; n += kWarpSize) {
          const T g = ws[qq][n];
          if (g > b1) {
            b2 = b1;
            b1 = g;
          } else if (g > b2) {
            b2 = g;
          }
        }
        for (int off = kWarpSize / 2; off > 0; off /= 2) {
          const T o1 = dr_shfl_xor(b1, off);
          const T o2 = dr_shfl_xor(b2, off);
          const T hi = o1 > b1 ? o1 : b1, lo = o1 > b1 ? b1 : o1;
          b2 = lo > b2 ? lo : b2;
          b2 = o2 > b2 ? o2 : b2;
          b1 = hi;
        }
        if (lane == 0 && q_ok) {
          const T p1 = pr_best[qq], p2 = pr_second[qq];
          const T hi = b1 > p1 ? b1 : p1, lo = b1 > p1 ? p1 : b1;
          T sec = lo > p2 ? lo : p2;
          sec = b2 > sec ? b2 : sec;
          pr_best[qq] = hi;
          pr_second[qq] = sec;
          // Written at every TN tile of the prune tile; the last write holds the whole tile's.
          const index_t o = (q0 + qq) * n_ptiles + n0 / prune.tile_rows;
          prune.tile_best[o] = hi;
          prune.tile_second[o] = sec;
        }
      }
      double s1 = 0.0, s2 = 0.0;
      for (int n = lane; n < TN; n += kWarpSize) {
        const double g = score(n);
        const double p = softmax_rescale(g, m_loc, isg);  // in [0, 1]: m_loc is the tile max
        ws[qq][n] = static_cast<T>(p);
        s1 += p;
        s2 += p * p;
      }
      for (int off = kWarpSize / 2; off > 0; off /= 2) {
        s1 += dr_shfl_xor(s1, off);
        s2 += dr_shfl_xor(s2, off);
      }
      if (lane == 0) {
        SoftmaxState<double> st{st_max[qq], st_sum[qq], st_sum_sq[qq]};
        const MergeScales<double> f = softmax_merge(st, SoftmaxState<double>{m_loc, s1, s2}, isg);
        st_max[qq] = st.max;
        st_sum[qq] = st.sum;
        st_sum_sq[qq] = st.sum_sq;
        scale_old[qq] = static_cast<T>(f.a);
        scale_new[qq] = static_cast<T>(f.b);
        st_lower[qq] = lower;
        if (nearest_better(best_k, best_i, st_best_key[qq], st_best_idx[qq])) {
          st_best_key[qq] = best_k;
          st_best_d[qq] = best_d;
          st_best_idx[qq] = best_i;
        }
      }
    }
    dr_sync();

    // (c) A <- fa A + fb sum_n p_n y_n, restaging the same rows uncentred (the output is the
    // weighted sum of the rows themselves). On the first tile A is write-only: the workspace is
    // uninitialised and 0 * NaN would poison it.
    for (index_t d0 = 0; d0 < D; d0 += TK) {
      stage_slice<TN, TK, NT>(ys, n_valid, d0, D, [&](int r, index_t d) {
        return load_row_value<T>(R, a.y, (n0 + r) * D + d);
      });
      dr_sync();
      for (int e = tid; e < TQ * TK; e += NT) {
        const int qq = e / TK;
        const int kk = e % TK;
        const index_t d = d0 + kk;
        if (qq < q_valid && d < D) {
          if constexpr (kPrune) {
            // Inactive pair: p = 0, so A stays (fa = 1) or stays 0 (fa = 0, empty state).
            if (!pr_active[pbuf][qq]) {
              if (first) out.weighted_sum[(split * Q + q0 + qq) * D + d] = T(0);
              continue;
            }
          }
          T s = T(0);
          for (int n = 0; n < TN; ++n) s += ws[qq][n] * ys[n][kk];  // padding: p = 0, y = 0
          T* acc_out = out.weighted_sum + (split * Q + q0 + qq) * D + d;
          *acc_out = first ? scale_new[qq] * s : scale_old[qq] * *acc_out + scale_new[qq] * s;
        }
      }
      dr_sync();
    }
    first = false;
  }
  if constexpr (kPrune) {
    // Every prune tile of the split was skipped: A was never written (and the workspace is
    // uninitialised, 0 * NaN in the merge would poison the other splits' sum).
    if (first)
      for (index_t e = tid; e < static_cast<index_t>(q_valid) * D; e += NT)
        out.weighted_sum[(split * Q + q0) * D + e] = T(0);
  }

  for (int q = tid; q < q_valid; q += NT) {
    const index_t o = split * Q + q0 + q;
    out.max_score[o] = st_max[q];
    out.sum_exp[o] = st_sum[q];
    out.sum_exp_sq[o] = st_sum_sq[q];
    out.best_sqdist[o] = st_best_d[q];
    out.best_index[o] = st_best_idx[q];
    if (out.best_key) out.best_key[o] = st_best_key[q];
  }
}

// ------------------------------------------------------------------------------------------------
// Kernel 2: one block per query. Merges the S split states in split order (thread 0, with
// softmax_merge in score units; S <= kMaxSplits), folds the per-split accumulators with the
// resulting coefficients in a fixed order (float64 sum), converts the max score to the true
// logit (logit_from_score, the same code as the CPU path) and keeps the nearest of the splits'
// nearest rows (nearest_better), whose float64 distance the partial kernel computed with the
// CPU path's function and order. With S = 1 the partial kernel already wrote the sums and the
// nearest row into the outputs.
// ------------------------------------------------------------------------------------------------
inline constexpr int kDenoiserMergeThreads = 128;

template <class T, RowType R, bool kPrune>
DR_KERNEL void empirical_denoiser_merge_kernel(
    DenoiserArgs<T> a,           // inputs and final outputs
    int S,
    DenoiserPartial<T> part) {   // [S, Q] / [S, Q, D] (aliases the outputs when S = 1)
  constexpr int NT = kDenoiserMergeThreads;
  DR_SHARED double coef[kMaxSplits];
  const int tid = static_cast<int>(dr_tid());
  const index_t q = dr_bid_x();
  const index_t Q = a.Q, D = a.D;

  if (tid == 0) {
    SoftmaxState<double> st{part.max_score[q], part.sum_exp[q], part.sum_exp_sq[q]};
    double best_d = part.best_sqdist[q];
    double best_k = S > 1 ? part.best_key[q] : best_d;
    index_t best_i = part.best_index[q];
    coef[0] = 1.0;
    for (int s = 1; s < S; ++s) {
      const index_t o = s * Q + q;
      const MergeScales<double> f = softmax_merge(
          st, SoftmaxState<double>{part.max_score[o], part.sum_exp[o], part.sum_exp_sq[o]},
          a.inv_sigma2[q]);
      for (int j = 0; j < s; ++j) coef[j] *= f.a;  // A = fa A + fb A_s, unrolled
      coef[s] = f.b;
      if (nearest_better(part.best_key[o], part.best_index[o], best_k, best_i)) {
        best_k = part.best_key[o];
        best_d = part.best_sqdist[o];
        best_i = part.best_index[o];
      }
    }
    double h_hi, h_lo;
    half_sqnorm_dd(a.x + q * D, a.center, D, h_hi, h_lo);
    if (kPrune && st.max == -static_cast<double>(INFINITY)) {  // pruned: no active row
      a.max_logit[q] = st.max;
      a.max_logit_lo[q] = 0.0;
    } else {
      logit_from_score(st.max, h_hi, h_lo, a.inv_sigma2[q], a.max_logit[q], a.max_logit_lo[q]);
    }
    a.sum_exp[q] = st.sum;
    a.sum_exp_sq[q] = st.sum_sq;
    a.nearest_index[q] = best_i;
    a.nearest_sqdist[q] = best_d;  // +inf when no row was seen
  }
  dr_sync();
  if (S > 1) {  // uniform: S is a kernel argument
    for (index_t d = tid; d < D; d += NT) {
      double acc = 0.0;
      for (int s = 0; s < S; ++s)
        acc += coef[s] * static_cast<double>(part.weighted_sum[(s * Q + q) * D + d]);
      a.weighted_sum[q * D + d] = static_cast<T>(acc);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Plan and launch (shared by the CUDA launcher and the emulator module).
// ------------------------------------------------------------------------------------------------

// Pruned kernel: the configuration that runs it, or -1 when tile_rows does not fit. Every TN tile
// of the kernel must lie in one prune tile, so tile_rows must be a multiple of TN or cover all N
// rows (one prune tile). A forced config is taken or refused; automatic: the dense choice, then
// 0 (TN = 32), then 2 (TN = 8), the first whose TN divides tile_rows.
inline int pruned_config(index_t Q, index_t N, index_t tile_rows, int config) {
  if (tile_rows < 1 || config >= kDenoiserConfigs) return -1;
  auto fits = [&](int c) {
    int TQ, TN;
    denoiser_tile_shape(c, TQ, TN);
    return tile_rows >= N || tile_rows % TN == 0;
  };
  if (config >= 0) return fits(config) ? config : -1;
  for (int c : {denoiser_auto_config(Q), 0, 2})
    if (fits(c)) return c;
  return -1;
}

// Split plan of a launch. Dense: whole TN tiles per split. Pruned (tile_rows > 0): whole prune
// tiles per split, so that one block owns every (query, prune tile) pair and writes its two best
// scores without a merge.
inline SplitPlan denoiser_plan(index_t Q, index_t N, int TQ, int TN, index_t tile_rows,
                               int forced_splits) {
  return tile_rows > 0 ? plan_splits(Q, N, TQ, tile_rows, forced_splits)
                       : plan_splits(Q, N, TQ, TN, forced_splits);
}

// Workspace for `splits` partial states (zero bytes when one split suffices). tile_rows > 0: the
// pruned kernel's plan (0 bytes when it refuses tile_rows; the launch then fails anyway).
inline std::size_t denoiser_workspace_bytes(index_t Q, index_t N, index_t D, int config,
                                            int forced_splits, std::size_t elem_size,
                                            index_t tile_rows = 0) {
  if (Q <= 0 || N <= 0 || D <= 0) return 0;
  if (tile_rows > 0)
    config = pruned_config(Q, N, tile_rows, config);
  else if (config < 0)
    config = denoiser_auto_config(Q);
  if (config < 0 || config >= kDenoiserConfigs) return 0;
  int TQ, TN;
  denoiser_tile_shape(config, TQ, TN);
  const SplitPlan p = denoiser_plan(Q, N, TQ, TN, tile_rows, forced_splits);
  if (p.splits <= 1) return 0;
  const std::size_t sq = static_cast<std::size_t>(p.splits) * static_cast<std::size_t>(Q);
  return align_up(sq * static_cast<std::size_t>(D) * elem_size) + 5 * align_up(sq * sizeof(double)) +
         align_up(sq * sizeof(index_t));
}

template <class T, RowType R, class Cfg, bool kPrune>
Status denoiser_launch_cfg(const DenoiserArgs<T>& a, const PruneArgs<T>& pr, const Tuning& t,
                           void* stream) {
  const SplitPlan p = denoiser_plan(a.Q, a.N, Cfg::TQ, Cfg::TN, kPrune ? pr.tile_rows : 0, t.splits);
  DenoiserPartial<T> part{a.max_logit, a.sum_exp,       a.sum_exp_sq, a.nearest_sqdist,
                          a.nearest_index, nullptr, a.weighted_sum};
  if (p.splits > 1) {
    if (t.workspace == nullptr) return Status::kInvalidArgument;
    const std::size_t sq = static_cast<std::size_t>(p.splits) * static_cast<std::size_t>(a.Q);
    char* w = static_cast<char*>(t.workspace);
    part.weighted_sum = reinterpret_cast<T*>(w);
    w += align_up(sq * static_cast<std::size_t>(a.D) * sizeof(T));
    part.max_score = reinterpret_cast<double*>(w);
    w += align_up(sq * sizeof(double));
    part.sum_exp = reinterpret_cast<double*>(w);
    w += align_up(sq * sizeof(double));
    part.sum_exp_sq = reinterpret_cast<double*>(w);
    w += align_up(sq * sizeof(double));
    part.best_sqdist = reinterpret_cast<double*>(w);
    w += align_up(sq * sizeof(double));
    part.best_key = reinterpret_cast<double*>(w);
    w += align_up(sq * sizeof(double));
    part.best_index = reinterpret_cast<index_t*>(w);
  }
  Status st = launch_kernel(&empirical_denoiser_partial_kernel<T, R, Cfg, kPrune>,
                            Dim2{static_cast<unsigned>(p.q_tiles), static_cast<unsigned>(p.splits)},
                            Dim2{Cfg::NT, 1}, stream, a, p.rows_per_split, part, pr);
  if (st != Status::kOk) return st;
  return launch_kernel(&empirical_denoiser_merge_kernel<T, R, kPrune>,
                       Dim2{static_cast<unsigned>(a.Q), 1}, Dim2{kDenoiserMergeThreads, 1}, stream,
                       a, p.splits, part);
}

template <class T, RowType R, bool kPrune>
Status denoiser_launch_rows(int config, const DenoiserArgs<T>& a, const PruneArgs<T>& pr,
                            const Tuning& t, void* stream) {
  switch (config) {
    case 1: return denoiser_launch_cfg<T, R, DenoiserCfgNarrow, kPrune>(a, pr, t, stream);
    case 2: return denoiser_launch_cfg<T, R, DenoiserCfgTiny, kPrune>(a, pr, t, stream);
    default: return denoiser_launch_cfg<T, R, DenoiserCfgLarge, kPrune>(a, pr, t, stream);
  }
}

// Validates sizes and dispatches on the row storage type and the tile configuration
// (t.config < 0: automatic; t.splits <= 0: automatic). Q = 0 is a no-op. kPrune: the pruned
// kernel with pr (pruned_config decides the configuration; kInvalidArgument when none fits).
template <class T, bool kPrune = false>
Status denoiser_run(const DenoiserArgs<T>& a, const Tuning& t, void* stream,
                    const PruneArgs<T>& pr = PruneArgs<T>{}) {
  if (a.Q < 0 || a.N < 1 || a.D < 1 || a.row_offset < 0) return Status::kInvalidArgument;
  if (t.config >= kDenoiserConfigs || t.splits > kMaxSplits) return Status::kInvalidArgument;
  if (kPrune && pruned_config(a.Q, a.N, pr.tile_rows, t.config) < 0) return Status::kInvalidArgument;
  if (a.Q == 0) return Status::kOk;
  // gridDim.x (query tiles, and Q merge blocks) must fit CUDA's 2^31 - 1 limit.
  if (a.Q > index_t(0x7fffffff)) return Status::kInvalidArgument;
  if (!a.x || !a.y || !a.center || !a.inv_sigma2 || !a.max_logit || !a.max_logit_lo ||
      !a.sum_exp || !a.sum_exp_sq || !a.weighted_sum || !a.nearest_index || !a.nearest_sqdist)
    return Status::kInvalidArgument;
  if (kPrune && (!pr.active || !pr.tile_best || !pr.tile_second)) return Status::kInvalidArgument;
  const int config = kPrune ? pruned_config(a.Q, a.N, pr.tile_rows, t.config)
                            : (t.config < 0 ? denoiser_auto_config(a.Q) : t.config);
  switch (a.y_type) {
    case RowType::kFloat32:
      return denoiser_launch_rows<T, RowType::kFloat32, kPrune>(config, a, pr, t, stream);
    case RowType::kFloat64:
      return denoiser_launch_rows<T, RowType::kFloat64, kPrune>(config, a, pr, t, stream);
    case RowType::kUInt8:
      return denoiser_launch_rows<T, RowType::kUInt8, kPrune>(config, a, pr, t, stream);
    case RowType::kFloat16:
      return denoiser_launch_rows<T, RowType::kFloat16, kPrune>(config, a, pr, t, stream);
  }
  return Status::kInvalidArgument;
}

}  // namespace detail
}  // namespace diffrepro
