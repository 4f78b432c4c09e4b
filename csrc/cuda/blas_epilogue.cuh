// SPDX-License-Identifier: Apache-2.0
// Epilogue kernels of the BLAS engine: everything around the vendor GEMMs of one chunk of C rows
// (docs/cuda.md). The GEMMs write a [Q, C] product tile; these kernels turn it into the float64
// online-softmax state, the nearest row and the top-k lists, reading the tile once or twice and
// writing the weights once (12 bytes per (query, row) pair for float32, against ~136 for the same
// steps as separate float64 torch operations). One source for nvcc and for the CPU emulator
// (exec_ctx.cuh); the emulator tests run exactly these kernels.
//
// Per chunk of the empirical denoiser (queries x' = x~ - c, rows y' = y - c):
//   GEMM 1              g = x' y'^T                               [Q, C] in T
//   softmax_chunk       scores s = g - |y'|^2/2 in float64 (the logit is (s - |x'|^2/2) / sigma^2);
//                       s_new = max(s_max, max s); p = exp((s - s_new) / sigma^2) -> T; Z, Z2
//                       updated; factor r = exp((s_max - s_new) / sigma^2); nearest row by
//                       float64 distance among the near-maximal candidates. The running max
//                       stays in score units (logits.h): the caller forms the max logit once.
//   GEMM 2              a = p y                                   [Q, D] in T
//   scale_accumulate    A = r A + a                               [Q, D] in float64
// Per chunk of nn_search: GEMM s = q r^T (or the centred expanded L2 form), chunk_topk, then
// merge_topk with the running lists.
#pragma once

#include <cmath>

#include "diffrepro/config.h"
#include "diffrepro/online_softmax.h"
#include "diffrepro/rows.h"
#include "diffrepro/status.h"
#include "diffrepro/topk.h"
#include "exec_ctx.cuh"

