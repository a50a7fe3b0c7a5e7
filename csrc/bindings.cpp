// The one Python binding of bct_fast (module bct_fast._C). It knows nothing of torch: tensors
// arrive as integer device addresses (data_ptr()), sizes, a dtype code and the raw CUDA stream
// handle, already validated by the Python op layer.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "bct_fast/common.h"
#include "bct_fast/topk_select_cpu.h"

#ifdef BCT_FAST_WITH_CUDA
#include "bct_fast/cosine_topk.h"
#include "bct_fast/margin_epilogue.h"
#include "bct_fast/margin_fused.h"
#include "bct_fast/topk_epilogue.h"
#include "bct_fast/topk_fused.h"
#include "bct_fast/margin_softmax.h"
#include "bct_fast/runtime_info.h"
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void raise_if_error(const bct_fast::Status& status) {
  if (!status.ok()) throw std::runtime_error(status.error);
}

py::dict build_info() {
  py::dict info;
  info["version"] = BCT_FAST_VERSION;
#ifdef BCT_FAST_WITH_CUDA
  info["cuda_compiled"] = true;
  info["cuda_compiler_version"] = BCT_FAST_CUDA_COMPILER_VERSION;
  info["cuda_architectures"] = BCT_FAST_CUDA_ARCHS;
#else
  info["cuda_compiled"] = false;
  info["cuda_compiler_version"] = py::none();
  info["cuda_architectures"] = py::none();
#endif
  // sha256 of each kernel family's sources (CMakeLists.txt): ties a GPU run's record to a build.
  py::dict sources;
#ifdef BCT_FAST_WITH_CUDA
  sources["margin_softmax"] = BCT_FAST_HASH_MARGIN_SOFTMAX;
  sources["margin_epilogue"] = BCT_FAST_HASH_MARGIN_EPILOGUE;
  sources["margin_fused"] = BCT_FAST_HASH_MARGIN_FUSED;
  sources["cosine_topk"] = BCT_FAST_HASH_COSINE_TOPK;
  sources["topk_epilogue"] = BCT_FAST_HASH_TOPK_EPILOGUE;
  sources["topk_fused"] = BCT_FAST_HASH_TOPK_FUSED;
#endif
  info["kernel_sources"] = sources;
  return info;
}

