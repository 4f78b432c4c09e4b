// SPDX-License-Identifier: Apache-2.0
// pybind11 definitions of the BLAS engine's epilogue kernels for diffrepro._cuda
// (csrc/cuda/blas_epilogue_cuda.cu). Like the ops, each takes one dict of integer addresses and
// sizes (built by diffrepro._blas_engine.EpilogueKernels) and the stream handle; a missing or
// extra field is a ValueError naming it, a failed launch a RuntimeError; the GIL is released
// around each launch. module_cuda.cpp adds them with add_blas_epilogue(m).
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

// The softmax_chunk dict, parsed with the GIL held (pointers kept as addresses until the dtype
// is known).
struct SoftmaxChunkFields {
  std::uintptr_t g, y_half, x_half, inv_sigma2, x, rows, max_score, sum_exp, sum_exp_sq, scale_old,
      nearest_sqdist, nearest_index, p;
  index_t ldg, Q, C, D, chunk_offset, ldp;
  RowType rows_type;
  double unit_roundoff;
};

inline SoftmaxChunkFields softmax_chunk_fields(const py::dict& d) {
  expect_keys(d, "softmax_chunk args",
              {"f64", "g", "ldg", "Q", "C", "y_half", "x_half", "inv_sigma2", "x", "rows", "rows_type", "D",
               "unit_roundoff", "chunk_offset", "max_score", "sum_exp", "sum_exp_sq", "scale_old", "nearest_sqdist",
               "nearest_index", "p", "ldp"});
  auto u = [&](const char* k) { return get<std::uintptr_t>(d, k); };
  auto i = [&](const char* k) { return get<index_t>(d, k); };
  return SoftmaxChunkFields{u("g"), u("y_half"), u("x_half"), u("inv_sigma2"), u("x"), u("rows"), u("max_score"),
                            u("sum_exp"), u("sum_exp_sq"), u("scale_old"), u("nearest_sqdist"), u("nearest_index"),
                            u("p"), i("ldg"), i("Q"), i("C"), i("D"), i("chunk_offset"), i("ldp"),
                            row_type(d, "rows_type"), get<double>(d, "unit_roundoff")};
}

template <class T>
Status softmax_chunk_run(const SoftmaxChunkFields& f, void* stream) {
  auto as = [](std::uintptr_t a) { return reinterpret_cast<void*>(a); };
  return blas_softmax_chunk_cuda(
      static_cast<const T*>(as(f.g)), f.ldg, f.Q, f.C, static_cast<const double*>(as(f.y_half)),
      static_cast<const double*>(as(f.x_half)), static_cast<const double*>(as(f.inv_sigma2)),
      static_cast<const T*>(as(f.x)), as(f.rows), f.rows_type, f.D, f.unit_roundoff, f.chunk_offset,
      static_cast<double*>(as(f.max_score)), static_cast<double*>(as(f.sum_exp)),
      static_cast<double*>(as(f.sum_exp_sq)), static_cast<double*>(as(f.scale_old)),
      static_cast<double*>(as(f.nearest_sqdist)), static_cast<index_t*>(as(f.nearest_index)),
      static_cast<T*>(as(f.p)), f.ldp, stream);
}

inline void add_blas_epilogue(py::module_& m) {
  using namespace pybind11::literals;
  m.def(
      "blas_softmax_chunk",
      [](const py::dict& d, std::uintptr_t stream) {
        const SoftmaxChunkFields f = softmax_chunk_fields(d);
        const bool f64 = get<bool>(d, "f64");
        void* st = reinterpret_cast<void*>(stream);
        Status s;
        {
          py::gil_scoped_release release;
          s = f64 ? softmax_chunk_run<double>(f, st) : softmax_chunk_run<float>(f, st);
        }
        check_epilogue(s, "blas_softmax_chunk");
      },
      "args"_a, "stream"_a);
  m.def(
      "blas_scale_accumulate",
      [](const py::dict& d, std::uintptr_t stream) {
        expect_keys(d, "scale_accumulate args", {"f64", "a", "lda", "Q", "D", "scale_old", "acc"});
        const index_t lda = get<index_t>(d, "lda"), Q = get<index_t>(d, "Q"), D = get<index_t>(d, "D");
        const double* scale = ptr<const double>(d, "scale_old");
        double* acc = ptr<double>(d, "acc");
        const bool f64 = get<bool>(d, "f64");
        const std::uintptr_t a = get<std::uintptr_t>(d, "a");
        void* st = reinterpret_cast<void*>(stream);
        Status s;
        {
          py::gil_scoped_release release;
          s = f64 ? blas_scale_accumulate_cuda(reinterpret_cast<const double*>(a), lda, Q, D, scale, acc, st)
                  : blas_scale_accumulate_cuda(reinterpret_cast<const float*>(a), lda, Q, D, scale, acc, st);
        }
        check_epilogue(s, "blas_scale_accumulate");
      },
      "args"_a, "stream"_a);
  m.def(
      "blas_chunk_topk",
      [](const py::dict& d, std::uintptr_t stream) {
        expect_keys(d, "chunk_topk args", {"scores", "lds", "Q", "C", "k", "largest", "chunk_offset", "values",
                                           "indices"});
        const float* scores = ptr<const float>(d, "scores");
        const index_t lds = get<index_t>(d, "lds"), Q = get<index_t>(d, "Q"), C = get<index_t>(d, "C");
        const int k = get<int>(d, "k");
        const bool largest = get<bool>(d, "largest");
        const index_t offset = get<index_t>(d, "chunk_offset");
        float* values = ptr<float>(d, "values");
        index_t* indices = ptr<index_t>(d, "indices");
        Status s;
        {
          py::gil_scoped_release release;
          s = blas_chunk_topk_cuda(scores, lds, Q, C, k, largest, offset, values, indices,
                                   reinterpret_cast<void*>(stream));
        }
        check_epilogue(s, "blas_chunk_topk");
      },
      "args"_a, "stream"_a);
  m.def(
      "blas_merge_topk",
      [](const py::dict& d, std::uintptr_t stream) {
        expect_keys(d, "merge_topk args", {"Q", "k", "largest", "run_v", "run_i", "chunk_v", "chunk_i", "out_v",
                                           "out_i"});
        const index_t Q = get<index_t>(d, "Q");
        const int k = get<int>(d, "k");
        const bool largest = get<bool>(d, "largest");
        const float* run_v = ptr<const float>(d, "run_v");
        const index_t* run_i = ptr<const index_t>(d, "run_i");
        const float* chunk_v = ptr<const float>(d, "chunk_v");
        const index_t* chunk_i = ptr<const index_t>(d, "chunk_i");
        float* out_v = ptr<float>(d, "out_v");
        index_t* out_i = ptr<index_t>(d, "out_i");
        Status s;
        {
          py::gil_scoped_release release;
          s = blas_merge_topk_cuda(Q, k, largest, run_v, run_i, chunk_v, chunk_i, out_v, out_i,
                                   reinterpret_cast<void*>(stream));
        }
        check_epilogue(s, "blas_merge_topk");
      },
      "args"_a, "stream"_a);
  m.attr("blas_topk_max_k") = kBlasTopkMaxK;
}

}  // namespace diffrepro::binding
