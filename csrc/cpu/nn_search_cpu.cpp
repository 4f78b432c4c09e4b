// SPDX-License-Identifier: Apache-2.0
// Nearest-neighbour search on the CPU: on x86-64 with AVX2+FMA our packed micro-kernel with the
// top-k epilogue fused (microkernel.h); elsewhere one BLAS GEMM per query block and reference
// tile, then a top-k pass over the score tile while it is in cache. Workers own contiguous
// shards of the references and their top-k lists are merged in shard order.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "diffrepro/api_cpu.h"
#include "diffrepro/rows.h"
#include "diffrepro/tiling.h"
#include "diffrepro/topk.h"
#include "gemm.h"
#include "microkernel.h"
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

// Scratch of one worker of the packed path (microkernel.h).
struct PackedWorker {
  std::vector<float> tile;          // [TN, D] decoded rows (unused for float32 references)
  std::vector<float> b;             // packed reference tile (+ alignment slack)
  std::vector<float> r_norm2;       // [TN rounded up to kNR]
  std::vector<float> lane_best;     // [kQueryBlock rounded up to kMR, 8]   (k = 1)
  std::vector<std::int32_t> lane_index;
  std::vector<float> partial;       // micro-tile partial sums for D > kKC
  std::vector<float> best;          // [TQ, k] sorted best first
  std::vector<index_t> best_index;  // relative to the call until the final merge
};

// 32-byte aligned view into a vector with 8 elements of slack (aligned AVX loads and stores).
template <class T>
T* aligned(std::vector<T>& v, std::size_t n) {
  v.resize(n + 32 / sizeof(T));
  const auto addr = reinterpret_cast<std::uintptr_t>(v.data());
  return reinterpret_cast<T*>((addr + 31) & ~std::uintptr_t(31));
}

// ||r||^2 of each row, accumulated in double (it enters every score of the row).
inline void row_norms(const float* rows, index_t n, index_t D, float* out) {
  for (index_t i = 0; i < n; ++i) {
    const double s = detail::squared_norm(rows + i * D, D);
    out[i] = static_cast<float>(s);
  }
}

// Merges the workers' lists for queries [q0, q0 + nq) in worker order into values/indices and
// adds `offset` to the real (non-padding) indices.
template <class Pool>
void merge_workers(Pool& pool, index_t q0, index_t nq, int k, bool largest, index_t offset,
                   float* values, index_t* indices) {
  std::vector<float> tmp_s(k);
  std::vector<index_t> tmp_i(k);
  const int P = static_cast<int>(pool.size());
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
    if (offset != 0)
      for (int j = 0; j < k; ++j)
        if (out_i[j] >= 0) out_i[j] += offset;
  }
}

// Budgets of the packed path. Each query block re-reads (and re-packs) the whole reference set,
// which at D = 3072 comes from DRAM, so the block is large: 32 MB (16384 queries at D = 512,
// 2730 at D = 3072). It need not fit the L3: per kNCS reference slivers it streams through L2
// once, 64 flops per byte. Each worker's packed tile stays small (2 MB: the default tile is
// 1024 rows at D = 512, 128 at D = 3072) so both workers' tiles stay in L3 while every query
// block passes over them. Measured at D = 3072: 8 MB / 4 MB budgets ran at 174 GFLOP/s,
// 32-128 MB / 1-4 MB at 184-187 GFLOP/s.
constexpr index_t kPackedQueryBytes = index_t(32) << 20;
constexpr index_t kPackedTileBytes = index_t(2) << 20;

