// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the three pybind11 modules: the argument structs of args.h filled from one
// Python dict of integer addresses and sizes (built once in diffrepro/ops.py for every backend),
// Status to RuntimeError. Only public headers (csrc/include) are included here.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "diffrepro/args.h"
#include "diffrepro/status.h"

namespace diffrepro::binding {

namespace py = pybind11;

// Throws "diffrepro.<module>.<op>: <status message> (<detail>)" unless s is kOk.
inline void check(Status s, const char* module, const char* op, const char* detail = nullptr) {
  if (s == Status::kOk) return;
  std::string msg = std::string("diffrepro.") + module + "." + op + ": " + status_message(s);
  if (detail && *detail) msg += std::string(" (") + detail + ")";
  throw std::runtime_error(msg);
}

// The dict must hold exactly these keys: a misspelt or forgotten field is a ValueError naming
// it, never a null pointer inside a kernel.
// `optional` fields may be absent (their pointer is then null).
inline void expect_keys(const py::dict& d, const char* what, std::initializer_list<const char*> keys,
                        std::initializer_list<const char*> optional = {}) {
  for (const char* k : keys)
    if (!d.contains(k)) throw py::value_error(std::string(what) + " is missing the field '" + k + "'");
  std::size_t present = keys.size();
  for (const char* k : optional) present += d.contains(k) ? 1 : 0;
  if (py::len(d) != present)
    throw py::value_error(std::string(what) + " has " + std::to_string(py::len(d)) +
                          " fields, expected " + std::to_string(present));
}

template <class T>
T get(const py::dict& d, const char* key) {
  return d[key].cast<T>();
}

template <class T>
T* ptr(const py::dict& d, const char* key) {
  return reinterpret_cast<T*>(d[key].cast<std::uintptr_t>());
}

inline RowType row_type(const py::dict& d, const char* key) {
  const int t = get<int>(d, key);
  if (t < 0 || t > static_cast<int>(RowType::kFloat16))
    throw py::value_error(std::string(key) + " must be a RowType code 0..3, got " + std::to_string(t));
  return static_cast<RowType>(t);
}

template <class T>
DenoiserArgs<T> denoiser_args(const py::dict& d) {
  expect_keys(d, "denoiser args",
              {"f64", "x", "y", "y_type", "Q", "N", "D", "center", "inv_sigma2", "row_offset",
               "max_logit", "max_logit_lo", "sum_exp", "sum_exp_sq", "weighted_sum",
               "nearest_index", "nearest_sqdist"},
              {"log_weights"});
  return DenoiserArgs<T>{ptr<const T>(d, "x"), ptr<const void>(d, "y"), row_type(d, "y_type"),
                         get<index_t>(d, "Q"), get<index_t>(d, "N"), get<index_t>(d, "D"),
                         ptr<const T>(d, "center"), ptr<const double>(d, "inv_sigma2"),
                         get<index_t>(d, "row_offset"), ptr<double>(d, "max_logit"),
                         ptr<double>(d, "max_logit_lo"), ptr<double>(d, "sum_exp"),
                         ptr<double>(d, "sum_exp_sq"), ptr<T>(d, "weighted_sum"),
                         ptr<index_t>(d, "nearest_index"), ptr<double>(d, "nearest_sqdist"),
                         d.contains("log_weights") ? ptr<const double>(d, "log_weights") : nullptr};
}

// The pruning fields of pruned_denoiser (PruneArgs), read with the GIL held.
struct PruneFields {
  std::uintptr_t active, tile_best, tile_second;
  index_t tile_rows;
};

inline PruneFields prune_fields(const py::dict& d) {
  expect_keys(d, "prune args", {"active", "tile_rows", "tile_best", "tile_second"});
  return PruneFields{get<std::uintptr_t>(d, "active"), get<std::uintptr_t>(d, "tile_best"),
                     get<std::uintptr_t>(d, "tile_second"), get<index_t>(d, "tile_rows")};
}

template <class T>
PruneArgs<T> prune_args(const PruneFields& f) {
  return PruneArgs<T>{reinterpret_cast<const std::uint8_t*>(f.active), f.tile_rows,
                      reinterpret_cast<T*>(f.tile_best), reinterpret_cast<T*>(f.tile_second)};
}

// Why the pruned CUDA kernel refuses a call (tile_rows no configuration fits), for the message;
// "" when the configuration is fine. resolved: the backend's pruned_*_config answer.
inline std::string pruned_refusal(const py::dict& d, const PruneFields& f, int config, int resolved) {
  if (resolved >= 0) return "";
  const index_t N = get<index_t>(d, "N");
  return "tile_rows=" + std::to_string(f.tile_rows) + " with N=" + std::to_string(N) +
         (config < 0 ? std::string(" fits no tile configuration")
                     : " does not fit tile configuration " + std::to_string(config)) +
         ": the CUDA kernel needs tile_rows to be a multiple of its row tile TN (32, 64, 8 for "
         "configurations 0, 1, 2) or >= N";
}

inline SearchArgs search_args(const py::dict& d) {
  expect_keys(d, "search args",
              {"queries", "refs", "refs_type", "Q", "N", "D", "k", "inner_product", "center",
               "row_offset", "values", "indices"});
  return SearchArgs{ptr<const float>(d, "queries"), ptr<const void>(d, "refs"),
                    row_type(d, "refs_type"), get<index_t>(d, "Q"), get<index_t>(d, "N"),
                    get<index_t>(d, "D"), get<int>(d, "k"), get<bool>(d, "inner_product"),
                    ptr<const float>(d, "center"), get<index_t>(d, "row_offset"),
                    ptr<float>(d, "values"), ptr<index_t>(d, "indices")};
}

// Parses the denoiser dict for its precision and calls run(DenoiserArgs<float or double>)
// without the GIL.
template <class Run>
Status run_denoiser(const py::dict& d, Run&& run) {
  if (get<bool>(d, "f64")) {
    const DenoiserArgs<double> a = denoiser_args<double>(d);
    py::gil_scoped_release release;
    return run(a);
  }
  const DenoiserArgs<float> a = denoiser_args<float>(d);
  py::gil_scoped_release release;
  return run(a);
}

template <class Run>
Status run_search(const py::dict& d, Run&& run) {
  const SearchArgs a = search_args(d);
  py::gil_scoped_release release;
  return run(a);
}

}  // namespace diffrepro::binding
