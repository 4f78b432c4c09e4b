// SPDX-License-Identifier: Apache-2.0
// Nearest-neighbour search on the CPU: blocked inner products (one GEMM per query block and
// reference tile), fused with a top-k epilogue on the score tile while it is in cache; workers
// own contiguous shards of reference tiles and their top-k lists are merged in shard order.
#include <cmath>
#include <cstring>
#include <vector>

#include "diffrepro/api_cpu.h"
#include "diffrepro/rows.h"
#include "diffrepro/tiling.h"
#include "diffrepro/topk.h"
#include "gemm.h"
#include "parallel.h"
#include "vector_loops.h"

namespace diffrepro {
namespace {

struct SearchWorker {
  std::vector<float> tile;        // [TN, D] decoded rows (unused for float32 references)
  std::vector<float> tile_norm2;  // [TN]    ||r||^2 for the L2 metric
  std::vector<float> scores;      // [TQ, TN]
  std::vector<float> best;        // [TQ, k] sorted best first
  std::vector<index_t> best_index;
};

// Squared distance from the expanded form, clamped at 0: rounding can make it slightly
// negative for a query that coincides with a reference.
inline float l2_from_dot(float q_norm2, float dot, float r_norm2) {
  const float v = q_norm2 - 2.0f * dot + r_norm2;
  return v > 0.0f ? v : 0.0f;
}

}  // namespace

Status nn_search_cpu(const float* queries, const void* refs, RowType refs_type, index_t Q,
                     index_t N, index_t D, int k, bool inner_product, index_t row_offset,
                     index_t tile_rows, int workers, float* values, index_t* indices) {
  if (Q < 1 || D < 1 || N < 0 || k < 1) return Status::kInvalidArgument;
  const bool largest = inner_product;
  if (N == 0) {
    for (index_t q = 0; q < Q; ++q) topk_init(values + q * k, indices + q * k, k, largest);
    return Status::kOk;
  }
  const index_t TN = plan_tile_rows(tile_rows, kSearchTileRows, N, D * index_t(sizeof(float)));
  const index_t n_tiles = (N + TN - 1) / TN;
  const int P = static_cast<int>(std::max<index_t>(1, std::min<index_t>(workers, n_tiles)));
  const bool decode = refs_type != RowType::kFloat32;

  std::vector<float> q_norm2(inner_product ? 0 : Q);
  for (index_t q = 0; q < static_cast<index_t>(q_norm2.size()); ++q) {
    double s = 0;
    for (index_t d = 0; d < D; ++d) s += static_cast<double>(queries[q * D + d]) * queries[q * D + d];
    q_norm2[q] = static_cast<float>(s);
  }

  std::vector<SearchWorker> pool(P);
  for (index_t q0 = 0; q0 < Q; q0 += kQueryBlock) {
    const index_t nq = std::min(kQueryBlock, Q - q0);
    detail::parallel_for_workers(P, [&](int w) {
      long long t0, t1;
      detail::worker_range(n_tiles, w, P, t0, t1);
      SearchWorker& wk = pool[w];
      if (decode) wk.tile.resize(TN * D);
      wk.tile_norm2.resize(TN);
      wk.scores.resize(nq * TN);
      wk.best.resize(nq * k);
      wk.best_index.resize(nq * k);
      for (index_t q = 0; q < nq; ++q)
        topk_init(wk.best.data() + q * k, wk.best_index.data() + q * k, k, largest);
      for (index_t t = t0; t < t1; ++t) {
        const index_t n0 = t * TN, nt = std::min(TN, N - n0);
        const float* rows = static_cast<const float*>(refs) + n0 * D;
        if (decode) {
          detail::load_rows(refs_type, static_cast<const char*>(refs) + n0 * D * row_bytes(refs_type),
                            nt * D, wk.tile.data());
          rows = wk.tile.data();
        }
        if (!inner_product) {
          for (index_t n = 0; n < nt; ++n) {
            double s = 0;
            for (index_t d = 0; d < D; ++d) s += static_cast<double>(rows[n * D + d]) * rows[n * D + d];
            wk.tile_norm2[n] = static_cast<float>(s);
          }
        }
        float* sc = wk.scores.data();
        detail::gemm(true, nq, nt, D, 1.0f, queries + q0 * D, D, rows, D, 0.0f, sc, nt);
        for (index_t q = 0; q < nq; ++q) {
          const float* row = sc + q * nt;
          float* bs = wk.best.data() + q * k;
          index_t* bi = wk.best_index.data() + q * k;
          const index_t base = row_offset + n0;
          for (index_t j = 0; j < nt; ++j) {
            const float s = inner_product ? row[j] : l2_from_dot(q_norm2[q0 + q], row[j], wk.tile_norm2[j]);
            // Cheap reject against the current worst before the ordered insert.
            if (topk_better(s, base + j, bs[k - 1], bi[k - 1], largest))
              topk_push(bs, bi, k, s, base + j, largest);
          }
        }
      }
    });
    // Merge the shards' lists in shard order.
    std::vector<float> tmp_s(k);
    std::vector<index_t> tmp_i(k);
    for (index_t q = 0; q < nq; ++q) {
      float* out_s = values + (q0 + q) * k;
      index_t* out_i = indices + (q0 + q) * k;
      std::memcpy(out_s, pool[0].best.data() + q * k, k * sizeof(float));
      std::memcpy(out_i, pool[0].best_index.data() + q * k, k * sizeof(index_t));
      for (int w = 1; w < P; ++w) {
        topk_merge(out_s, out_i, pool[w].best.data() + q * k, pool[w].best_index.data() + q * k,
                   k, largest, tmp_s.data(), tmp_i.data());
        std::memcpy(out_s, tmp_s.data(), k * sizeof(float));
        std::memcpy(out_i, tmp_i.data(), k * sizeof(index_t));
      }
    }
  }
  return Status::kOk;
}



}  // namespace diffrepro
