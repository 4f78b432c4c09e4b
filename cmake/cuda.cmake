# SPDX-License-Identifier: Apache-2.0
# The optional diffrepro._cuda module. Included by CMakeLists.txt after enable_language(CUDA).
# Kernels are compiled by nvcc into a static library; the pybind11 binding is plain host C++.
# The only CUDA library linked is the static runtime, so the module imports on a machine
# without a driver (runtime_info() then reports 0 devices and cudaErrorInsufficientDriver).
find_package(CUDAToolkit REQUIRED)

# CMAKE_CUDA_ARCHITECTURES defaults to sm_75..sm_120 (set in CMakeLists.txt before
# enable_language, which would otherwise pick the compiler's own default).
string(REPLACE ";" "," _dr_cuda_archs "${CMAKE_CUDA_ARCHITECTURES}")
message(STATUS "diffrepro: building _cuda for CUDA architectures ${_dr_cuda_archs}")

add_library(dr_cuda_kernels STATIC
  csrc/cuda/empirical_denoiser_cuda.cu
  csrc/cuda/nn_search_cuda.cu
  csrc/cuda/blas_epilogue_cuda.cu)
set_target_properties(dr_cuda_kernels PROPERTIES
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  POSITION_INDEPENDENT_CODE ON
  CUDA_VISIBILITY_PRESET hidden
  CUDA_SEPARABLE_COMPILATION OFF
  CUDA_RUNTIME_LIBRARY Static)
target_link_libraries(dr_cuda_kernels PUBLIC dr_math CUDA::cudart_static)
target_compile_options(dr_cuda_kernels PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-O3 -Xcompiler=-Wall,-Wextra>)

pybind11_add_module(_cuda csrc/bindings/module_cuda.cpp)
target_link_libraries(_cuda PRIVATE dr_cuda_kernels dr_math CUDA::cudart_static)
target_compile_definitions(_cuda PRIVATE DR_CUDA_ARCHS="${_dr_cuda_archs}")
target_compile_options(_cuda PRIVATE -O3 -Wall -Wextra)
install(TARGETS _cuda LIBRARY DESTINATION diffrepro)
