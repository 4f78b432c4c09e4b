// SPDX-License-Identifier: Apache-2.0
// Decoding of stored training / reference rows to the compute type, identical on host and
// device so that uint8 rows give bit-for-bit the same values as the same rows decoded by torch.
#pragma once

#include <cstdint>
#include <cstring>

#include "diffrepro/config.h"
#include "diffrepro/status.h"

namespace diffrepro {

// IEEE binary16 -> binary32, exact for every input (normals, subnormals, inf, NaN). Written with
// integer ops only so the same function runs in host code without F16C and in device code.
DR_HD float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t man = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;  // signed zero
  } else {  // subnormal half: normalise the mantissa
    exp = 113u;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Pixel decode u -> u / 127.5 - 1 in type T: one rounding for the division and one for the
// subtraction, exactly the two operations torch performs for `u.to(T) / 127.5 - 1`.
template <class T>
DR_HD T decode_pixel(std::uint8_t u) {
  return static_cast<T>(u) / static_cast<T>(127.5) - static_cast<T>(1);
}

// Bytes per stored element.
DR_HD index_t row_bytes(RowType type) {
  switch (type) {
    case RowType::kUInt8: return 1;
    case RowType::kFloat16: return 2;
    case RowType::kFloat64: return 8;
    case RowType::kFloat32:
    default: return 4;
  }
}

// Element e of a row buffer of the given storage type, converted to T.
template <class T>
DR_HD T load_row_value(RowType type, const void* base, index_t e) {
  switch (type) {
    case RowType::kUInt8: return decode_pixel<T>(static_cast<const std::uint8_t*>(base)[e]);
    case RowType::kFloat16:
      return static_cast<T>(half_bits_to_float(static_cast<const std::uint16_t*>(base)[e]));
    case RowType::kFloat64: return static_cast<T>(static_cast<const double*>(base)[e]);
    case RowType::kFloat32:
    default: return static_cast<T>(static_cast<const float*>(base)[e]);
  }
}

// Partial float64 squared distance sum_{d = d0, d0 + step, ...} (x_d - y_nd)^2 between a query
// x (type T) and stored row n, decoded to T and then widened, exactly as the kernels see it.
// Every backend reports nearest distances with it (step = 1, or the thread stride of a block
// whose partial sums are then reduced), so the reported distance does not depend on how the
// scores were computed (GEMM in float32, centring, tiling).
template <class T>
DR_HD double row_sqdist_f64(const T* x, RowType type, const void* rows, index_t n, index_t D,
                            index_t d0 = 0, index_t step = 1) {
  double acc = 0.0;
  for (index_t d = d0; d < D; d += step) {
    const double diff = static_cast<double>(x[d]) -
                        static_cast<double>(load_row_value<T>(type, rows, n * D + d));
    acc += diff * diff;
  }
  return acc;
}

// Float64 inner product <x, y_n> between a query x (type T) and stored row n, decoded to T and
// then widened, exactly as the kernels see it: the value nn_search(metric="ip") reports.
template <class T>
DR_HD double row_dot_f64(const T* x, RowType type, const void* rows, index_t n, index_t D) {
  double acc = 0.0;
  for (index_t d = 0; d < D; ++d)
    acc += static_cast<double>(x[d]) * static_cast<double>(load_row_value<T>(type, rows, n * D + d));
  return acc;
}

}  // namespace diffrepro
