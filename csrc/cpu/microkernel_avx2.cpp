// SPDX-License-Identifier: Apache-2.0
// AVX2+FMA packed GEMM for the nearest-neighbour search (see microkernel.h): packing, the 6x16
// micro-kernel with its fused epilogues, and the cache-blocked loops around it. Compiled with
// per-function target attributes, so the module still loads on any x86-64 CPU.
#include "microkernel.h"

#include <algorithm>
#include <cmath>

#include "diffrepro/topk.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DR_HAVE_PACKED 1
#define DR_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline
#define DR_AVX2_FN __attribute__((target("avx2,fma")))
#else
#define DR_HAVE_PACKED 0
#endif

namespace diffrepro::detail {

// Packing makes every micro-kernel load unit-stride and 32-byte aligned: per k the kernel reads
// R consecutive floats. Rows are read sequentially; the strided writes stay inside one
// R x kKC sliver (16 KB at most), which sits in L1. Costs about 1% of the search at D = 512.
void pack_panel(const float* src, index_t rows, index_t D, index_t R, float* dst) {
  const index_t rows_pad = (rows + R - 1) / R * R;
  for (index_t p0 = 0; p0 < D; p0 += kKC) {
    const index_t kc = std::min(kKC, D - p0);
    float* chunk = dst + rows_pad * p0;
    for (index_t s = 0; s < rows_pad / R; ++s) {
      float* out = chunk + s * R * kc;
      for (index_t r = 0; r < R; ++r) {
        const index_t row = s * R + r;
        if (row < rows) {
          const float* in = src + row * D + p0;
          for (index_t k = 0; k < kc; ++k) out[k * R + r] = in[k];
        } else {
          for (index_t k = 0; k < kc; ++k) out[k * R + r] = 0.0f;
        }
      }
    }
  }
}

#if DR_HAVE_PACKED

// AVX2 CPUs only: where AVX-512 exists, the BLAS runs its AVX-512 ("SkylakeX") kernels at twice
// this kernel's width, so the BLAS path is the faster one there.
bool packed_search_available() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         !__builtin_cpu_supports("avx512f");
}

