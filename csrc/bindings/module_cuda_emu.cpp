// SPDX-License-Identifier: Apache-2.0
// pybind11 module diffrepro._cuda_emu: the CUDA kernels run by the host-thread emulator on host
// buffers, called like diffrepro._cuda minus the stream (diffrepro/ops.py picks it with
// _emulate=True). Exists so CI without a GPU executes every CUDA kernel body.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "../emu/api_emu.h"
#include "binding_util.h"

namespace py = pybind11;
using diffrepro::Tuning;

namespace {

Tuning emu_tuning(std::uintptr_t workspace, int config, int splits) {
  Tuning t;
  t.workspace = reinterpret_cast<void*>(workspace);
  t.config = config;
  t.splits = splits;
  return t;
}

void empirical_denoiser(const py::dict& args, std::uintptr_t workspace, int config, int splits) {
  const Tuning t = emu_tuning(workspace, config, splits);
  diffrepro::binding::check(
      diffrepro::binding::run_denoiser(
          args, [&](const auto& a) { return diffrepro::empirical_denoiser_emu(a, t); }),
      "_cuda_emu", "empirical_denoiser");
}

void pruned_denoiser(const py::dict& args, const py::dict& prune, std::uintptr_t workspace, int config,
                     int splits) {
  const Tuning t = emu_tuning(workspace, config, splits);
  const diffrepro::binding::PruneFields f = diffrepro::binding::prune_fields(prune);
  const std::string why = diffrepro::binding::pruned_refusal(
      args, f, config,
      diffrepro::pruned_denoiser_emu_config(diffrepro::binding::get<diffrepro::index_t>(args, "Q"),
                                            diffrepro::binding::get<diffrepro::index_t>(args, "N"),
                                            f.tile_rows, config));
  const auto s = diffrepro::binding::run_denoiser(args, [&](const auto& a) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(a.x)>>;
    return diffrepro::pruned_denoiser_emu(a, diffrepro::binding::prune_args<T>(f), t);
  });
  diffrepro::binding::check(s, "_cuda_emu", "pruned_denoiser", why.c_str());
}

void nn_search(const py::dict& args, std::uintptr_t workspace, int config, int splits) {
  const Tuning t = emu_tuning(workspace, config, splits);
  diffrepro::binding::check(
      diffrepro::binding::run_search(args, [&](const auto& a) { return diffrepro::nn_search_emu(a, t); }),
      "_cuda_emu", "nn_search");
}

}  // namespace

PYBIND11_MODULE(_cuda_emu, m) {
  m.doc() = "diffrepro CUDA kernels under the CPU emulator (tests only; host pointers)";
  using namespace pybind11::literals;
  m.def("empirical_denoiser", &empirical_denoiser, "args"_a, "workspace"_a, py::kw_only(),
        "config"_a = -1, "splits"_a = 0);
  m.def("empirical_denoiser_workspace_bytes", &diffrepro::empirical_denoiser_emu_workspace_bytes,
        "Q"_a, "N"_a, "D"_a, py::kw_only(), "config"_a = -1, "splits"_a = 0);
  m.def("pruned_denoiser", &pruned_denoiser, "args"_a, "prune"_a, "workspace"_a, py::kw_only(),
        "config"_a = -1, "splits"_a = 0);
  m.def("pruned_denoiser_workspace_bytes", &diffrepro::pruned_denoiser_emu_workspace_bytes, "Q"_a,
        "N"_a, "D"_a, "tile_rows"_a, py::kw_only(), "config"_a = -1, "splits"_a = 0);
  m.def("pruned_denoiser_config", &diffrepro::pruned_denoiser_emu_config, "Q"_a, "N"_a,
        "tile_rows"_a, py::kw_only(), "config"_a = -1);
  m.def("nn_search", &nn_search, "args"_a, "workspace"_a, py::kw_only(), "config"_a = -1,
        "splits"_a = 0);
  m.def("nn_search_workspace_bytes", &diffrepro::nn_search_emu_workspace_bytes, "Q"_a, "N"_a,
        "D"_a, "k"_a, py::kw_only(), "config"_a = -1, "splits"_a = 0);
  m.attr("max_k") = diffrepro::kSearchMaxK;
  m.attr("version") = DR_VERSION;
}
