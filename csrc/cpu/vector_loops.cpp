// SPDX-License-Identifier: Apache-2.0
// Multi-versioned elementwise loops (see vector_loops.h). The bodies are plain loops written for
// the auto-vectoriser; each public function is cloned per target and dispatched by an ifunc.
#include "vector_loops.h"

#include <cstdint>

#include "diffrepro/rows.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DR_CLONES
#endif

namespace diffrepro::detail {
namespace {

// ||v||^2 accumulated in double: a norm enters every score of its row. A plain loop is one
// serial chain of dependent adds (4 cycles per element; it was the whole call's bottleneck at
// small Q); the simd reduction keeps per-lane partial sums, in a fixed order for a given ISA.
template <class T>
inline double norm2_body(const T* v, index_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (index_t i = 0; i < n; ++i) s += static_cast<double>(v[i]) * v[i];
  return s;
}

// One loop per storage type, so the type switch is outside the vectorised loop.
template <class T, class S, class Decode>
inline void centred_rows(const S* src, index_t rows, index_t D, const T* center, T* dst, T* norm2,
                         Decode decode) {
  for (index_t n = 0; n < rows; ++n) {
    const S* in = src + n * D;
    T* out = dst + n * D;
    for (index_t d = 0; d < D; ++d) out[d] = decode(in[d]) - center[d];
    norm2[n] = static_cast<T>(norm2_body(out, D));
  }
}

// Calls fn(typed_src, decode) with the storage type resolved once, outside the hot loop.
template <class T, class Fn>
inline void with_row_type(RowType type, const void* src, Fn&& fn) {
  switch (type) {
    case RowType::kUInt8:
      return fn(static_cast<const std::uint8_t*>(src),
                [](std::uint8_t u) { return decode_pixel<T>(u); });
    case RowType::kFloat16:
      return fn(static_cast<const std::uint16_t*>(src),
                [](std::uint16_t h) { return static_cast<T>(half_bits_to_float(h)); });
    case RowType::kFloat64:
      return fn(static_cast<const double*>(src), [](double v) { return static_cast<T>(v); });
    case RowType::kFloat32:
    default:
      return fn(static_cast<const float*>(src), [](float v) { return static_cast<T>(v); });
  }
}

template <class T>
inline void centred_rows_any(RowType type, const void* src, index_t rows, index_t D,
                             const T* center, T* dst, T* norm2) {
  with_row_type<T>(type, src, [&](auto typed, auto decode) {
    centred_rows(typed, rows, D, center, dst, norm2, decode);
  });
}

template <class T>
inline void sparse_acc(const T* p, index_t nq, index_t nt, const T* tile, index_t D, T* acc) {
  for (index_t q = 0; q < nq; ++q) {
    T* DR_RESTRICT a = acc + q * D;
    for (index_t j = 0; j < nt; ++j) {
      const T w = p[q * nt + j];
      if (w == T(0)) continue;  // exact zero: skipping it changes nothing
      const T* DR_RESTRICT y = tile + j * D;
      for (index_t d = 0; d < D; ++d) a[d] += w * y[d];
    }
  }
}

}  // namespace

DR_CLONES void load_centred_rows(RowType type, const void* src, index_t rows, index_t D,
                                 const float* center, float* dst, float* norm2) {
  centred_rows_any(type, src, rows, D, center, dst, norm2);
}

DR_CLONES void load_centred_rows(RowType type, const void* src, index_t rows, index_t D,
                                 const double* center, double* dst, double* norm2) {
  centred_rows_any(type, src, rows, D, center, dst, norm2);
}

DR_CLONES void load_rows(RowType type, const void* src, index_t count, float* dst) {
  with_row_type<float>(type, src, [&](auto typed, auto decode) {
    for (index_t e = 0; e < count; ++e) dst[e] = decode(typed[e]);
  });
}

DR_CLONES double squared_norm(const float* v, index_t n) { return norm2_body(v, n); }

DR_CLONES void scale(float* a, float r, index_t n) {
  for (index_t i = 0; i < n; ++i) a[i] *= r;
}

DR_CLONES void scale(double* a, double r, index_t n) {
  for (index_t i = 0; i < n; ++i) a[i] *= r;
}

DR_CLONES void sparse_accumulate(const float* p, index_t nq, index_t nt, const float* tile,
                                 index_t D, float* acc) {
  sparse_acc(p, nq, nt, tile, D, acc);
}

DR_CLONES void sparse_accumulate(const double* p, index_t nq, index_t nt, const double* tile,
                                 index_t D, double* acc) {
  sparse_acc(p, nq, nt, tile, D, acc);
}

const char* vector_isa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
  return "generic";
}

}  // namespace diffrepro::detail
