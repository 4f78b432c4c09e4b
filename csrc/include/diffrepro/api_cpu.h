// SPDX-License-Identifier: Apache-2.0
// CPU entry points. Raw pointers and sizes only (no torch), bundled in the argument structs of
// args.h; every function returns a Status. Row-major, contiguous buffers.
#pragma once

#include "diffrepro/args.h"
#include "diffrepro/config.h"
#include "diffrepro/status.h"

namespace diffrepro {

// Partial state of the empirical optimal denoiser over one chunk of training rows (DenoiserArgs
// documents every field). The products run on centred data (x - c, y - c), so a large common
// offset costs no accuracy. Uses t.tile_rows and t.workers; threads merge in score units, so the
// result does not depend on ||x|| (logits.h). nearest_index is ranked by the float64 distance of
// every row whose float score is within its rounding bound of the best (lowest index on ties).
// Deterministic for fixed (Q, N, D, tile sizes, workers).
// Errors: kInvalidArgument for N < 1, Q < 1, D < 1.
template <class T>
Status empirical_denoiser_cpu(const DenoiserArgs<T>& a, const Tuning& t);

// The same state over the (query, tile) pairs that p.active marks (PruneArgs documents the tile
// grid and the per-tile outputs). Tiles are dealt to the workers round-robin; results do not
// depend on the tile order (nearest ties by index, merges in score units).
// Errors: kInvalidArgument as empirical_denoiser_cpu, or p.tile_rows < 1.
template <class T>
Status pruned_denoiser_cpu(const DenoiserArgs<T>& a, const PruneArgs<T>& p, const Tuning& t);

// Top-k nearest references per query over one chunk of reference rows (SearchArgs). L2 scores
// are formed on centred rows when a.center is set and the winners' values are recomputed in
// float64. Uses t.tile_rows and t.workers.
// Errors: kInvalidArgument for k < 1, Q < 1, D < 1 or N < 0.
Status nn_search_cpu(const SearchArgs& a, const Tuning& t);

// Which BLAS core and vector ISA the CPU path uses, and which kernel nn_search_cpu runs (our
// packed AVX2+FMA micro-kernel on AVX2-only CPUs, the BLAS otherwise), for build_info().
const char* cpu_gemm_core();
const char* cpu_isa();
const char* cpu_search_kernel();

// Once per process, before the first call: the BLAS runs single-threaded inside our workers
// (its own pool on top of them would oversubscribe the cores).
void cpu_init();

}  // namespace diffrepro
