// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the three pybind11 modules: integer addresses to typed pointers, Status to
// RuntimeError, row-type validation.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "diffrepro/status.h"

namespace diffrepro::binding {

template <class T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Throws "diffrepro.<module>.<op>: <status message> (<detail>)" unless s is kOk.
inline void check(Status s, const char* module, const char* op, const char* detail = nullptr) {
  if (s == Status::kOk) return;
  std::string msg = std::string("diffrepro.") + module + "." + op + ": " + status_message(s);
  if (detail && *detail) msg += std::string(" (") + detail + ")";
  throw std::runtime_error(msg);
}

inline bool valid_row_type(int t) { return t >= 0 && t <= static_cast<int>(RowType::kFloat16); }

}  // namespace diffrepro::binding
