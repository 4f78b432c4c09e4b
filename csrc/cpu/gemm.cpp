// SPDX-License-Identifier: Apache-2.0
// Binds gemm.h to scipy-openblas32's prefixed CBLAS symbols.
#include "gemm.h"

#include <cblas.h>

#include <string>

#include "diffrepro/api_cpu.h"
#include "microkernel.h"
#include "vector_loops.h"

namespace diffrepro::detail {

void gemm(bool b_trans, index_t M, index_t N, index_t K, float alpha, const float* A, index_t lda,
          const float* B, index_t ldb, float beta, float* C, index_t ldc) {
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, b_trans ? CblasTrans : CblasNoTrans,
                    static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), alpha, A,
                    static_cast<int>(lda), B, static_cast<int>(ldb), beta, C,
                    static_cast<int>(ldc));
}

void gemm(bool b_trans, index_t M, index_t N, index_t K, double alpha, const double* A,
          index_t lda, const double* B, index_t ldb, double beta, double* C, index_t ldc) {
  scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, b_trans ? CblasTrans : CblasNoTrans,
                    static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), alpha, A,
                    static_cast<int>(lda), B, static_cast<int>(ldb), beta, C,
                    static_cast<int>(ldc));
}

const char* gemm_core_name() { return scipy_openblas_get_corename(); }

// Our workers call the BLAS concurrently; letting it spawn its own pool on top would
// oversubscribe the cores.
void gemm_init_single_threaded() { scipy_openblas_set_num_threads(1); }

}  // namespace diffrepro::detail

namespace diffrepro {

// The vector ISA of diffrepro's own loops (the products' ISA is the BLAS core's, reported
// by cpu_gemm_core()).
const char* cpu_isa() { return detail::vector_isa(); }

const char* cpu_gemm_core() { return detail::gemm_core_name(); }

const char* cpu_search_kernel() {
  return detail::packed_search_available() ? "packed avx2+fma micro-kernel" : "blas";
}

void cpu_init() { detail::gemm_init_single_threaded(); }

}  // namespace diffrepro
