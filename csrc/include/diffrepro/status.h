// SPDX-License-Identifier: Apache-2.0
// Status codes returned by every C++ entry point (no exception ever crosses a kernel boundary).
#pragma once

namespace diffrepro {

enum class Status : int {
  kOk = 0,
  kInvalidArgument = 1,  // a size or scalar the Python layer should have rejected
  kOutOfMemory = 2,      // scratch allocation failed
  kCudaError = 3,        // a CUDA runtime call or launch failed (message from cudaGetErrorString)
  kUnsupported = 4,      // dtype/feature combination not compiled into this build
};

inline const char* status_message(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kOutOfMemory: return "out of memory";
    case Status::kCudaError: return "CUDA error";
    case Status::kUnsupported: return "unsupported dtype or feature in this build";
  }
  return "unknown status";
}

// Storage type of the training / reference rows. uint8 rows are image pixels decoded as
// u / 127.5 - 1 exactly as torch's `u.to(dtype) / 127.5 - 1` does (one division, one subtraction).
enum class RowType : int { kFloat32 = 0, kFloat64 = 1, kUInt8 = 2, kFloat16 = 3 };

}  // namespace diffrepro