// The packed-kernel path: the query block is packed once (shared, read-only), each worker packs
// its reference tiles and runs the blocked micro-kernel with the fused top-k epilogue.
void search_packed(const SearchArgs& args, const float* queries, const float* center, index_t TN,
                   int P, const std::vector<float>& q_norm2) {
  using namespace detail;
  const RowType refs_type = args.refs_type;
  const void* refs = args.refs;
  const index_t Q = args.Q, N = args.N, D = args.D;
  const int k = args.k;
  const bool inner_product = args.inner_product, largest = inner_product;
  const bool decode = refs_type != RowType::kFloat32 || center != nullptr;
  // Query block: as many queries as kPackedQueryBytes holds, split evenly.
  const index_t max_rows = std::max(kMR * kMCS, kPackedQueryBytes / (D * index_t(sizeof(float))));
  const index_t n_blocks = (Q + max_rows - 1) / max_rows;
  const index_t TQ = ((Q + n_blocks - 1) / n_blocks + kMR - 1) / kMR * kMR;
  const index_t tq_pad = TQ;
  std::vector<float> a_store, qn_store;
  float* a = aligned(a_store, packed_floats(tq_pad, D, kMR));
  float* qn = aligned(qn_store, tq_pad);
  std::vector<float> r_norm2(inner_product ? 0 : N);
  std::vector<PackedWorker> pool(P);
  for (index_t q0 = 0; q0 < Q; q0 += TQ) {
    const index_t nq = std::min(TQ, Q - q0);
    const index_t nq_pad = (nq + kMR - 1) / kMR * kMR;
    pack_panel(queries + q0 * D, nq, D, kMR, a);
    for (index_t q = 0; q < nq_pad; ++q) qn[q] = (!inner_product && q < nq) ? q_norm2[q0 + q] : 0.0f;
    parallel_for_workers(P, [&](int w) {
      // Contiguous reference ranges of equal size (multiples of kNR), tiled by TN inside:
      // splitting whole tiles would leave up to one tile of imbalance (4% at N = 50,000).
      long long s0, s1;
      worker_range((N + kNR - 1) / kNR, w, P, s0, s1);
      const index_t r0 = s0 * kNR, r1 = std::min(N, index_t(s1) * kNR);
      PackedWorker& wk = pool[w];
      const index_t tn_pad = (TN + kNR - 1) / kNR * kNR;
      float* b = aligned(wk.b, packed_floats(TN, D, kNR));
      float* rn = aligned(wk.r_norm2, tn_pad);
      float* ls = aligned(wk.lane_best, nq_pad * 8);
      std::int32_t* li = aligned(wk.lane_index, nq_pad * 8);
      float* partial = aligned(wk.partial, kMCS * kNCS * kMR * kNR);
      if (decode) wk.tile.resize(TN * D);
      wk.best.resize(nq * k);
      wk.best_index.resize(nq * k);
      for (index_t q = 0; q < nq; ++q)
        topk_init(wk.best.data() + q * k, wk.best_index.data() + q * k, k, largest);
      for (index_t j = 0; j < nq_pad * 8; ++j) {
        ls[j] = largest ? -INFINITY : INFINITY;
        li[j] = -1;
      }
      for (index_t n0 = r0; n0 < r1; n0 += TN) {
        const index_t nt = std::min(TN, r1 - n0);
        const float* rows = static_cast<const float*>(refs) + n0 * D;
        const char* src = static_cast<const char*>(refs) + n0 * D * row_bytes(refs_type);
        if (center != nullptr) {
          load_centred_rows(refs_type, src, nt, D, center, wk.tile.data(), r_norm2.data() + n0);
          rows = wk.tile.data();
        } else if (decode) {
          load_rows(refs_type, src, nt * D, wk.tile.data());
          rows = wk.tile.data();
        }
        if (!inner_product) {
          // ||r||^2 once per call (the first query block); a worker owns the same tiles in
          // every block.
          if (q0 == 0 && center == nullptr) row_norms(rows, nt, D, r_norm2.data() + n0);
          std::copy(r_norm2.begin() + n0, r_norm2.begin() + n0 + nt, rn);
          std::fill(rn + nt, rn + tn_pad, 0.0f);
        }
        pack_panel(rows, nt, D, kNR, b);
        PackedSearchTile tile{a, b, nq, nt, D, qn, rn, inner_product, k,
                              static_cast<std::int32_t>(n0), ls, li,
                              wk.best.data(), wk.best_index.data(), partial};
        packed_search_tile(tile);
      }
      // k = 1: reduce the 8 lanes of each query (ties to the lowest index via topk_push).
      if (k == 1)
        for (index_t q = 0; q < nq; ++q)
          for (int j = 0; j < 8; ++j)
            if (li[q * 8 + j] >= 0)
              topk_push(wk.best.data() + q, wk.best_index.data() + q, 1, ls[q * 8 + j],
                        index_t(li[q * 8 + j]), largest);
    });
    merge_workers(pool, q0, nq, k, largest, args.row_offset, args.values, args.indices);
  }
}

