// SPDX-License-Identifier: Apache-2.0
// pybind11 module diffrepro._cpu: fills the argument structs from the dict built by
// diffrepro/ops.py, releases the GIL around the kernels and maps a Status to a RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <type_traits>
#include <tuple>
#include <vector>

#include "binding_util.h"
#include "diffrepro/api_cpu.h"
#include "../cpu/machine_peak.h"

namespace py = pybind11;
using diffrepro::index_t;
using diffrepro::Tuning;

namespace {

Tuning cpu_tuning(index_t tile_rows, int workers) {
  Tuning t;
  t.tile_rows = tile_rows;
  t.workers = workers;
  return t;
}

void empirical_denoiser(const py::dict& args, index_t tile_rows, int workers) {
  const Tuning t = cpu_tuning(tile_rows, workers);
  const auto s = diffrepro::binding::run_denoiser(
      args, [&](const auto& a) { return diffrepro::empirical_denoiser_cpu(a, t); });
  diffrepro::binding::check(s, "_cpu", "empirical_denoiser");
}

void pruned_denoiser(const py::dict& args, const py::dict& prune, int workers) {
  const Tuning t = cpu_tuning(0, workers);
  const diffrepro::binding::PruneFields f = diffrepro::binding::prune_fields(prune);
  const auto s = diffrepro::binding::run_denoiser(args, [&](const auto& a) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(a.x)>>;
    return diffrepro::pruned_denoiser_cpu(a, diffrepro::binding::prune_args<T>(f), t);
  });
  diffrepro::binding::check(s, "_cpu", "pruned_denoiser");
}

void nn_search(const py::dict& args, index_t tile_rows, int workers) {
  const Tuning t = cpu_tuning(tile_rows, workers);
  const auto s = diffrepro::binding::run_search(
      args, [&](const auto& a) { return diffrepro::nn_search_cpu(a, t); });
  diffrepro::binding::check(s, "_cpu", "nn_search");
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "diffrepro CPU kernels (raw-pointer interface; use diffrepro.ops instead)";
  using namespace pybind11::literals;
  diffrepro::cpu_init();
  m.def("empirical_denoiser", &empirical_denoiser, "args"_a, py::kw_only(), "tile_rows"_a = 0,
        "workers"_a = 1);
  m.def("pruned_denoiser", &pruned_denoiser, "args"_a, "prune"_a, py::kw_only(), "workers"_a = 1);
  m.def("nn_search", &nn_search, "args"_a, py::kw_only(), "tile_rows"_a = 0, "workers"_a = 1);
  m.def("gemm_core", [] { return std::string(diffrepro::cpu_gemm_core()); });
  m.def("cpu_isa", [] { return std::string(diffrepro::cpu_isa()); });
  m.def("search_kernel", [] { return std::string(diffrepro::cpu_search_kernel()); });
  m.def("fma_widths", [] {
    int w[3];
    const int n = diffrepro::fma_widths(w);
    return std::vector<int>(w, w + n);
  });
  m.def("fma_loop", [](int width_bits, long long iterations, int workers) {
    double seconds = 0, flops = 0, cpu_seconds = 0;
    {
      py::gil_scoped_release release;
      diffrepro::fma_loop(width_bits, iterations, workers, &seconds, &flops, &cpu_seconds);
    }
    return std::make_tuple(seconds, flops, cpu_seconds);
  }, "width_bits"_a, "iterations"_a, "workers"_a);
  m.def("read_bandwidth_seconds", [](long long bytes, int passes, int workers) {
    py::gil_scoped_release release;
    return diffrepro::read_bandwidth_seconds(bytes, passes, workers);
  }, "bytes"_a, "passes"_a, "workers"_a);
  m.attr("version") = DR_VERSION;
}
