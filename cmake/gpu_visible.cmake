# SPDX-License-Identifier: Apache-2.0
# dr_gpu_visible(<var>): TRUE when this machine shows a CUDA GPU, FALSE otherwise.
# DIFFREPRO_CUDA=AUTO builds the CUDA module only then: nvcc takes minutes for the default
# architectures, and the module is useless without a GPU (DIFFREPRO_CUDA=ON builds it anyway,
# e.g. on a login node for GPU compute nodes). A GPU is visible when `nvidia-smi -L` lists one
# and CUDA_VISIBLE_DEVICES does not hide every device. Usable in script mode (cmake -P) too.
function(dr_gpu_visible out)
  set(visible FALSE)
  set(why "nvidia-smi was not found")
  if(DEFINED ENV{CUDA_VISIBLE_DEVICES} AND ("$ENV{CUDA_VISIBLE_DEVICES}" STREQUAL ""
                                           OR "$ENV{CUDA_VISIBLE_DEVICES}" STREQUAL "-1"))
    set(why "CUDA_VISIBLE_DEVICES='$ENV{CUDA_VISIBLE_DEVICES}' hides every GPU")
  else()
    find_program(_dr_nvidia_smi nvidia-smi NO_CACHE)
    if(_dr_nvidia_smi)
      execute_process(COMMAND "${_dr_nvidia_smi}" -L OUTPUT_VARIABLE listed RESULT_VARIABLE rc
                      ERROR_QUIET TIMEOUT 20)
      if(rc EQUAL 0 AND listed MATCHES "GPU [0-9]+:")
        set(visible TRUE)
        set(why "nvidia-smi -L lists a GPU")
      else()
        set(why "nvidia-smi -L lists no GPU")
      endif()
    endif()
  endif()
  set(${out} ${visible} PARENT_SCOPE)
  set(${out}_REASON "${why}" PARENT_SCOPE)
endfunction()

# Script mode: print the answer (tests/test_build.py).
if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  dr_gpu_visible(_dr_gpu)
  message(STATUS "gpu_visible=${_dr_gpu} (${_dr_gpu_REASON})")
endif()
