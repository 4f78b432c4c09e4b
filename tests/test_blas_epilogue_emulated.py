# SPDX-License-Identifier: Apache-2.0
"""The BLAS engine's CUDA epilogue kernels (csrc/cuda/blas_epilogue.cuh) run by the CPU emulator.

The kernel source is compiled by the host C++20 compiler (csrc/emu/blas_epilogue_emu.cpp: the
same .cuh nvcc compiles, through exec_ctx.cuh's emulator; taken from diffrepro._cuda_emu once
CMake builds it in, compiled here with g++ until then) and driven through ctypes on torch CPU
buffers by the BLAS engine's own chunk loop (diffrepro._blas_engine with ``kernels=``), with
torch.matmul for the GEMMs: exactly the code that drives cuBLAS and these kernels on a GPU.
Results are compared with the float64 oracles on real CIFAR rows under the tolerance and argmax
rules, and with the torch epilogue of the same engine.
"""
import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_f32_accuracy, assert_f64_accuracy, naive_float32_denoiser, near_tie_rows

from diffrepro import _blas_engine, ops, reference

REPO = Path(__file__).resolve().parents[1]
P = ctypes.c_void_p
I64 = ctypes.c_int64


def _built_module_lib():
    """The emulator module's own copy of the C entry points, once CMake builds
    csrc/emu/blas_epilogue_emu.cpp into diffrepro._cuda_emu (None before that)."""
    try:
        import diffrepro._cuda_emu as emu
    except ImportError:
        return None
    lib = ctypes.CDLL(emu.__file__)
    return lib if hasattr(lib, "dr_emu_softmax_chunk_f32") else None


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    built = _built_module_lib()
    if built is not None:
        return built
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build the emulated epilogue kernels")
    out = tmp_path_factory.mktemp("emu") / "libblas_epilogue_emu.so"
    subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Werror",
                    f"-I{REPO / 'csrc/include'}", f"-I{REPO / 'csrc/cuda'}",
                    str(REPO / "csrc/emu/blas_epilogue_emu.cpp"), "-o", str(out)], check=True, timeout=300)
    return ctypes.CDLL(str(out))


def ptr(t):
    return P(t.data_ptr())


class EmuModule:
    """The emulator's C entry points behind the interface diffrepro._cuda binds (one dict of
    integer addresses and sizes per call, stream last; a failed launch raises)."""

    def __init__(self, lib):
        self.lib = lib

    @staticmethod
    def _check(status, op):
        if status != 0:
            raise RuntimeError(f"{op}: status {status}")

    def blas_softmax_chunk(self, a, stream):
        fn = self.lib.dr_emu_softmax_chunk_f64 if a["f64"] else self.lib.dr_emu_softmax_chunk_f32
        self._check(fn(P(a["g"]), I64(a["ldg"]), I64(a["Q"]), I64(a["C"]), P(a["y_half"]), P(a["x_half"]),
                       P(a["inv_sigma2"]), P(a["x"]), P(a["rows"]), a["rows_type"], I64(a["D"]),
                       ctypes.c_double(a["unit_roundoff"]), I64(a["chunk_offset"]), P(a["max_score"]),
                       P(a["sum_exp"]), P(a["sum_exp_sq"]), P(a["scale_old"]), P(a["nearest_sqdist"]),
                       P(a["nearest_index"]), P(a["p"]), I64(a["ldp"])), "softmax_chunk")

    def blas_scale_accumulate(self, a, stream):
        fn = self.lib.dr_emu_scale_accumulate_f64 if a["f64"] else self.lib.dr_emu_scale_accumulate_f32
        self._check(fn(P(a["a"]), I64(a["lda"]), I64(a["Q"]), I64(a["D"]), P(a["scale_old"]), P(a["acc"])),
                    "scale_accumulate")

    def blas_chunk_topk(self, a, stream):
        self._check(self.lib.dr_emu_chunk_topk(P(a["scores"]), I64(a["lds"]), I64(a["Q"]), I64(a["C"]), a["k"],
                                               a["largest"], I64(a["chunk_offset"]), P(a["values"]),
                                               P(a["indices"])), "chunk_topk")

    def blas_merge_topk(self, a, stream):
        self._check(self.lib.dr_emu_merge_topk(I64(a["Q"]), a["k"], a["largest"], P(a["run_v"]), P(a["run_i"]),
                                               P(a["chunk_v"]), P(a["chunk_i"]), P(a["out_v"]), P(a["out_i"])),
                    "merge_topk")