namespace {

// What the micro-kernel does with its finished (or unfinished) 6x16 block.
enum Out { kPartial, kLaneBest, kScores };

// Per-call data of the epilogues.
struct Epi {
  const float* qn;    // [6]  ||q||^2 of the sliver's queries (L2)
  const float* rn;    // [16] ||r||^2 of the sliver's references (L2)
  float* lane_best;   // [6, 8]
  std::int32_t* lane_index;
  std::int32_t base;  // index of column 0
  // kScores: per row the score to beat (the worst of its top-k list; +-inf never passes) or
  // `open` when the list still has padding; masks[i] gets bit j for each column j that beats it.
  const float* thr;   // [6]
  const bool* open;   // [6]
  std::uint32_t* masks;  // [6]
};

// Scores of one 8-column half from the dot products: identity for inner products; for L2 the
// same operation order as l2_from_dot, (||q||^2 - 2 dot) + ||r||^2 (2 dot is exact, so a
// contracted FMA would round identically), then max(v, 0), which also maps NaN to 0 as the
// scalar `v > 0 ? v : 0` does.
template <bool kL2>
DR_AVX2 __m256 score8(__m256 dot, __m256 qn, const float* rn) {
  if (!kL2) return dot;
  const __m256 v = _mm256_add_ps(_mm256_sub_ps(qn, _mm256_add_ps(dot, dot)), _mm256_load_ps(rn));
  return _mm256_max_ps(v, _mm256_setzero_ps());
}

// c[6][16] (+)= a[kc x 6] . b[kc x 16]^T over one packed chunk. Each accumulator element is
// one FMA chain in k order. kLoad continues partial sums from c; kOut selects the epilogue.
template <bool kLoad, int kOut, bool kL2>
DR_AVX2 void kernel_6x16(index_t kc, const float* __restrict a, const float* __restrict b,
                         float* __restrict c, const Epi& e) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (kLoad) {
    c00 = _mm256_load_ps(c + 0), c01 = _mm256_load_ps(c + 8);
    c10 = _mm256_load_ps(c + 16), c11 = _mm256_load_ps(c + 24);
    c20 = _mm256_load_ps(c + 32), c21 = _mm256_load_ps(c + 40);
    c30 = _mm256_load_ps(c + 48), c31 = _mm256_load_ps(c + 56);
    c40 = _mm256_load_ps(c + 64), c41 = _mm256_load_ps(c + 72);
    c50 = _mm256_load_ps(c + 80), c51 = _mm256_load_ps(c + 88);
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  }
  // Per k: 2 aligned loads of b (16 refs), 6 broadcasts of a, 12 FMAs = 6 cycles on Zen 3's
  // two FMA pipes; the 8 loads fit its 3 load ports. b comes from L1 (the sliver is reused by
  // every query sliver of the block), a from L2. Measured alone: 97-98% of the FMA peak.
#pragma GCC unroll 4
  for (index_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
    __m256 x = _mm256_broadcast_ss(a + 0);
    c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(x, b0, c40), c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(x, b0, c50), c51 = _mm256_fmadd_ps(x, b1, c51);
    a += kMR;
    b += kNR;
  }
  const __m256 acc[6][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                            {c30, c31}, {c40, c41}, {c50, c51}};
  if (kOut == kPartial) {
    for (int i = 0; i < 6; ++i) {
      _mm256_store_ps(c + 16 * i, acc[i][0]);
      _mm256_store_ps(c + 16 * i + 8, acc[i][1]);
    }
  } else if (kOut == kScores) {
    // A worker sees its references in increasing index order, so a new score beats the worst
    // entry only if strictly better (an equal one has the higher index): the vector compare is
    // exact, and the scalar top-k insert runs only for the few columns that pass.
    for (int i = 0; i < 6; ++i) {
      const __m256 qn = kL2 ? _mm256_broadcast_ss(e.qn + i) : _mm256_setzero_ps();
      const __m256 s0 = score8<kL2>(acc[i][0], qn, e.rn), s1 = score8<kL2>(acc[i][1], qn, e.rn + 8);
      _mm256_store_ps(c + 16 * i, s0);
      _mm256_store_ps(c + 16 * i + 8, s1);
      const __m256 t = _mm256_broadcast_ss(e.thr + i);
      const int m0 = _mm256_movemask_ps(kL2 ? _mm256_cmp_ps(s0, t, _CMP_LT_OQ) : _mm256_cmp_ps(s0, t, _CMP_GT_OQ));
      const int m1 = _mm256_movemask_ps(kL2 ? _mm256_cmp_ps(s1, t, _CMP_LT_OQ) : _mm256_cmp_ps(s1, t, _CMP_GT_OQ));
      e.masks[i] = e.open[i] ? 0xFFFFu : std::uint32_t(m0 | (m1 << 8));
    }
  } else {
    // k = 1 straight from registers: lane j of a query's 8 running bests takes column j, then
    // column 8 + j (higher index), replacing only on a strictly better score or an empty lane.
    const __m256i idx0 = _mm256_add_epi32(_mm256_set1_epi32(e.base),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i idx1 = _mm256_add_epi32(idx0, _mm256_set1_epi32(8));
    for (int i = 0; i < 6; ++i) {
      const __m256 qn = kL2 ? _mm256_broadcast_ss(e.qn + i) : _mm256_setzero_ps();
      __m256 bs = _mm256_load_ps(e.lane_best + 8 * i);
      __m256i bi = _mm256_load_si256(reinterpret_cast<const __m256i*>(e.lane_index + 8 * i));
      for (int h = 0; h < 2; ++h) {
        const __m256 s = score8<kL2>(acc[i][h], qn, e.rn + 8 * h);
        const __m256 better = kL2 ? _mm256_cmp_ps(s, bs, _CMP_LT_OQ) : _mm256_cmp_ps(s, bs, _CMP_GT_OQ);
        const __m256 empty = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_setzero_si256(), bi));
        const __m256 m = _mm256_or_ps(better, empty);
        bs = _mm256_blendv_ps(bs, s, m);
        bi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi),
                                                  _mm256_castsi256_ps(h ? idx1 : idx0), m));
      }
      _mm256_store_ps(e.lane_best + 8 * i, bs);
      _mm256_store_si256(reinterpret_cast<__m256i*>(e.lane_index + 8 * i), bi);
    }
  }
}

// Scalar epilogue over a finished 6x16 score block (sc, already metric scores) for the
// valid rows/columns: top-k lists (k > 1) or the lane-wise bests (k = 1, edge slivers).
// masks: per row the candidate columns (k > 1), see Epi.
void push_block(const PackedSearchTile& t, const float* sc, const std::uint32_t* masks, index_t i0,
                index_t j0) {
  const bool largest = t.inner_product;
  const index_t ni = std::min(kMR, t.nq - i0), nj = std::min(kNR, t.nt - j0);
  for (index_t i = 0; i < ni; ++i) {
    const float* row = sc + i * kNR;
    if (t.k == 1) {
      float* ls = t.lane_best + (i0 + i) * 8;
      std::int32_t* li = t.lane_index + (i0 + i) * 8;
      for (index_t j = 0; j < nj; ++j) {
        const index_t idx = t.base + j0 + j;
        if (topk_better(row[j], idx, ls[j & 7], index_t(li[j & 7]), largest)) {
          ls[j & 7] = row[j];
          li[j & 7] = static_cast<std::int32_t>(idx);
        }
      }
    } else {
      float* bs = t.best + (i0 + i) * t.k;
      index_t* bi = t.best_index + (i0 + i) * t.k;
      for (std::uint32_t m = masks[i] & ((1u << nj) - 1); m != 0; m &= m - 1) {
        const index_t j = __builtin_ctz(m);
        const index_t idx = t.base + j0 + j;
        if (topk_better(row[j], idx, bs[t.k - 1], bi[t.k - 1], largest))
          topk_push(bs, bi, t.k, row[j], idx, largest);
      }
    }
  }
}

