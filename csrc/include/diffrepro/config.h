// SPDX-License-Identifier: Apache-2.0
// Portability macros shared by the host (g++) and device (nvcc) builds. The only header that
// looks at __CUDACC__, so every other header compiles unchanged on both sides.
#pragma once

#if defined(__CUDACC__)
#define DR_HD __host__ __device__ __forceinline__
#define DR_RESTRICT __restrict__
#else
#define DR_HD inline
#define DR_RESTRICT __restrict__
#endif

#include <cstdint>

namespace diffrepro {
using index_t = std::int64_t;
}  // namespace diffrepro
