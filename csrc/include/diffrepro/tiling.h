// SPDX-License-Identifier: Apache-2.0
// Tile sizes of the CPU paths, and the planner that keeps every scratch buffer inside a budget.
#pragma once

#include <algorithm>

#include "diffrepro/config.h"

namespace diffrepro {

// Queries per block: the block's accumulator [TQ, D] and score tile [TQ, TN] stay in the
// shared L3 while the training set streams past; more queries would only grow scratch.
constexpr index_t kQueryBlock = 1024;
// Training rows per tile for the denoiser: the tile [TN, D] is the K operand of the second
// product, and 256 rows keep it (3 MB at D = 3072 fp32) in L3 between the two products.
constexpr index_t kDenoiserTileRows = 256;
// Reference rows per tile for the search: a [TQ, TN] score tile of 4 MB.
constexpr index_t kSearchTileRows = 1024;
// Upper bound of one worker's training/reference tile in bytes.
constexpr index_t kTileBudgetBytes = index_t(16) << 20;

// Rows per tile: the requested count (if > 0) or the default, capped by the byte budget and N.
inline index_t plan_tile_rows(index_t requested, index_t fallback, index_t N, index_t row_bytes) {
  index_t rows = requested > 0 ? requested : fallback;
  if (requested <= 0) rows = std::min(rows, std::max<index_t>(1, kTileBudgetBytes / row_bytes));
  return std::max<index_t>(1, std::min(rows, N));
}

}  // namespace diffrepro