// The blocked loops: reference blocks of kNCS slivers (L3) > query blocks of kMCS slivers (L2)
// > K chunks > reference slivers (L1) > query slivers. For a single chunk (D <= kKC) the
// block is finished in registers; otherwise partial sums go through t.partial.
// Why this order: the kernel's b sliver (16 KB) must stay in L1 across the inner query loop,
// the query block [kMCS*6 x kKC] (144 KB) in L2 across the kNCS reference slivers, and the
// partial sums (72 KB) in L2 across the K chunks. Per (jc, ic, p) that is 9.4 MFLOP against
// about 275 KB from L3, far below its bandwidth.
template <bool kL2>
DR_AVX2_FN void search_tile(const PackedSearchTile& t) {
  const index_t m_sl = (t.nq + kMR - 1) / kMR, n_sl = (t.nt + kNR - 1) / kNR;
  const index_t nq_pad = m_sl * kMR, nt_pad = n_sl * kNR;
  const index_t n_kc = (t.D + kKC - 1) / kKC;
  alignas(32) float sc[kMR * kNR];
  float thr[kMR];
  bool open[kMR];
  std::uint32_t masks[kMR];
  Epi e{};
  e.thr = thr;
  e.open = open;
  e.masks = masks;
  for (index_t jc = 0; jc < n_sl; jc += kNCS) {
    const index_t jc1 = std::min(n_sl, jc + kNCS);
    for (index_t ic = 0; ic < m_sl; ic += kMCS) {
      const index_t ic1 = std::min(m_sl, ic + kMCS);
      for (index_t p = 0; p < n_kc; ++p) {
        const index_t p0 = p * kKC, kc = std::min(kKC, t.D - p0);
        const bool first = p == 0, last = p == n_kc - 1;
        for (index_t js = jc; js < jc1; ++js) {
          const float* b = t.b + nt_pad * p0 + js * kNR * kc;
          const bool full = (js + 1) * kNR <= t.nt;
          e.rn = kL2 ? t.r_norm2 + js * kNR : nullptr;
          e.base = t.base + static_cast<std::int32_t>(js * kNR);
          for (index_t is = ic; is < ic1; ++is) {
            const float* a = t.a + nq_pad * p0 + is * kMR * kc;
            float* c = t.partial + ((is - ic) * kNCS + (js - jc)) * (kMR * kNR);
            e.qn = kL2 ? t.q_norm2 + is * kMR : nullptr;
            e.lane_best = t.lane_best + is * kMR * 8;
            e.lane_index = t.lane_index + is * kMR * 8;
            // Unfinished chunk: partial sums to memory. Last chunk, k = 1, full sliver: the
            // fused lane-best update from registers. Otherwise scores to the L1 buffer `sc`
            // and the scalar top-k insert for the columns that pass the vector filter.
            if (!last) {
              if (first) kernel_6x16<false, kPartial, kL2>(kc, a, b, c, e);
              else kernel_6x16<true, kPartial, kL2>(kc, a, b, c, e);
            } else if (t.k == 1 && full) {
              if (first) kernel_6x16<false, kLaneBest, kL2>(kc, a, b, c, e);
              else kernel_6x16<true, kLaneBest, kL2>(kc, a, b, c, e);
            } else {
              for (index_t i = 0; i < kMR; ++i) {  // thresholds of the rows (k > 1)
                const index_t q = is * kMR + i;
                const bool real = t.k > 1 && q < t.nq;
                thr[i] = real ? t.best[q * t.k + t.k - 1] : (kL2 ? -INFINITY : INFINITY);
                open[i] = real && t.best_index[q * t.k + t.k - 1] < 0;
              }
              if (first) {
                kernel_6x16<false, kScores, kL2>(kc, a, b, sc, e);
              } else {
                kernel_6x16<true, kScores, kL2>(kc, a, b, c, e);
                std::copy(c, c + kMR * kNR, sc);
              }
              push_block(t, sc, masks, is * kMR, js * kNR);
            }
          }
        }
      }
    }
  }
}

}  // namespace

void packed_search_tile(const PackedSearchTile& t) {
  if (t.inner_product) search_tile<false>(t);
  else search_tile<true>(t);
}

#else  // !DR_HAVE_PACKED

bool packed_search_available() { return false; }
void packed_search_tile(const PackedSearchTile&) {}

#endif

}  // namespace diffrepro::detail
