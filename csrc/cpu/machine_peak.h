// SPDX-License-Identifier: Apache-2.0
// The machine's own limits, measured, for the benchmark table's "% of peak" column: a
// register-only FMA loop per vector width and a streaming read over a large buffer.
#pragma once

#include <cstdint>

namespace diffrepro {

// Vector widths (bits) whose FMA loop this CPU can run: a subset of {128, 256, 512}, widest last.
// The count is returned, the widths written to out[0..count).
int fma_widths(int out[3]);

// Runs `iterations` rounds of the FMA loop of `width_bits` on each of `workers` threads and
// returns the wall time from the start of all threads to the last join, the flops done, and
// the mean CPU seconds of a worker (the time its thread actually ran: on cores shared with
// other processes, flops / workers / cpu_seconds is still a core's own rate).
// Each round is 12 independent fused multiply-adds per thread (2 flops per lane).
// Returns seconds < 0 for a width this CPU (or build) cannot run.
void fma_loop(int width_bits, long long iterations, int workers, double* seconds, double* flops,
              double* cpu_seconds);

// Reads `bytes` (rounded down to 64) of a freshly written buffer `passes` times, split over
// `workers` threads, and returns the seconds of the fastest pass (first touch is not timed).
double read_bandwidth_seconds(std::int64_t bytes, int passes, int workers);

}  // namespace diffrepro
