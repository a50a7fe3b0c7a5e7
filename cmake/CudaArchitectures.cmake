# bct_fast_resolve_native_archs(<var>): when <var> holds `native`, replace it with the visible
# GPUs' explicit architectures ("90-real", ...) read from nvidia-smi, or stop with a clear
# message. `native` would otherwise be recorded literally, and build_info could not say what
# the kernels were compiled for. Works in script mode too (tests/build/test_cuda_archs.py).
function(bct_fast_resolve_native_archs var)
  if(NOT "${${var}}" MATCHES "native")
    return()
  endif()
  execute_process(COMMAND nvidia-smi --query-gpu=compute_cap --format=csv,noheader
                  OUTPUT_VARIABLE _caps RESULT_VARIABLE _rc ERROR_QUIET
                  OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0 OR _caps STREQUAL "")
    message(FATAL_ERROR "CUDA architectures 'native' requested but no GPU is visible to nvidia-smi; "
                        "set CUDAARCHS to an explicit list such as 90a-real")
  endif()
  string(REPLACE "." "" _caps "${_caps}")
  string(REPLACE "\n" ";" _caps "${_caps}")
  list(TRANSFORM _caps STRIP)
  list(REMOVE_DUPLICATES _caps)
  list(TRANSFORM _caps APPEND "-real")
  message(STATUS "bct_fast: CUDA architectures 'native' resolved to ${_caps}")
  set(${var} "${_caps}" PARENT_SCOPE)
endfunction()
