// SPDX-License-Identifier: Apache-2.0
// Streaming softmax state for one query row, shared by the CPU loops, the CUDA kernels and the
// per-thread / per-chunk merges. Recurrence over logits l_j (m: running max, Z: partition sum,
// Z2: sum of squared weights, A: weighted sum of rows y_j), starting from m=-inf, Z=Z2=0, A=0:
//   m'  = max(m, l_j)                      r = exp(m - m')   (r = 0 while m = -inf)
//   Z'  = r   Z  + exp(l_j - m')
//   Z2' = r^2 Z2 + exp(l_j - m')^2
//   A'  = r   A  + exp(l_j - m') y_j
// Softmax weights are w_j = exp(l_j - m)/Z, n_eff = Z^2/Z2, log-normaliser = m + log Z.
#pragma once

#include <cmath>

#include "diffrepro/config.h"

namespace diffrepro {

template <class T>
struct SoftmaxState {
  T max;     // running max logit m (-inf before the first finite logit)
  T sum;     // Z, relative to max
  T sum_sq;  // Z2, relative to max (squared weights)
};

template <class T>
DR_HD SoftmaxState<T> softmax_init() {
  return {-static_cast<T>(INFINITY), T(0), T(0)};
}

// exp((a - b) * scale) with the empty-state guard: a state that has seen nothing (a = -inf)
// contributes nothing, and -inf - (-inf) would otherwise be NaN. scale converts score units to
// logits (1 / sigma^2; 1 when a and b already are logits).
template <class T>
DR_HD T softmax_rescale(T a, T b, T scale = T(1)) {
  return a == -static_cast<T>(INFINITY) ? T(0) : static_cast<T>(exp((a - b) * scale));
}

// Factors by which two accumulators are scaled when their states are merged.
template <class T>
struct MergeScales {
  T a;
  T b;
};

// Merges state b into a (associative and commutative up to rounding). Returns the factors by
// which a's and b's accumulators A must be scaled before they are added. With maxima kept in
// score units g (logits l = g * scale + per-query constant), pass scale: the constant cancels,
// so merges never depend on ||x||^2 (logits.h).
template <class T>
DR_HD MergeScales<T> softmax_merge(SoftmaxState<T>& a, const SoftmaxState<T>& b, T scale = T(1)) {
  const T m = a.max > b.max ? a.max : b.max;
  const MergeScales<T> f{softmax_rescale(a.max, m, scale), softmax_rescale(b.max, m, scale)};
  a.max = m;
  a.sum = a.sum * f.a + b.sum * f.b;
  a.sum_sq = a.sum_sq * f.a * f.a + b.sum_sq * f.b * f.b;
  return f;
}

// Pushes one tile of n scores g_j of a row whose logits are l_j = g_j * scale (scale = 1/sigma^2
// > 0; the row's state keeps its max in score units g). Writes the tile's weights
// p_j = exp((g_j - g_max') * scale) to p and returns the factor r by which the row's accumulator
// must be scaled before p is added to it. Differences g_j - g_max' are formed before scaling, so a
// tiny sigma (scale up to 1e8 and more) multiplies only the GEMM's own rounding error, never the
// rounding of two huge logits. S is the score type (float or double), T the state type.
template <class S, class T>
DR_HD T softmax_push_scores(SoftmaxState<T>& st, const S* g, index_t n, S scale, S* p) {
  S tile_max = g[0];
  for (index_t j = 1; j < n; ++j) tile_max = g[j] > tile_max ? g[j] : tile_max;
  const S new_max = static_cast<T>(tile_max) > st.max ? tile_max : static_cast<S>(st.max);
  if (new_max == -static_cast<S>(INFINITY)) {
    // No finite score yet (rows of log-weight -inf): their weights are 0, and a NaN score stays
    // NaN in the sums (as exp(NaN) would), so that the caller still detects non-finite data.
    for (index_t j = 0; j < n; ++j) {
      p[j] = g[j] == -static_cast<S>(INFINITY) ? S(0) : g[j] - g[j];
      st.sum += p[j];
      st.sum_sq += static_cast<T>(p[j]) * p[j];
    }
    return T(1);
  }
  const T r = st.max == -static_cast<T>(INFINITY)
                  ? T(0)
                  : static_cast<T>(exp(static_cast<T>(static_cast<S>(st.max) - new_max) * scale));
  T sum = 0, sum_sq = 0;
  for (index_t j = 0; j < n; ++j) {
    const S w = static_cast<S>(exp((g[j] - new_max) * scale));
    p[j] = w;
    sum += w;
    sum_sq += static_cast<T>(w) * w;
  }
  st.max = new_max;
  st.sum = st.sum * r + sum;
  st.sum_sq = st.sum_sq * r * r + sum_sq;
  return r;
}

}  // namespace diffrepro
