// SPDX-License-Identifier: Apache-2.0
// Peak FMA throughput and streaming-read bandwidth of the running machine (see machine_peak.h).
// Each width's loop is its own function compiled with a target attribute, so the module still
// loads on any x86-64 CPU and each width is measured on its own instructions.
#include "machine_peak.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>
#include <memory>
#include <vector>

#include "parallel.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DR_PEAK_X86 1
#else
#define DR_PEAK_X86 0
#endif

namespace diffrepro {
namespace {

// Independent accumulator chains: FMA latency (4-5 cycles) x 2 ports needs 8-10 in flight;
// 12 covers both and still fits AVX2's 16 registers with the two constants.
constexpr int kFmaChains = 12;
// acc = acc * a + b converges to b / (1 - a): the values stay finite and normal however long
// the loop runs, so no denormal or overflow slows it down.
constexpr float kMul = 0.999999f, kAdd = 1e-6f;

// One width's loop: kFmaChains accumulators, each acc = acc * a + b per round. A macro rather
// than a template with lambdas: lambdas do not inherit the function's target attribute.
#define DR_FMA_LOOP(V, FMA, SET1)                                              \
  V acc[kFmaChains];                                                           \
  for (int c = 0; c < kFmaChains; ++c) acc[c] = SET1(static_cast<float>(c));   \
  const V a = SET1(kMul), b = SET1(kAdd);                                      \
  for (long long i = 0; i < iterations; ++i) {                                 \
    _Pragma("GCC unroll 12") for (int c = 0; c < kFmaChains; ++c) acc[c] = FMA(acc[c], a, b); \
  }                                                                            \
  float out[sizeof(V) / sizeof(float)];                                        \
  float s = 0;                                                                 \
  for (int c = 0; c < kFmaChains; ++c) {                                       \
    std::memcpy(out, &acc[c], sizeof(V));                                      \
    for (float e : out) s += e;                                                \
  }                                                                            \
  return s; /* returned so that the loop is not removed */

#if DR_PEAK_X86
__attribute__((target("fma"))) float fma128(long long iterations) {
  DR_FMA_LOOP(__m128, _mm_fmadd_ps, _mm_set1_ps)
}

__attribute__((target("avx2,fma"))) float fma256(long long iterations) {
  DR_FMA_LOOP(__m256, _mm256_fmadd_ps, _mm256_set1_ps)
}

__attribute__((target("avx512f"))) float fma512(long long iterations) {
  DR_FMA_LOOP(__m512, _mm512_fmadd_ps, _mm512_set1_ps)
}
#endif
#undef DR_FMA_LOOP

using FmaFn = float (*)(long long);

FmaFn fma_fn(int width_bits) {
#if DR_PEAK_X86
  __builtin_cpu_init();
  if (width_bits == 128 && __builtin_cpu_supports("fma")) return fma128;
  if (width_bits == 256 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return fma256;
  if (width_bits == 512 && __builtin_cpu_supports("avx512f")) return fma512;
#endif
  (void)width_bits;
  return nullptr;
}

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// CPU seconds of the calling thread (the time it actually ran; 0 where unavailable).
double thread_cpu_seconds() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) return ts.tv_sec + 1e-9 * ts.tv_nsec;
#endif
  return 0;
}

}  // namespace

namespace detail {
// Sum of 64-bit words; a plain loop for the auto-vectoriser, cloned per ISA as vector_loops.cpp
// does (the loads, not the adds, bound it).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
std::uint64_t read_words(const std::uint64_t* p, std::int64_t n) {
  std::uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (std::int64_t i = 0; i + 4 <= n; i += 4) {
    s0 += p[i];
    s1 += p[i + 1];
    s2 += p[i + 2];
    s3 += p[i + 3];
  }
  return s0 + s1 + s2 + s3;
}
}  // namespace detail

int fma_widths(int out[3]) {
  int n = 0;
  for (int w : {128, 256, 512})
    if (fma_fn(w)) out[n++] = w;
  return n;
}

void fma_loop(int width_bits, long long iterations, int workers, double* seconds, double* flops,
              double* cpu_seconds) {
  const FmaFn fn = fma_fn(width_bits);
  if (!fn) {
    *seconds = -1;
    *flops = 0;
    *cpu_seconds = -1;
    return;
  }
  workers = std::max(workers, 1);
  std::vector<float> sink(workers);
  std::vector<double> ran(workers);
  const double t0 = now();
  detail::parallel_for_workers(workers, [&](int w) {
    const double c0 = thread_cpu_seconds();
    sink[w] = fn(iterations);
    ran[w] = thread_cpu_seconds() - c0;
  });
  *seconds = now() - t0;
  *cpu_seconds = 0;
  for (double r : ran) *cpu_seconds += r / workers;
  volatile float keep = sink[0];
  (void)keep;
  *flops = 2.0 * (width_bits / 32) * kFmaChains * static_cast<double>(iterations) * workers;
}

double read_bandwidth_seconds(std::int64_t bytes, int passes, int workers) {
  workers = std::max(workers, 1);
  const std::int64_t words = std::max<std::int64_t>(bytes / 64, 1) * 8;
  std::unique_ptr<std::uint64_t[]> buf(new std::uint64_t[words]);
  // First touch by the reading worker (pages land where they are read), not timed.
  detail::parallel_for_workers(workers, [&](int w) {
    long long lo, hi;
    detail::worker_range(words / 8, w, workers, lo, hi);
    for (long long i = lo * 8; i < hi * 8; ++i) buf[i] = static_cast<std::uint64_t>(i);
  });
  std::vector<std::uint64_t> sink(workers);
  double best = 1e300;
  for (int p = 0; p < std::max(passes, 1); ++p) {
    const double t0 = now();
    detail::parallel_for_workers(workers, [&](int w) {
      long long lo, hi;
      detail::worker_range(words / 8, w, workers, lo, hi);
      sink[w] += detail::read_words(buf.get() + lo * 8, (hi - lo) * 8);
    });
    best = std::min(best, now() - t0);
  }
  volatile std::uint64_t keep = sink[0];
  (void)keep;
  return best;
}

}  // namespace diffrepro