py::dict runtime_info() {
  py::dict info;
#ifdef BCT_FAST_WITH_CUDA
  bct_fast::RuntimeInfo r = bct_fast::query_runtime_info();
  info["driver_version"] = r.driver_version;
  info["runtime_version"] = r.runtime_version;
  info["device_count"] = r.device_count;
  info["note"] = r.note;
#else
  info["driver_version"] = 0;
  info["runtime_version"] = 0;
  info["device_count"] = 0;
  info["note"] = "bct_fast was built without CUDA";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bct_fast native kernels (raw-pointer interface; no libtorch)";
  m.def("build_info", &build_info, "Compile-time facts: CUDA compiled, nvcc version, architectures");
  m.def("runtime_info", &runtime_info, "Run-time facts: driver version, visible CUDA devices");

  // CPU running top-k (built with or without CUDA): fp32 score blocks by address and strides.
  m.def("cpu_scan_kernel", &bct_fast::cpu_scan_kernel,
        "the CPU selector's row scan: avx512, avx2 or portable (BCT_FAST_CPU_SCAN narrows it)");
  m.def("cpu_thread_pool", &bct_fast::cpu_thread_pool,
        "where the CPU selector's threads come from: openmp (torch's pool) or std::thread");
  py::class_<bct_fast::TopkSelector>(m, "TopkSelector")
      .def(py::init<int64_t, int64_t>(), py::arg("queries"), py::arg("k"))
      .def(
          "add_block",
          [](bct_fast::TopkSelector& self, std::uintptr_t scores, int64_t n, int64_t q_stride,
             int64_t col_stride, int64_t n0, int threads) {
            self.add_block(ptr<const float>(scores), n, q_stride, col_stride, n0, threads);
          },
          py::call_guard<py::gil_scoped_release>())
      .def(
          "finish",
          [](const bct_fast::TopkSelector& self, std::uintptr_t out_scores, std::uintptr_t out_index,
             int threads) { self.finish(ptr<float>(out_scores), ptr<int64_t>(out_index), threads); },
          py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("queries", &bct_fast::TopkSelector::queries)
      .def_property_readonly("k", &bct_fast::TopkSelector::k);

#ifdef BCT_FAST_WITH_CUDA
  m.def(
      "margin_softmax_stats",
      [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t inv_nx, std::uintptr_t inv_nw,
         std::uintptr_t labels, int64_t B, int64_t C, int64_t d,
         int dtype, float scale, int splits, std::uintptr_t m_out, std::uintptr_t l_out,
         std::uintptr_t acc_out, std::uintptr_t stream) {
        raise_if_error(bct_fast::margin_softmax_stats(
            ptr<const void>(x), ptr<const void>(w), ptr<const float>(inv_nx),
            ptr<const float>(inv_nw), ptr<const int64_t>(labels), B, C, d,
            static_cast<bct_fast::DType>(dtype), scale, splits, ptr<float>(m_out),
            ptr<float>(l_out), ptr<float>(acc_out), ptr<void>(stream)));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "margin_softmax_grad_weight",
      [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t inv_nx, std::uintptr_t inv_nw,
         std::uintptr_t labels, std::uintptr_t lse,
         std::uintptr_t row_coef, int64_t B, int64_t C, int64_t d, int dtype, float scale,
         std::uintptr_t out, std::uintptr_t stream) {
        raise_if_error(bct_fast::margin_softmax_grad_weight(
            ptr<const void>(x), ptr<const void>(w), ptr<const float>(inv_nx),
            ptr<const float>(inv_nw), ptr<const int64_t>(labels), ptr<const float>(lse),
            ptr<const float>(row_coef), B, C, d,
            static_cast<bct_fast::DType>(dtype), scale, ptr<float>(out), ptr<void>(stream)));
      },
      py::call_guard<py::gil_scoped_release>());
  // Epilogue provider: the caller's GEMM wrote the fp32 score block; see margin_epilogue.h.
  m.def(
      "margin_epilogue_stats",
      [](std::uintptr_t scores, int64_t B, int64_t cols, std::uintptr_t inv_nx,
         std::uintptr_t inv_nw, std::uintptr_t labels, int64_t c0,
         float scale, std::uintptr_t m_io, std::uintptr_t l_io, std::uintptr_t e_out,
         int e_dtype, std::uintptr_t alpha_out, std::uintptr_t stream) {
        raise_if_error(bct_fast::margin_epilogue_stats(
            ptr<const float>(scores), B, cols, ptr<const float>(inv_nx), ptr<const float>(inv_nw),
            ptr<const int64_t>(labels), c0, scale,
            ptr<float>(m_io), ptr<float>(l_io), ptr<void>(e_out),
            static_cast<bct_fast::DType>(e_dtype), ptr<float>(alpha_out), ptr<void>(stream)));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "margin_epilogue_grads",
      [](std::uintptr_t scores, int64_t B, int64_t cols, std::uintptr_t inv_nx,
         std::uintptr_t inv_nw, std::uintptr_t labels, int64_t c0,
         float scale, std::uintptr_t lse, std::uintptr_t row_coef, std::uintptr_t p_out,
         std::uintptr_t pw_out, int out_dtype, std::uintptr_t stream) {
        raise_if_error(bct_fast::margin_epilogue_grads(
            ptr<const float>(scores), B, cols, ptr<const float>(inv_nx), ptr<const float>(inv_nw),
            ptr<const int64_t>(labels), c0, scale,
            ptr<const float>(lse), ptr<const float>(row_coef), ptr<void>(p_out), ptr<void>(pw_out),
            static_cast<bct_fast::DType>(out_dtype), ptr<void>(stream)));
      },
      py::call_guard<py::gil_scoped_release>());
  // Top-k epilogue provider: the caller's GEMM wrote the fp32 score block; see topk_epilogue.h.
  m.attr("topk_epilogue_max_k") = bct_fast::kTopkEpilogueMaxK;
  m.def(
      "topk_epilogue_select",
      [](std::uintptr_t scores, int64_t rows, int64_t cols, std::uintptr_t inv_nq,
         std::uintptr_t inv_ng, int k, int64_t n0, bool exclude, int64_t self_col0,
         std::uintptr_t run_s, std::uintptr_t run_i, std::uintptr_t nonfinite,
         std::uintptr_t stream) {
        raise_if_error(bct_fast::topk_epilogue_select(
            ptr<const float>(scores), rows, cols, ptr<const float>(inv_nq),
            ptr<const float>(inv_ng), k, n0, exclude, self_col0, ptr<float>(run_s),
            ptr<int64_t>(run_i), ptr<int>(nonfinite), ptr<void>(stream)));
      },
      py::call_guard<py::gil_scoped_release>());
  m.attr("topk_max_k") = bct_fast::kTopkMaxK;
  m.def(
      "cosine_topk_partial",
      [](std::uintptr_t q, std::uintptr_t g, std::uintptr_t inv_nq, std::uintptr_t inv_ng,
         int64_t Q, int64_t N, int64_t d, int q_dtype, int g_dtype, int k, int splits,
         bool exclude, int64_t exclude_offset, std::uintptr_t out_scores, std::uintptr_t out_idx,
         std::uintptr_t nonfinite, std::uintptr_t stream) {
        raise_if_error(bct_fast::cosine_topk_partial(
            ptr<const void>(q), ptr<const void>(g), ptr<const float>(inv_nq),
            ptr<const float>(inv_ng), Q, N, d, static_cast<bct_fast::DType>(q_dtype),
            static_cast<bct_fast::DType>(g_dtype), k, splits, exclude, exclude_offset,
            ptr<float>(out_scores), ptr<int64_t>(out_idx), ptr<int>(nonfinite),
            ptr<void>(stream)));
      },
      py::call_guard<py::gil_scoped_release>());
  // Fused provider (tensor cores, forward statistics only); see margin_fused.h.
  m.def(
      "margin_fused_lse",
      [](std::uintptr_t x, std::uintptr_t w, int dtype, int64_t B, int64_t C, int64_t d,
         std::uintptr_t inv_nx, std::uintptr_t inv_nw, std::uintptr_t labels,
         float scale, int64_t splits, std::uintptr_t workspace,
         int64_t workspace_floats, std::uintptr_t lse, std::uintptr_t stream) {
        raise_if_error(bct_fast::margin_fused_lse(
            ptr<const void>(x), ptr<const void>(w), static_cast<bct_fast::DType>(dtype), B, C, d,
            ptr<const float>(inv_nx), ptr<const float>(inv_nw), ptr<const int64_t>(labels),
            scale, splits, ptr<float>(workspace), workspace_floats,
            ptr<double>(lse), ptr<void>(stream)));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("margin_fused_default_splits", &bct_fast::margin_fused_default_splits);
  m.def("margin_fused_workspace_floats", &bct_fast::margin_fused_workspace_floats);
  m.def(
      "margin_fused_mma_tile_check",
      [](std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t d, std::uintptr_t stream) {
        raise_if_error(bct_fast::margin_fused_mma_tile_check(ptr<const void>(a), ptr<const void>(b),
                                                             ptr<const float>(c), ptr<float>(d),
                                                             ptr<void>(stream)));
      },
      py::call_guard<py::gil_scoped_release>());
  // lse AND pws (the frozen classifier's forward) in one tensor-core kernel; see margin_fused.h.
  m.attr("margin_fused_pws_max_d") = bct_fast::kMarginFusedPwsMaxD;
  m.def(
      "margin_fused_lse_pws",
      [](std::uintptr_t x, std::uintptr_t w, int dtype, int64_t B, int64_t C, int64_t d,
         std::uintptr_t inv_nx, std::uintptr_t inv_nw, std::uintptr_t labels,
         float scale, int64_t splits, std::uintptr_t workspace,
         int64_t workspace_floats, std::uintptr_t lse, std::uintptr_t pws, std::uintptr_t stream) {
        raise_if_error(bct_fast::margin_fused_lse_pws(
            ptr<const void>(x), ptr<const void>(w), static_cast<bct_fast::DType>(dtype), B, C, d,
            ptr<const float>(inv_nx), ptr<const float>(inv_nw), ptr<const int64_t>(labels),
            scale, splits, ptr<float>(workspace), workspace_floats,
            ptr<double>(lse), ptr<float>(pws), ptr<void>(stream)));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("margin_fused_pws_default_splits", &bct_fast::margin_fused_pws_default_splits);
  m.def("margin_fused_pws_workspace_floats", &bct_fast::margin_fused_pws_workspace_floats);
  m.def(
      "margin_fused_pv_tile_check",
      [](std::uintptr_t p, std::uintptr_t w, std::uintptr_t c, std::uintptr_t d, std::uintptr_t stream) {
        raise_if_error(bct_fast::margin_fused_pv_tile_check(ptr<const void>(p), ptr<const void>(w),
                                                            ptr<const float>(c), ptr<float>(d),
                                                            ptr<void>(stream)));
      },
      py::call_guard<py::gil_scoped_release>());
  // Fused top-k search (tensor-core score tiles, selection in shared memory); see topk_fused.h.
  m.attr("topk_fused_max_k") = bct_fast::kTopkFusedMaxK;
  m.def(
      "topk_fused_search",
      [](std::uintptr_t q, std::uintptr_t g, int dtype, int64_t Q, int64_t N, int64_t d,
         std::uintptr_t inv_nq, std::uintptr_t inv_ng, int k, int64_t n0, bool exclude,
         int64_t self_col0, int64_t splits, std::uintptr_t workspace, int64_t workspace_bytes,
         std::uintptr_t run_s, std::uintptr_t run_i, std::uintptr_t nonfinite,
         std::uintptr_t stream) {
        raise_if_error(bct_fast::topk_fused_search(
            ptr<const void>(q), ptr<const void>(g), static_cast<bct_fast::DType>(dtype), Q, N, d,
            ptr<const float>(inv_nq), ptr<const float>(inv_ng), k, n0, exclude, self_col0, splits,
            ptr<void>(workspace), workspace_bytes, ptr<float>(run_s), ptr<int64_t>(run_i),
            ptr<int>(nonfinite), ptr<void>(stream)));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("topk_fused_default_splits", &bct_fast::topk_fused_default_splits);
  m.def("topk_fused_workspace_bytes", &bct_fast::topk_fused_workspace_bytes);
#endif
}