// Values of the winners recomputed in float64 from the stored rows and rounded once to float32,
// then the lists re-sorted (topk_refine_f64): the float32 scores (GEMM or packed kernel) only
// had to be good enough to find the candidates. O(Q k D), against O(Q N D) for the scores.
void refine_winners(const SearchArgs& a, int workers) {
  detail::parallel_for_workers(workers, [&](int w) {
    long long q0, q1;
    detail::worker_range(a.Q, w, workers, q0, q1);
    for (index_t q = q0; q < q1; ++q)
      topk_refine_f64(a.queries + q * a.D, a.refs_type, a.refs, a.row_offset, a.D, a.inner_product,
                      a.values + q * a.k, a.indices + q * a.k, a.k);
  });
}

}  // namespace

Status nn_search_cpu(const SearchArgs& a, const Tuning& t) {
  const index_t Q = a.Q, N = a.N, D = a.D;
  const int k = a.k;
  const bool inner_product = a.inner_product, largest = inner_product;
  if (Q < 1 || D < 1 || N < 0 || k < 1) return Status::kInvalidArgument;
  if (N == 0) {
    for (index_t q = 0; q < Q; ++q) topk_init(a.values + q * k, a.indices + q * k, k, largest);
    return Status::kOk;
  }
  const index_t TN = plan_tile_rows(t.tile_rows, kSearchTileRows, N, D * index_t(sizeof(float)));
  const index_t n_tiles = (N + TN - 1) / TN;
  const int P = static_cast<int>(std::max<index_t>(1, std::min<index_t>(t.workers, n_tiles)));
  // L2 scores on centred data: ||q||^2 - 2 <q, r> + ||r||^2 in float32 loses every digit of the
  // distance when q and r share a large offset (at +1e4 all of them); it is shift invariant, so
  // q - c and r - c give the same distances with small norms.
  const float* center = inner_product ? nullptr : a.center;
  const bool decode = a.refs_type != RowType::kFloat32 || center != nullptr;
  std::vector<float> centred(center ? Q * D : 0);
  for (index_t q = 0; q < static_cast<index_t>(centred.size()) / D; ++q)
    for (index_t d = 0; d < D; ++d) centred[q * D + d] = a.queries[q * D + d] - center[d];
  const float* queries = center ? centred.data() : a.queries;

  std::vector<float> q_norm2(inner_product ? 0 : Q);
  for (index_t q = 0; q < static_cast<index_t>(q_norm2.size()); ++q) {
    const double s = detail::squared_norm(queries + q * D, D);
    q_norm2[q] = static_cast<float>(s);
  }

  // The packed AVX2+FMA kernel where the CPU has it (indices are int32 inside the kernel);
  // the BLAS path otherwise.
  if (detail::packed_search_available() && N < std::numeric_limits<std::int32_t>::max() - 64) {
    index_t TNp = TN;
    if (t.tile_rows <= 0) {
      const index_t block = detail::kNR * detail::kNCS;
      const index_t fit = kPackedTileBytes / (D * index_t(sizeof(float))) / block * block;
      TNp = std::min(TN, std::max(block, fit));
    }
    const index_t slivers = (N + detail::kNR - 1) / detail::kNR;
    const int Pp = static_cast<int>(std::max<index_t>(1, std::min<index_t>(t.workers, slivers)));
    search_packed(a, queries, center, TNp, Pp, q_norm2);
    refine_winners(a, Pp);
    return Status::kOk;
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
        const float* rows = static_cast<const float*>(a.refs) + n0 * D;
        const char* src = static_cast<const char*>(a.refs) + n0 * D * row_bytes(a.refs_type);
        if (center != nullptr) {
          detail::load_centred_rows(a.refs_type, src, nt, D, center, wk.tile.data(),
                                    wk.tile_norm2.data());
          rows = wk.tile.data();
        } else if (decode) {
          detail::load_rows(a.refs_type, src, nt * D, wk.tile.data());
          rows = wk.tile.data();
        }
        if (!inner_product && center == nullptr) row_norms(rows, nt, D, wk.tile_norm2.data());
        float* sc = wk.scores.data();
        detail::gemm(true, nq, nt, D, 1.0f, queries + q0 * D, D, rows, D, 0.0f, sc, nt);
        for (index_t q = 0; q < nq; ++q) {
          const float* row = sc + q * nt;
          float* bs = wk.best.data() + q * k;
          index_t* bi = wk.best_index.data() + q * k;
          const index_t base = a.row_offset + n0;
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
    merge_workers(pool, q0, nq, k, largest, 0, a.values, a.indices);
  }
  refine_winners(a, P);
  return Status::kOk;
}

}  // namespace diffrepro
