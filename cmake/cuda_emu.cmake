# SPDX-License-Identifier: Apache-2.0
# diffrepro._cuda_emu: the CUDA kernel sources compiled by the host C++20 compiler and run by the
# thread emulator of csrc/cuda/exec_ctx.cuh. Host-only (no CUDA toolkit needed); built when
# DIFFREPRO_CUDA_EMULATOR=ON, which CI sets so every kernel body is executed on every run.
find_package(Threads REQUIRED)

pybind11_add_module(_cuda_emu
  csrc/bindings/module_cuda_emu.cpp
  csrc/emu/empirical_denoiser_emu.cpp
  csrc/emu/nn_search_emu.cpp
  csrc/emu/blas_epilogue_emu.cpp)
target_compile_features(_cuda_emu PRIVATE cxx_std_20)  # std::barrier
target_link_libraries(_cuda_emu PRIVATE dr_math Threads::Threads)
target_compile_options(_cuda_emu PRIVATE -O2 -Wall -Wextra)
install(TARGETS _cuda_emu LIBRARY DESTINATION diffrepro)
