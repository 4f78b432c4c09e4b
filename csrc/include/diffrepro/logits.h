// SPDX-License-Identifier: Apache-2.0
// Logit reconstruction shared by the CPU loops and the CUDA kernels. The kernels work in score
// units g_n = <x - c, y_n - c> - ||y_n - c||^2 / 2, which do not contain ||x - c||^2: the logit is
//   l_n = (g_n - h) / sigma^2,   h = ||x - c||^2 / 2,
// and softmax differences l_a - l_b = (g_a - g_b) / sigma^2 never see h. States are merged in
// score units inside a call; h enters once, at the output, where l is written as an unevaluated
// float64 sum hi + lo (double-double). A query of norm 1e15 has h ~ 1e30 D: in one float64 the
// logit would keep no digit of g, and two chunk states would merge on rounding noise.
#pragma once

#include <cmath>

#include "diffrepro/config.h"

namespace diffrepro {

// Knuth's TwoSum: s + e == a + b exactly (round-to-nearest, no overflow).
DR_HD void two_sum(double a, double b, double& s, double& e) {
  s = a + b;
  const double bb = s - a;
  e = (a - (s - bb)) + (b - bb);
}

// h = ||x - c||^2 / 2 as hi + lo, from the exact differences x - c (TwoSum: each is the pair
// dv + de), not from the differences rounded to T that the products use. The products then see
// the query x' = c + fl(x - c), off x by at most half an ulp of x - c per coordinate; within a
// call that shifts every row's score by <x - x', y_n - c>, inside the scores' own error bound
// (score_error). But h from the rounded differences would be off by <x - c, x - x'> ~ u |x - c|^2,
// a query-only term that chunks with different centres c round differently: at |x| ~ 3e7 in
// float32 their merged softmax picked another row. Relative error of h ~1e-32.
template <class T>
DR_HD void half_sqnorm_dd(const T* x, const T* center, index_t D, double& hi, double& lo) {
  double s = 0.0, e = 0.0;
  for (index_t d = 0; d < D; ++d) {
    double dv, de;
    two_sum(static_cast<double>(x[d]), -static_cast<double>(center[d]), dv, de);
    // (dv + de)^2 = dv^2 + (2 dv + de) de; dv^2 = p + pe exactly (FMA).
    const double p = dv * dv;
    const double pe = fma(dv, dv, -p) + (2.0 * dv + de) * de;
    double t, te;
    two_sum(s, p, t, te);
    s = t;
    e += te + pe;
  }
  two_sum(0.5 * s, 0.5 * e, hi, lo);  // halving is exact
}

// l = (g - h) * inv_sigma2 as hi + lo, for the maximum score g of a query and h from
// half_sqnorm_dd. Used once per query and chunk by every backend.
DR_HD void logit_from_score(double g, double h_hi, double h_lo, double inv_sigma2, double& hi,
                            double& lo) {
  double s, e;
  two_sum(g, -h_hi, s, e);
  e -= h_lo;
  const double p = s * inv_sigma2;
  const double pe = fma(s, inv_sigma2, -p);
  two_sum(p, pe + e * inv_sigma2, hi, lo);
}

// Bound on |computed - exact| of a score g = <x', y'> - ||y'||^2 / 2 formed in type T over D
// terms by any summation order (GEMM blocking included): |error| <= gamma (|x'| |y'| +
// ||y'||^2 / 2) with gamma = (D + 4) u, u the unit roundoff of T (Higham, Accuracy and
// Stability of Numerical Algorithms, eq. 3.5), plus a few u for the rounding of the norm, the
// difference and the centring x - c, y - c.
template <class T>
DR_HD double score_error_gamma(index_t D) {
  const double u = sizeof(T) > 4 ? 1.1102230246251565e-16 : 5.9604644775390625e-08;
  return static_cast<double>(D + 8) * u;
}

// The bound itself for one (query, row) pair: gamma (|x'| |y'| + ||y'||^2 / 2). A row whose
// score plus its bound lies below the best score minus that row's bound is provably farther.
DR_HD double score_error(double gamma, double x_norm, double y_norm, double y_norm2) {
  return gamma * (x_norm * y_norm + 0.5 * y_norm2);
}

// A per-row log-weight lw enters the score units as sigma^2 lw: l = (g + sigma^2 lw - h) /
// sigma^2. Formed in float64 from the (float or double) score g, so the float32 path adds no
// rounding of its own to the weights; -inf stays -inf (the row gets weight 0).
DR_HD double weighted_score(double g, double lw, double sigma2) { return g + sigma2 * lw; }

// Extra rounding bound of weighted_score in score units (two float64 roundings, with margin).
DR_HD double weighted_score_error(double adjusted, double lw, double sigma2) {
  return 4.5e-16 * (fabs(adjusted) + fabs(sigma2 * lw));
}

// The key by which the nearest row is ranked (smaller is better, then the lower index): the
// float64 squared distance d2 without log-weights, and d2 / (2 sigma^2) - lw with them, the
// negated logit up to the per-query constant, so the reported row is the one of largest weight.
// diffrepro.ops.merge_states forms the same key from (nearest_sqdist, the row's log-weight).
DR_HD double nearest_rank_key(double d2, const double* lw, index_t n, double inv_sigma2) {
  return lw == nullptr ? d2 : 0.5 * d2 * inv_sigma2 - lw[n];
}

}  // namespace diffrepro
