// SPDX-License-Identifier: Apache-2.0
// pybind11 definitions of the BLAS engine's epilogue kernels for diffrepro._cuda
// (csrc/cuda/blas_epilogue_cuda.cu): integer addresses and the stream handle in, RuntimeError on
// a failed launch, GIL released around each launch. Argument order = the C++ launchers'.
// diffrepro._blas_engine.EpilogueKernels calls these; module_cuda.cpp adds them with
// add_blas_epilogue(m).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "binding_util.h"
#include "diffrepro/api_blas_epilogue.h"
#include "diffrepro/api_cuda.h"

namespace diffrepro::binding {

inline void check_epilogue(Status s, const char* op) {
  check(s, "_cuda", op, s == Status::kCudaError ? cuda_last_error_message() : nullptr);
}

inline void add_blas_epilogue(pybind11::module_& m) {
  namespace py = pybind11;
  using namespace pybind11::literals;
  using U = std::uintptr_t;
  m.def(
      "blas_softmax_chunk",
      [](bool f64, U g, index_t ldg, index_t Q, index_t C, U y_half, U x_half, U inv_sigma2, U x, U rows,
         int rows_type, index_t D, double unit_roundoff, index_t chunk_offset, U max_logit, U sum_exp,
         U sum_exp_sq, U scale_old, U nearest_sqdist, U nearest_index, U p, index_t ldp, U stream) {
        if (!valid_row_type(rows_type)) check_epilogue(Status::kInvalidArgument, "blas_softmax_chunk");
        Status s;
        {
          py::gil_scoped_release release;
          if (f64)
            s = blas_softmax_chunk_cuda(
                ptr<const double>(g), ldg, Q, C, ptr<const double>(y_half), ptr<const double>(x_half),
                ptr<const double>(inv_sigma2), ptr<const double>(x), ptr<const void>(rows),
                static_cast<RowType>(rows_type), D, unit_roundoff, chunk_offset, ptr<double>(max_logit),
                ptr<double>(sum_exp), ptr<double>(sum_exp_sq), ptr<double>(scale_old), ptr<double>(nearest_sqdist),
                ptr<index_t>(nearest_index), ptr<double>(p), ldp, ptr<void>(stream));
          else
            s = blas_softmax_chunk_cuda(
                ptr<const float>(g), ldg, Q, C, ptr<const double>(y_half), ptr<const double>(x_half),
                ptr<const double>(inv_sigma2), ptr<const float>(x), ptr<const void>(rows),
                static_cast<RowType>(rows_type), D, unit_roundoff, chunk_offset, ptr<double>(max_logit),
                ptr<double>(sum_exp), ptr<double>(sum_exp_sq), ptr<double>(scale_old), ptr<double>(nearest_sqdist),
                ptr<index_t>(nearest_index), ptr<float>(p), ldp, ptr<void>(stream));
        }
        check_epilogue(s, "blas_softmax_chunk");
      },
      "f64"_a, "g"_a, "ldg"_a, "Q"_a, "C"_a, "y_half"_a, "x_half"_a, "inv_sigma2"_a, "x"_a, "rows"_a, "rows_type"_a,
      "D"_a, "unit_roundoff"_a, "chunk_offset"_a, "max_logit"_a, "sum_exp"_a, "sum_exp_sq"_a, "scale_old"_a,
      "nearest_sqdist"_a, "nearest_index"_a, "p"_a, "ldp"_a, "stream"_a);
  m.def(
      "blas_scale_accumulate",
      [](bool f64, U a, index_t lda, index_t Q, index_t D, U scale_old, U acc, U stream) {
        Status s;
        {
          py::gil_scoped_release release;
          s = f64 ? blas_scale_accumulate_cuda(ptr<const double>(a), lda, Q, D, ptr<const double>(scale_old),
                                               ptr<double>(acc), ptr<void>(stream))
                  : blas_scale_accumulate_cuda(ptr<const float>(a), lda, Q, D, ptr<const double>(scale_old),
                                               ptr<double>(acc), ptr<void>(stream));
        }
        check_epilogue(s, "blas_scale_accumulate");
      },
      "f64"_a, "a"_a, "lda"_a, "Q"_a, "D"_a, "scale_old"_a, "acc"_a, "stream"_a);
  m.def(
      "blas_chunk_topk",
      [](U scores, index_t lds, index_t Q, index_t C, int k, bool largest, index_t chunk_offset, U values,
         U indices, U stream) {
        Status s;
        {
          py::gil_scoped_release release;
          s = blas_chunk_topk_cuda(ptr<const float>(scores), lds, Q, C, k, largest, chunk_offset, ptr<float>(values),
                                   ptr<index_t>(indices), ptr<void>(stream));
        }
        check_epilogue(s, "blas_chunk_topk");
      },
      "scores"_a, "lds"_a, "Q"_a, "C"_a, "k"_a, "largest"_a, "chunk_offset"_a, "values"_a, "indices"_a, "stream"_a);
  m.def(
      "blas_merge_topk",
      [](index_t Q, int k, bool largest, U run_v, U run_i, U chunk_v, U chunk_i, U out_v, U out_i, U stream) {
        Status s;
        {
          py::gil_scoped_release release;
          s = blas_merge_topk_cuda(Q, k, largest, ptr<const float>(run_v), ptr<const index_t>(run_i),
                                   ptr<const float>(chunk_v), ptr<const index_t>(chunk_i), ptr<float>(out_v),
                                   ptr<index_t>(out_i), ptr<void>(stream));
        }
        check_epilogue(s, "blas_merge_topk");
      },
      "Q"_a, "k"_a, "largest"_a, "run_v"_a, "run_i"_a, "chunk_v"_a, "chunk_i"_a, "out_v"_a, "out_i"_a, "stream"_a);
  m.attr("blas_topk_max_k") = kBlasTopkMaxK;
}

}  // namespace diffrepro::binding
