// SPDX-License-Identifier: Apache-2.0
// pybind11 module diffrepro._cpu: turns integer addresses from torch's data_ptr() into typed
// pointers, releases the GIL around the kernels and maps a Status to a RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "../cpu/gemm.h"
#include "../cpu/microkernel.h"
#include "binding_util.h"
#include "diffrepro/api_cpu.h"

namespace py = pybind11;
using diffrepro::index_t;
using diffrepro::RowType;
using diffrepro::Status;

namespace {

using diffrepro::binding::ptr;

void check(Status s, const char* op) { diffrepro::binding::check(s, "_cpu", op); }

void empirical_denoiser(bool f64, std::uintptr_t x, std::uintptr_t y, int y_type, index_t Q,
                        index_t N, index_t D, std::uintptr_t center, std::uintptr_t inv_sigma2,
                        index_t row_offset, index_t tile_rows, int workers,
                        std::uintptr_t max_logit, std::uintptr_t sum_exp,
                        std::uintptr_t sum_exp_sq, std::uintptr_t weighted_sum,
                        std::uintptr_t nearest_index, std::uintptr_t nearest_sqdist) {
  if (!diffrepro::binding::valid_row_type(y_type)) check(Status::kInvalidArgument, "empirical_denoiser");
  Status s;
  {
    py::gil_scoped_release release;
    if (f64)
      s = diffrepro::empirical_denoiser_cpu<double>(
          ptr<const double>(x), ptr<const void>(y), static_cast<RowType>(y_type), Q, N, D,
          ptr<const double>(center), ptr<const double>(inv_sigma2), row_offset, tile_rows,
          workers, ptr<double>(max_logit), ptr<double>(sum_exp), ptr<double>(sum_exp_sq),
          ptr<double>(weighted_sum), ptr<index_t>(nearest_index), ptr<double>(nearest_sqdist));
    else
      s = diffrepro::empirical_denoiser_cpu<float>(
          ptr<const float>(x), ptr<const void>(y), static_cast<RowType>(y_type), Q, N, D,
          ptr<const float>(center), ptr<const double>(inv_sigma2), row_offset, tile_rows, workers,
          ptr<double>(max_logit), ptr<double>(sum_exp), ptr<double>(sum_exp_sq),
          ptr<float>(weighted_sum), ptr<index_t>(nearest_index), ptr<double>(nearest_sqdist));
  }
  check(s, "empirical_denoiser");
}

void nn_search(std::uintptr_t queries, std::uintptr_t refs, int refs_type, index_t Q, index_t N,
               index_t D, int k, bool inner_product, index_t row_offset, index_t tile_rows,
               int workers, std::uintptr_t values, std::uintptr_t indices) {
  if (!diffrepro::binding::valid_row_type(refs_type)) check(Status::kInvalidArgument, "nn_search");
  Status s;
  {
    py::gil_scoped_release release;
    s = diffrepro::nn_search_cpu(ptr<const float>(queries), ptr<const void>(refs),
                                 static_cast<RowType>(refs_type), Q, N, D, k, inner_product,
                                 row_offset, tile_rows, workers, ptr<float>(values),
                                 ptr<index_t>(indices));
  }
  check(s, "nn_search");
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "diffrepro CPU kernels (raw-pointer interface; use diffrepro.ops instead)";
  diffrepro::detail::gemm_init_single_threaded();
  m.def("empirical_denoiser", &empirical_denoiser);
  m.def("nn_search", &nn_search);
  m.def("gemm_core", [] { return std::string(diffrepro::cpu_gemm_core()); });
  m.def("cpu_isa", [] { return std::string(diffrepro::cpu_isa()); });
  // nn_search runs its own packed AVX2+FMA kernel on AVX2-only CPUs, the BLAS otherwise.
  m.def("search_kernel", [] {
    return std::string(diffrepro::detail::packed_search_available() ? "packed avx2+fma micro-kernel"
                                                                   : "blas");
  });
  m.attr("version") = DR_VERSION;
}
