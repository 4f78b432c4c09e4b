// SPDX-License-Identifier: Apache-2.0
// pybind11 module diffrepro._cuda: turns integer addresses from torch's data_ptr() (device
// memory) and cuda_stream handles into the argument structs, releases the GIL around the
// launches and maps a Status to a RuntimeError. runtime_info() never raises, even without a driver.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "binding_util.h"
#include "blas_epilogue_binding.h"
#include "diffrepro/api_cuda.h"

namespace py = pybind11;
using diffrepro::index_t;
using diffrepro::Status;
using diffrepro::Tuning;

namespace {

void check(Status s, const char* op) {
  diffrepro::binding::check(s, "_cuda", op,
                            s == Status::kCudaError ? diffrepro::cuda_last_error_message() : nullptr);
}

Tuning cuda_tuning(std::uintptr_t workspace, int config, int splits) {
  Tuning t;
  t.workspace = reinterpret_cast<void*>(workspace);
  t.config = config;
  t.splits = splits;
  return t;
}

void empirical_denoiser(const py::dict& args, std::uintptr_t workspace, std::uintptr_t stream,
                        int config, int splits) {
  const Tuning t = cuda_tuning(workspace, config, splits);
  void* st = reinterpret_cast<void*>(stream);
  check(diffrepro::binding::run_denoiser(
            args, [&](const auto& a) { return diffrepro::empirical_denoiser_cuda(a, t, st); }),
        "empirical_denoiser");
}

void pruned_denoiser(const py::dict& args, const py::dict& prune, std::uintptr_t workspace,
                     std::uintptr_t stream, int config, int splits) {
  const Tuning t = cuda_tuning(workspace, config, splits);
  void* st = reinterpret_cast<void*>(stream);
  const diffrepro::binding::PruneFields f = diffrepro::binding::prune_fields(prune);
  const std::string why = diffrepro::binding::pruned_refusal(
      args, f, config,
      diffrepro::pruned_denoiser_cuda_config(diffrepro::binding::get<index_t>(args, "Q"),
                                             diffrepro::binding::get<index_t>(args, "N"),
                                             f.tile_rows, config));
  const Status s = diffrepro::binding::run_denoiser(args, [&](const auto& a) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(a.x)>>;
    return diffrepro::pruned_denoiser_cuda(a, diffrepro::binding::prune_args<T>(f), t, st);
  });
  diffrepro::binding::check(s, "_cuda", "pruned_denoiser",
                            s == Status::kCudaError ? diffrepro::cuda_last_error_message() : why.c_str());
}

void nn_search(const py::dict& args, std::uintptr_t workspace, std::uintptr_t stream, int config,
               int splits) {
  const Tuning t = cuda_tuning(workspace, config, splits);
  void* st = reinterpret_cast<void*>(stream);
  check(diffrepro::binding::run_search(
            args, [&](const auto& a) { return diffrepro::nn_search_cuda(a, t, st); }),
        "nn_search");
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
  d["max_k"] = diffrepro::kSearchMaxK;
  d["version"] = std::string(DR_VERSION);
  return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "diffrepro CUDA kernels (raw device pointers + stream; use diffrepro.ops instead)";
  using namespace pybind11::literals;
  m.def("empirical_denoiser", &empirical_denoiser, "args"_a, "workspace"_a, "stream"_a,
        py::kw_only(), "config"_a = -1, "splits"_a = 0);
  m.def("empirical_denoiser_workspace_bytes", &diffrepro::empirical_denoiser_cuda_workspace_bytes,
        "Q"_a, "N"_a, "D"_a, py::kw_only(), "config"_a = -1, "splits"_a = 0);
  m.def("pruned_denoiser", &pruned_denoiser, "args"_a, "prune"_a, "workspace"_a, "stream"_a,
        py::kw_only(), "config"_a = -1, "splits"_a = 0);
  m.def("pruned_denoiser_workspace_bytes", &diffrepro::pruned_denoiser_cuda_workspace_bytes, "Q"_a,
        "N"_a, "D"_a, "tile_rows"_a, py::kw_only(), "config"_a = -1, "splits"_a = 0);
  m.def("pruned_denoiser_config", &diffrepro::pruned_denoiser_cuda_config, "Q"_a, "N"_a,
        "tile_rows"_a, py::kw_only(), "config"_a = -1);
  m.def("nn_search", &nn_search, "args"_a, "workspace"_a, "stream"_a, py::kw_only(),
        "config"_a = -1, "splits"_a = 0);
  m.def("nn_search_workspace_bytes", &diffrepro::nn_search_cuda_workspace_bytes, "Q"_a, "N"_a,
        "D"_a, "k"_a, py::kw_only(), "config"_a = -1, "splits"_a = 0);
  m.def("runtime_info", &runtime_info);
  diffrepro::binding::add_blas_epilogue(m);  // the BLAS engine's epilogue kernels
  m.attr("max_k") = diffrepro::kSearchMaxK;
  m.attr("version") = DR_VERSION;
}
