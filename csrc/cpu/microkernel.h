// SPDX-License-Identifier: Apache-2.0
// diffrepro's own packed single-precision GEMM (GotoBLAS/BLIS style) for the nearest-neighbour
// search, with the top-k epilogue fused into the register-blocked micro-kernel so that the
// [queries x references] score tile is never written to memory for k = 1.
#pragma once

#include <cstdint>

#include "diffrepro/config.h"

namespace diffrepro::detail {

// Register block of the AVX2+FMA micro-kernel: 6 query rows x 16 reference columns
// = 12 ymm accumulators (of 16), leaving 2 for the reference vectors and 1 for the broadcast
// query element; 12 independent FMA chains cover Zen 3's 2 FMA pipes x 4-cycle latency.
constexpr index_t kMR = 6;
constexpr index_t kNR = 16;
// Depth of one packed panel (the K blocking). One reference sliver [16 x 256] fp32 = 16 KB
// stays in the 32 KB L1d while the query slivers stream past it; D > 256 is split into chunks
// whose partial 6x16 sums are kept in a small buffer (kMCS x kNCS micro-tiles) between chunks.
constexpr index_t kKC = 256;
// Query slivers per L2 block: 24 x 6 = 144 rows x 256 x 4 B = 144 KB of packed queries reused
// from the 512 KB L2 by every reference sliver of the block.
constexpr index_t kMCS = 24;
// Reference slivers per L3 block: 8 x 16 = 128 columns; with kMCS the partial-sum buffer is
// 24 x 8 x 96 x 4 B = 72 KB, which stays in L2 next to the query block.
constexpr index_t kNCS = 8;

// Whether the packed kernel can run here (x86-64 with AVX2 and FMA, checked at run time).
bool packed_search_available();

// Floats needed to pack `rows` rows of length D: rows rounded up to the sliver height R.
inline index_t packed_floats(index_t rows, index_t D, index_t R) {
  return (rows + R - 1) / R * R * D;
}

// Packs src [rows, D] (row stride D) into K-chunks of kKC columns; within chunk p (width
// kc = min(kKC, D - p*kKC)) sliver s holds R rows interleaved column by column:
//   dst[rows_pad * p*kKC + s*R*kc + k*R + r] = src[(s*R + r) * D + p*kKC + k],
// zero for the padding rows r >= rows. dst: [packed_floats(rows, D, R)], 32-byte aligned.
void pack_panel(const float* src, index_t rows, index_t D, index_t R, float* dst);

// One reference tile against one packed query block. Scores are <q, r> (inner_product) or
// ||q||^2 - 2<q, r> + ||r||^2 clamped at 0; every dot product is a single FMA chain over
// d = 0..D-1 in order, so results do not depend on tiles or workers.
struct PackedSearchTile {
  const float* a;        // [packed_floats(nq, D, kMR)] packed queries
  const float* b;        // [packed_floats(nt, D, kNR)] packed references of the tile
  index_t nq, nt, D;
  const float* q_norm2;  // [nq rounded up to kMR] (L2 only; padding 0)
  const float* r_norm2;  // [nt rounded up to kNR] (L2 only; padding 0)
  bool inner_product;
  int k;
  std::int32_t base;     // index of the tile's first reference, relative to the call
  // k = 1: per query 8 lane-wise running bests (lane j sees references base + 8m + j in
  // increasing order, so a strict compare keeps the lowest index on ties; index -1 = empty).
  float* lane_best;          // [nq rounded up to kMR, 8]
  std::int32_t* lane_index;  // [nq rounded up to kMR, 8]
  // k > 1: sorted top-k lists, indices relative to the call.
  float* best;           // [nq, k]
  index_t* best_index;   // [nq, k]
  float* partial;        // [kMCS * kNCS * kMR * kNR] scratch for D > kKC, 32-byte aligned
};
void packed_search_tile(const PackedSearchTile& t);

}  // namespace diffrepro::detail