namespace diffrepro {
namespace detail {

// One block per query row for the per-row kernels; 256 threads stream the C columns.
inline constexpr int kEpilogueThreads = 256;
// Threads of a chunk_topk block and the list capacities it is instantiated for.
inline constexpr int kTopkThreads = 32;
inline constexpr int kTopkSmallK = 16;
inline constexpr int kTopkMaxK = 128;

// Fixed-shape tree reduction over the NT slots of shared arrays (the same tree on every run, so
// sums are reproducible). Every thread of the block must call it.
template <int NT, class F>
DR_DEVICE void block_tree(F combine) {
  for (int s = NT / 2; s > 0; s /= 2) {
    if (static_cast<int>(dr_tid()) < s) combine(static_cast<int>(dr_tid()), static_cast<int>(dr_tid()) + s);
    dr_sync();
  }
}

// ------------------------------------------------------------------------------------------------
// softmax_chunk: blockIdx.x = query. Pass 1 finds the largest score s = g - |y'|^2/2 (the logit is
// l = (s - |x'|^2/2) / sigma^2, monotone in s) and the largest |y'|^2/2 of the chunk; x_half
// (|x'|^2/2) is used only for the candidate threshold. The nearest
// row is then chosen by float64 distance among the candidates whose s lies within
//   delta = 8 sqrt(D) u |x'| max|y'|        (u: unit roundoff of the product, caller-supplied)
// of the maximum, i.e. within eight standard deviations of the GEMM's rounding error: a GEMM may
// round two identical rows differently (different micro-kernel paths for edge columns), so the
// first maximum of s alone would not honour the lowest-index rule for exact duplicates. The
// candidate replaces the running nearest row only when strictly nearer (later chunks hold higher
// indices). Pass 2 recomputes the scores (a float64 [Q, C] buffer would cost more traffic than
// the recomputation), writes p = exp((s - s_new) / sigma^2) and sums p and p^2 in float64.
// ------------------------------------------------------------------------------------------------
template <class T>
DR_KERNEL void softmax_chunk_kernel(const T* g, index_t ldg, index_t C, const double* y_half,
                                    const double* x_half, const double* inv_sigma2, const T* x,
                                    const void* rows, RowType rows_type, index_t D, double unit_roundoff,
                                    index_t chunk_offset, double* max_score, double* sum_exp,
                                    double* sum_exp_sq, double* scale_old, double* nearest_sqdist,
                                    index_t* nearest_index, T* p, index_t ldp) {
  constexpr int NT = kEpilogueThreads;
  DR_SHARED double red_v[NT];
  DR_SHARED index_t red_i[NT];
  DR_SHARED double red_w[NT];
  const int tid = static_cast<int>(dr_tid());
  const index_t q = dr_bid_x();
  const T* gq = g + q * ldg;
  const double xh = x_half[q];
  const double isg = inv_sigma2[q];
  const double neg_inf = -static_cast<double>(INFINITY);
  const double inf = static_cast<double>(INFINITY);

  // Pass 1: the largest score with its first column, and the largest |y'|^2 / 2.
  double s_max = neg_inf, yh_max = 0.0;
  index_t arg = -1;
  for (index_t n = tid; n < C; n += NT) {
    const double sc = static_cast<double>(gq[n]) - y_half[n];
    if (arg < 0 || sc > s_max) {
      s_max = sc;
      arg = n;
    }
    yh_max = y_half[n] > yh_max ? y_half[n] : yh_max;
  }
  red_v[tid] = s_max;
  red_i[tid] = arg;
  red_w[tid] = yh_max;
  dr_sync();
  block_tree<NT>([&](int a, int b) {
    if (topk_better(red_v[b], red_i[b], red_v[a], red_i[a], true)) {
      red_v[a] = red_v[b];
      red_i[a] = red_i[b];
    }
    red_w[a] = red_w[b] > red_w[a] ? red_w[b] : red_w[a];
  });
  const double s_chunk = red_v[0];
  const double threshold = s_chunk - 8.0 * sqrt(static_cast<double>(D)) * unit_roundoff * sqrt(2.0 * xh) *
                                         sqrt(2.0 * red_w[0]);
  dr_sync();  // red_* are reused below

  // Pass 1b: float64 distances of the candidates; the nearest, lowest column on a tie.
  const T* xq = x + q * D;
  double best_d = inf;
  index_t best_n = -1;
  for (index_t n = tid; n < C; n += NT) {
    if (static_cast<double>(gq[n]) - y_half[n] < threshold) continue;
    double d2 = 0.0;
    for (index_t d = 0; d < D; ++d) {
      const double diff = static_cast<double>(xq[d]) -
                          static_cast<double>(load_row_value<T>(rows_type, rows, n * D + d));
      d2 += diff * diff;
    }
    if (d2 < best_d) {  // increasing n: strict < keeps the lower column
      best_d = d2;
      best_n = n;
    }
  }
  red_v[tid] = best_d;
  red_i[tid] = best_n;
  dr_sync();
  block_tree<NT>([&](int a, int b) {
    if (topk_better(red_v[b], red_i[b], red_v[a], red_i[a], false)) {
      red_v[a] = red_v[b];
      red_i[a] = red_i[b];
    }
  });
  const double cand_d = red_v[0];
  const index_t cand_n = red_i[0];
  const double m_old = max_score[q];
  const double m_new = s_chunk > m_old ? s_chunk : m_old;
  dr_sync();

  // Pass 2: weights relative to the new running max, and their sums in float64.
  T* pq = p + q * ldp;
  double s1 = 0.0, s2 = 0.0;
  for (index_t n = tid; n < C; n += NT) {
    const double w = exp((static_cast<double>(gq[n]) - y_half[n] - m_new) * isg);
    pq[n] = static_cast<T>(w);
    s1 += w;
    s2 += w * w;
  }
  red_v[tid] = s1;
  red_w[tid] = s2;
  dr_sync();
  block_tree<NT>([&](int a, int b) {
    red_v[a] += red_v[b];
    red_w[a] += red_w[b];
  });
  if (tid == 0) {
    const double r = softmax_rescale(m_old, m_new, isg);  // 0 while the state is empty
    sum_exp[q] = sum_exp[q] * r + red_v[0];
    sum_exp_sq[q] = sum_exp_sq[q] * r * r + red_w[0];
    max_score[q] = m_new;
    scale_old[q] = r;
    if (nearest_index[q] < 0 || cand_d < nearest_sqdist[q]) {
      nearest_sqdist[q] = cand_d;
      nearest_index[q] = chunk_offset + cand_n;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// scale_accumulate: A[q, d] = r[q] A[q, d] + a[q, d], A in float64. Grid (ceil(D / NT), Q).
// ------------------------------------------------------------------------------------------------
template <class T>
DR_KERNEL void scale_accumulate_kernel(const T* a, index_t lda, index_t D, const double* scale_old,
                                       double* acc) {
  const index_t q = dr_bid_y();
  const index_t d = static_cast<index_t>(dr_bid_x()) * kEpilogueThreads + dr_tid();
  if (d >= D) return;  // no barrier in this kernel
  acc[q * D + d] = scale_old[q] * acc[q * D + d] + static_cast<double>(a[q * lda + d]);
}

// ------------------------------------------------------------------------------------------------
// chunk_topk: blockIdx.x = query. Each thread keeps a sorted list of the columns it visits (in
// increasing order, so topk_push's lower-index rule holds), then the lists meet in a fixed tree:
// at each level the upper half of the active threads publishes its lists to shared memory and the
// lower half merges them into its own (topk_merge). KCAP bounds k; the shared staging area is
// (NT / 2) KCAP (4 + 8) bytes: 24 KB for KCAP = 128.
// ------------------------------------------------------------------------------------------------
template <int KCAP>
DR_KERNEL void chunk_topk_kernel(const float* scores, index_t lds, index_t C, int k, bool largest,
                                 index_t chunk_offset, float* out_values, index_t* out_indices) {
  constexpr int NT = kTopkThreads;
  DR_SHARED float stage_v[NT / 2][KCAP];
  DR_SHARED index_t stage_i[NT / 2][KCAP];
  const int tid = static_cast<int>(dr_tid());
  const index_t q = dr_bid_x();
  const float* sq = scores + q * lds;
  float v[KCAP], tv[KCAP];
  index_t ix[KCAP], ti[KCAP];
  topk_init(v, ix, k, largest);
  for (index_t n = tid; n < C; n += NT) topk_push(v, ix, k, sq[n], chunk_offset + n, largest);
  for (int s = NT / 2; s > 0; s /= 2) {
    if (tid >= s && tid < 2 * s)
      for (int j = 0; j < k; ++j) {
        stage_v[tid - s][j] = v[j];
        stage_i[tid - s][j] = ix[j];
      }
    dr_sync();
    if (tid < s) {
      topk_merge(v, ix, stage_v[tid], stage_i[tid], k, largest, tv, ti);
      for (int j = 0; j < k; ++j) {
        v[j] = tv[j];
        ix[j] = ti[j];
      }
    }
    dr_sync();
  }
  if (tid == 0)
    for (int j = 0; j < k; ++j) {
      out_values[q * k + j] = v[j];
      out_indices[q * k + j] = ix[j];
    }
}

// ------------------------------------------------------------------------------------------------
// merge_topk: one thread per query merges the running list with a chunk's into `out` (which may
// alias neither). Chunks arrive in increasing row order and topk_merge prefers the lower index on
// equal scores, so the merged lists keep the lowest-index rule.
// ------------------------------------------------------------------------------------------------
inline constexpr int kMergeTopkThreads = 64;

DR_KERNEL void merge_topk_kernel(index_t Q, int k, bool largest, const float* run_v, const index_t* run_i,
                                 const float* chunk_v, const index_t* chunk_i, float* out_v, index_t* out_i) {
  const index_t q = static_cast<index_t>(dr_bid_x()) * kMergeTopkThreads + dr_tid();
  if (q >= Q) return;  // no barrier in this kernel
  topk_merge(run_v + q * k, run_i + q * k, chunk_v + q * k, chunk_i + q * k, k, largest, out_v + q * k,
             out_i + q * k);
}

// ------------------------------------------------------------------------------------------------
// Launchers (validated sizes; stream = cudaStream_t as void*, ignored by the emulator).
// ------------------------------------------------------------------------------------------------
template <class T>
Status softmax_chunk(const T* g, index_t ldg, index_t Q, index_t C, const double* y_half,
                     const double* x_half, const double* inv_sigma2, const T* x, const void* rows,
                     RowType rows_type, index_t D, double unit_roundoff, index_t chunk_offset,
                     double* max_score, double* sum_exp, double* sum_exp_sq, double* scale_old,
                     double* nearest_sqdist, index_t* nearest_index, T* p, index_t ldp, void* stream) {
  if (Q < 0 || C < 1 || D < 1 || ldg < C || ldp < C || chunk_offset < 0 || !(unit_roundoff >= 0) ||
      Q > index_t(0x7fffffff))
    return Status::kInvalidArgument;
  if (Q == 0) return Status::kOk;
  return launch_kernel(&softmax_chunk_kernel<T>, Dim2{static_cast<unsigned>(Q), 1}, Dim2{kEpilogueThreads, 1},
                       stream, g, ldg, C, y_half, x_half, inv_sigma2, x, rows, rows_type, D, unit_roundoff,
                       chunk_offset, max_score, sum_exp, sum_exp_sq, scale_old, nearest_sqdist, nearest_index,
                       p, ldp);
}

template <class T>
Status scale_accumulate(const T* a, index_t lda, index_t Q, index_t D, const double* scale_old, double* acc,
                        void* stream) {
  if (Q < 0 || D < 1 || lda < D || Q > index_t(0xffff)) return Status::kInvalidArgument;  // gridDim.y
  if (Q == 0) return Status::kOk;
  const index_t bx = (D + kEpilogueThreads - 1) / kEpilogueThreads;
  return launch_kernel(&scale_accumulate_kernel<T>, Dim2{static_cast<unsigned>(bx), static_cast<unsigned>(Q)},
                       Dim2{kEpilogueThreads, 1}, stream, a, lda, D, scale_old, acc);
}

inline Status chunk_topk(const float* scores, index_t lds, index_t Q, index_t C, int k, bool largest,
                         index_t chunk_offset, float* out_values, index_t* out_indices, void* stream) {
  if (Q < 0 || C < 1 || lds < C || k < 1 || k > kTopkMaxK || chunk_offset < 0 || Q > index_t(0x7fffffff))
    return Status::kInvalidArgument;
  if (Q == 0) return Status::kOk;
  const Dim2 grid{static_cast<unsigned>(Q), 1};
  const Dim2 block{kTopkThreads, 1};
  if (k <= kTopkSmallK)
    return launch_kernel(&chunk_topk_kernel<kTopkSmallK>, grid, block, stream, scores, lds, C, k, largest,
                         chunk_offset, out_values, out_indices);
  return launch_kernel(&chunk_topk_kernel<kTopkMaxK>, grid, block, stream, scores, lds, C, k, largest,
                       chunk_offset, out_values, out_indices);
}

inline Status merge_topk(index_t Q, int k, bool largest, const float* run_v, const index_t* run_i,
                         const float* chunk_v, const index_t* chunk_i, float* out_v, index_t* out_i,
                         void* stream) {
  if (Q < 0 || k < 1) return Status::kInvalidArgument;
  if (Q == 0) return Status::kOk;
  const index_t blocks = (Q + kMergeTopkThreads - 1) / kMergeTopkThreads;
  return launch_kernel(&merge_topk_kernel, Dim2{static_cast<unsigned>(blocks), 1}, Dim2{kMergeTopkThreads, 1},
                       stream, Q, k, largest, run_v, run_i, chunk_v, chunk_i, out_v, out_i);
}

}  // namespace detail
}  // namespace diffrepro