@pytest.fixture(scope="module")
def kernels(lib):
    return _blas_engine.EpilogueKernels(EmuModule(lib))


def emulated_denoiser(kernels, x, y, inv, center, chunk):
    return ops.DenoiserState(**_blas_engine.denoiser_state(x, y, inv, center, chunk=chunk, kernels=kernels))


def decoded(u8, n, d=None):
    y = torch.from_numpy(u8[:n]).reshape(n, -1).float() / 127.5 - 1
    return y if d is None else y[:, :d].contiguous()


@pytest.mark.parametrize("sigma,chunk", [(1e-3, 37), (0.3, 300), (5.0, 255), (80.0, 100)])
def test_denoiser_epilogue_matches_oracle(kernels, cifar_subset, sigma, chunk):
    # D = 300 keeps the emulator (one OS thread per CUDA thread) quick; C = 37, 100, 255 and 300 reach
    # chunks shorter than, just under and over the 256-thread block.
    y = decoded(cifar_subset, 300, 300)
    g = torch.Generator().manual_seed(0)
    x = y[[0, 150, 299]] + min(sigma, 1.0) * torch.randn(3, 300, generator=g)
    inv = torch.full((3,), sigma**-2, dtype=torch.float64)
    center = ops._center(y, torch.float32)
    st = emulated_denoiser(kernels, x, y, inv, center, chunk)
    out, info = ops.finalize(st)
    assert_f32_accuracy(out, reference.empirical_denoiser_reference(x, y, sigma), naive_float32_denoiser(x, y, sigma))
    ref = reference.empirical_denoiser_info_reference(x, y, sigma)
    assert torch.equal(info["nearest_index"], ref["nearest_index"])
    assert torch.allclose(info["nearest_sqdist"], ref["nearest_sqdist"], rtol=1e-12, atol=0)
    # Same state as the torch BLAS engine up to float32 rounding of the weights.
    torch_st = ops.DenoiserState(**_blas_engine.denoiser_state(x, y, inv, center, chunk=chunk))
    torch_out, torch_info = ops.finalize(torch_st)
    assert float((out - torch_out).abs().max()) <= 1e-6
    assert torch.equal(info["nearest_index"], torch_info["nearest_index"])
    assert torch.allclose(st.max_logit, torch_st.max_logit, rtol=1e-12, atol=0)


def test_denoiser_epilogue_float64_and_uint8_rows(kernels, cifar_subset):
    u8 = torch.from_numpy(cifar_subset[:90]).reshape(90, -1)[:, :200].contiguous()
    y = u8.double() / 127.5 - 1
    x = y[[3, 40]] + 0.2 * torch.randn(2, 200, dtype=torch.float64)
    inv = torch.full((2,), 0.2**-2, dtype=torch.float64)
    center = ops._center(u8, torch.float64)
    out, info = ops.finalize(emulated_denoiser(kernels, x, u8, inv, center, 40))
    assert_f64_accuracy(out, reference.empirical_denoiser_reference(x, y, 0.2))
    assert info["nearest_index"].tolist() == [3, 40]


def test_nearest_row_duplicates_keep_the_lowest_index(kernels, cifar_subset):
    base = decoded(cifar_subset, 20, 64)
    y = torch.cat([base, base[[7, 7]]])  # rows 20, 21 duplicate row 7
    x = base[[7]].clone()
    inv = torch.full((1,), 1e6, dtype=torch.float64)
    for chunk in (1, 7, 8, 21, 22):
        _, info = ops.finalize(emulated_denoiser(kernels, x, y, inv, ops._center(y, torch.float32), chunk))
        assert info["nearest_index"].tolist() == [7] and info["nearest_sqdist"].tolist() == [0.0], chunk


