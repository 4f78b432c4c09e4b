// SPDX-License-Identifier: Apache-2.0
// Top-k state of one query row: k (score, index) pairs sorted best first. "Better" is the larger
// score for inner products (largest=true) and the smaller for distances; equal scores go to the
// lower index (faiss's strict-compare convention), and padding entries (index -1) lose to any
// real entry, so partial states of chunks shorter than k merge correctly.
#pragma once

#include <cmath>

#include "diffrepro/config.h"
#include "diffrepro/rows.h"

namespace diffrepro {

template <class T>
DR_HD bool topk_better(T sa, index_t ia, T sb, index_t ib, bool largest) {
  if (ib < 0) return ia >= 0;
  if (ia < 0) return false;
  if (sa != sb) return largest ? sa > sb : sa < sb;
  return ia < ib;
}

// The nearest-row rule of the denoiser: the smaller float64 squared distance, then the lower
// index (index -1: no row yet, loses to any row). Exact duplicates therefore go to the lowest
// index whatever the tiling, the threads or the chunking.
DR_HD bool nearest_better(double da, index_t ia, double db, index_t ib) {
  return topk_better(da, ia, db, ib, /*largest=*/false);
}

// Inserts (s, i) into the sorted list (scores, idx) of length k if it beats the worst entry.
template <class T>
DR_HD void topk_push(T* scores, index_t* idx, int k, T s, index_t i, bool largest) {
  if (!topk_better(s, i, scores[k - 1], idx[k - 1], largest)) return;
  int p = k - 1;
  while (p > 0 && topk_better(s, i, scores[p - 1], idx[p - 1], largest)) {
    scores[p] = scores[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  scores[p] = s;
  idx[p] = i;
}

// Squared distance from the expanded form ||q||^2 - 2<q, r> + ||r||^2, clamped at 0: rounding
// can make it slightly negative for a query that coincides with a reference (NaN also gives 0).
DR_HD float l2_from_dot(float q_norm2, float dot, float r_norm2) {
  const float v = q_norm2 - 2.0f * dot + r_norm2;
  return v > 0.0f ? v : 0.0f;
}

// Sorts a list of length k in place by topk_better (insertion sort: k is small and the list is
// nearly sorted when only the precision of its scores changed).
template <class T>
DR_HD void topk_sort(T* scores, index_t* idx, int k, bool largest) {
  for (int j = 1; j < k; ++j) {
    const T s = scores[j];
    const index_t i = idx[j];
    int p = j;
    while (p > 0 && topk_better(s, i, scores[p - 1], idx[p - 1], largest)) {
      scores[p] = scores[p - 1];
      idx[p] = idx[p - 1];
      --p;
    }
    scores[p] = s;
    idx[p] = i;
  }
}

// Final values of one query's list: the winners' scores recomputed in float64 from the stored
// rows (row_dot_f64 for inner products, row_sqdist_f64 for squared distances) and rounded once
// to float32, then the list re-sorted by topk_better. The float32 scores only had to be good
// enough to find the candidates; the reported values are then within one float32 rounding of
// the exact ones on every backend (CPU, CUDA kernel, emulator). O(k D) per query. `rows` holds
// global indices idx - row_offset; padding entries (index -1) keep their values.
DR_HD void topk_refine_f64(const float* x, RowType type, const void* rows, index_t row_offset,
                           index_t D, bool inner_product, float* values, index_t* idx, int k) {
  for (int j = 0; j < k; ++j) {
    if (idx[j] < 0) continue;
    const index_t n = idx[j] - row_offset;
    values[j] = static_cast<float>(inner_product ? row_dot_f64<float>(x, type, rows, n, D)
                                                 : row_sqdist_f64<float>(x, type, rows, n, D));
  }
  topk_sort(values, idx, k, inner_product);
}

// Fills a list with padding: worst possible score and index -1.
template <class T>
DR_HD void topk_init(T* scores, index_t* idx, int k, bool largest) {
  for (int j = 0; j < k; ++j) {
    scores[j] = largest ? -static_cast<T>(INFINITY) : static_cast<T>(INFINITY);
    idx[j] = -1;
  }
}

// Merges two sorted lists a and b of length k into out (which may alias neither).
template <class T>
DR_HD void topk_merge(const T* sa, const index_t* ia, const T* sb, const index_t* ib, int k,
                      bool largest, T* so, index_t* io) {
  int p = 0, q = 0;
  for (int j = 0; j < k; ++j) {
    if (topk_better(sa[p], ia[p], sb[q], ib[q], largest)) {
      so[j] = sa[p];
      io[j] = ia[p++];
    } else {
      so[j] = sb[q];
      io[j] = ib[q++];
    }
  }
}

}  // namespace diffrepro
