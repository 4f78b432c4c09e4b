// SPDX-License-Identifier: Apache-2.0
// pybind11 module diffrepro._cuda: turns integer addresses from torch's data_ptr() (device
// memory) and cuda_stream handles into typed pointers, releases the GIL around the launches and
// maps a Status to a RuntimeError. runtime_info() never raises, even without a driver.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "binding_util.h"
#include "diffrepro/api_cuda.h"

namespace py = pybind11;
using diffrepro::index_t;
using diffrepro::RowType;
using diffrepro::Status;

namespace {

using diffrepro::binding::ptr;
using diffrepro::binding::valid_row_type;

void check(Status s, const char* op) {
  diffrepro::binding::check(s, "_cuda", op,
                            s == Status::kCudaError ? diffrepro::cuda_last_error_message() : nullptr);
}

void empirical_denoiser(bool f64, std::uintptr_t x, std::uintptr_t y, int y_type, index_t Q,
                        index_t N, index_t D, std::uintptr_t center, std::uintptr_t inv_sigma2,
                        index_t row_offset, std::uintptr_t workspace, std::uintptr_t max_logit,
                        std::uintptr_t sum_exp, std::uintptr_t sum_exp_sq,
                        std::uintptr_t weighted_sum, std::uintptr_t nearest_index,
                        std::uintptr_t nearest_sqdist, std::uintptr_t stream, int config,
                        int splits) {
  if (!valid_row_type(y_type)) check(Status::kInvalidArgument, "empirical_denoiser");
  Status s;
  {
    py::gil_scoped_release release;
    if (f64)
      s = diffrepro::empirical_denoiser_cuda(
          ptr<const double>(x), ptr<const void>(y), static_cast<RowType>(y_type), Q, N, D,
          ptr<const double>(center), ptr<const double>(inv_sigma2), row_offset,
          ptr<void>(workspace), ptr<double>(max_logit), ptr<double>(sum_exp),
          ptr<double>(sum_exp_sq), ptr<double>(weighted_sum), ptr<index_t>(nearest_index),
          ptr<double>(nearest_sqdist), ptr<void>(stream), config, splits);
    else
      s = diffrepro::empirical_denoiser_cuda(
          ptr<const float>(x), ptr<const void>(y), static_cast<RowType>(y_type), Q, N, D,
          ptr<const float>(center), ptr<const double>(inv_sigma2), row_offset,
          ptr<void>(workspace), ptr<double>(max_logit), ptr<double>(sum_exp),
          ptr<double>(sum_exp_sq), ptr<float>(weighted_sum), ptr<index_t>(nearest_index),
          ptr<double>(nearest_sqdist), ptr<void>(stream), config, splits);
  }
  check(s, "empirical_denoiser");
}

void nn_search(std::uintptr_t queries, std::uintptr_t refs, int refs_type, index_t Q, index_t N,
               index_t D, int k, bool inner_product, index_t row_offset, std::uintptr_t values,
               std::uintptr_t indices, std::uintptr_t workspace, std::uintptr_t stream,
               int config, int splits) {
  if (!valid_row_type(refs_type)) check(Status::kInvalidArgument, "nn_search");
  Status s;
  {
    py::gil_scoped_release release;
    s = diffrepro::nn_search_cuda(ptr<const float>(queries), ptr<const void>(refs),
                                  static_cast<RowType>(refs_type), Q, N, D, k, inner_product,
                                  row_offset, ptr<float>(values), ptr<index_t>(indices),
                                  ptr<void>(workspace), ptr<void>(stream), config, splits);
  }
  check(s, "nn_search");
}

// Device count and runtime facts. With the static runtime and no driver, cudaGetDeviceCount
// returns cudaErrorInsufficientDriver (or cudaErrorNoDevice without a GPU): that is reported as
// 0 devices plus the error name, never raised, so build_info() works on every machine.
py::dict runtime_info() {
  py::dict d;
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    count = 0;
    d["error"] = std::string(cudaGetErrorName(e));
    cudaGetLastError();  // do not leave the failure as the thread's last error
  } else {
    d["error"] = py::none();
  }
  d["device_count"] = count;
  int runtime = 0;
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) runtime = 0;
  d["runtime_version"] = runtime;
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  d["driver_version"] = driver;  // 0: no driver installed
  std::string archs = diffrepro::cuda_compiled_archs();
  d["archs"] = archs.empty() ? std::string(DR_CUDA_ARCHS) : archs;
  d["archs_cmake"] = std::string(DR_CUDA_ARCHS);
  d["max_k"] = diffrepro::kNNSearchCudaMaxK;
  d["version"] = std::string(DR_VERSION);
  return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "diffrepro CUDA kernels (raw device pointers + stream; use diffrepro.ops instead)";
  using namespace pybind11::literals;
  m.def("empirical_denoiser", &empirical_denoiser, "f64"_a, "x"_a, "y"_a, "y_type"_a, "Q"_a,
        "N"_a, "D"_a, "center"_a, "inv_sigma2"_a, "row_offset"_a, "workspace"_a, "max_logit"_a,
        "sum_exp"_a, "sum_exp_sq"_a, "weighted_sum"_a, "nearest_index"_a, "nearest_sqdist"_a,
        "stream"_a, py::kw_only(), "config"_a = -1, "splits"_a = 0);
  m.def("empirical_denoiser_workspace_bytes", &diffrepro::empirical_denoiser_cuda_workspace_bytes,
        "Q"_a, "N"_a, "D"_a, py::kw_only(), "config"_a = -1, "splits"_a = 0);
  m.def("nn_search", &nn_search, "queries"_a, "refs"_a, "refs_type"_a, "Q"_a, "N"_a, "D"_a,
        "k"_a, "inner_product"_a, "row_offset"_a, "values"_a, "indices"_a, "workspace"_a,
        "stream"_a, py::kw_only(), "config"_a = -1, "splits"_a = 0);
  m.def("nn_search_workspace_bytes", &diffrepro::nn_search_cuda_workspace_bytes, "Q"_a, "N"_a,
        "D"_a, "k"_a, py::kw_only(), "config"_a = -1, "splits"_a = 0);
  m.def("runtime_info", &runtime_info);
  m.attr("max_k") = diffrepro::kNNSearchCudaMaxK;
  m.attr("version") = DR_VERSION;
}