def test_nearest_row_float32_near_ties_ranked_in_float64(kernels, cifar_subset):
    """Rows whose float32 scores tie are ranked by float64 distance, as in the fused kernels."""
    x, y, want = near_tie_rows(cifar_subset, 300, 256)
    inv = torch.full((len(want),), 4.0, dtype=torch.float64)
    for chunk in (64, 131, 300):
        _, info = ops.finalize(emulated_denoiser(kernels, x, y, inv, ops._center(y, torch.float32), chunk))
        assert info["nearest_index"].tolist() == want, chunk


@pytest.mark.parametrize("k", [1, 10, 16, 17, 128])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_epilogue_matches_oracle(kernels, cifar_subset, k, largest):
    r = torch.nn.functional.normalize(decoded(cifar_subset, 400, 64), dim=1)
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(r[[5, 200]] + 0.1 * torch.randn(2, 64, generator=g), dim=1)
    metric = "ip" if largest else "l2"  # l2: the expanded centred scores, then float64 distances
    v, i = _blas_engine.search_state(q, r, k, metric, chunk=70, kernels=kernels)  # 70 > 32 threads, ragged end
    scores = q.double() @ r.double().T if largest else ((q.double()[:, None] - r.double()[None]) ** 2).sum(-1)
    ref = scores.topk(k, 1, largest=largest)
    naive = (q @ r.T if largest else ((q[:, None] - r[None]) ** 2).sum(-1)).topk(k, 1, largest=largest).values
    assert_f32_accuracy(v, ref.values, naive)
    assert float((scores.gather(1, i) - v.double()).abs().max()) <= 1e-6  # each index carries its score
    gaps = (ref.values[:, 1:] - ref.values[:, :-1]).abs()
    sep = torch.cat([gaps, torch.full((2, 1), np.inf, dtype=gaps.dtype)], 1).minimum(
        torch.cat([torch.full((2, 1), np.inf, dtype=gaps.dtype), gaps], 1)) > 1e-5
    assert torch.equal(i[sep], ref.indices[sep])


def test_topk_ties_padding_and_k_above_chunk(kernels):
    r = torch.tensor([[1.0], [2.0], [2.0], [0.5], [2.0]])  # score 2 at rows 1, 2, 4
    q = torch.tensor([[1.0]])
    for chunk in (1, 2, 3, 5):
        v, i = _blas_engine.search_state(q, r, 4, "ip", chunk=chunk, kernels=kernels)
        assert i.tolist() == [[1, 2, 4, 0]] and v.tolist() == [[2.0, 2.0, 2.0, 1.0]], chunk
    v, i = _blas_engine.search_state(q, r[:2], 4, "l2", chunk=2, kernels=kernels)  # k > N: padded
    assert i.tolist() == [[0, 1, -1, -1]] and v[0, 2:].tolist() == [np.inf, np.inf]


def test_launchers_reject_bad_sizes(lib):
    z = torch.zeros(4)
    zi = torch.zeros(4, dtype=torch.int64)
    assert lib.dr_emu_chunk_topk(ptr(z), I64(1), I64(1), I64(2), 1, True, I64(0), ptr(z), ptr(zi)) == 1  # lds < C
    assert lib.dr_emu_chunk_topk(ptr(z), I64(4), I64(1), I64(4), 129, True, I64(0), ptr(z), ptr(zi)) == 1  # k > 128
    assert lib.dr_emu_scale_accumulate_f32(ptr(z), I64(4), I64(70_000), I64(4), ptr(z), ptr(z)) == 1  # gridDim.y
    zd = torch.zeros(4, dtype=torch.float64)
    for C, unit in ((0, 1e-7), (4, -1.0)):  # an empty chunk; a negative unit roundoff
        assert lib.dr_emu_softmax_chunk_f32(ptr(z), I64(4), I64(1), I64(C), ptr(zd), ptr(zd), ptr(zd), ptr(z), ptr(z),
                                            0, I64(1), ctypes.c_double(unit), I64(0), ptr(zd), ptr(zd), ptr(zd),
                                            ptr(zd), ptr(zd), ptr(zi), ptr(z), I64(4)) == 1
