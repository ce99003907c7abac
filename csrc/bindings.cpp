// Python bindings of suncet._C: the fused contrastive kernels and what this build holds.
#include <torch/extension.h>

#include "contrastive.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef SUNCET_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_max_threads"] = 1;
#endif
  info["cpu_variants"] = suncet::cpu_variants(false);
  try {
    info["cpu_variant"] = suncet::cpu_variant();
  } catch (const c10::Error& exc) {  // SUNCET_CPU_VARIANT names a variant that cannot run here
    info["cpu_variant"] = std::string("none: ") + exc.what_without_backtrace();
  }
  info["cxx_standard"] = static_cast<long>(__cplusplus);
  info["compiler"] = std::string(__VERSION__);  // the variants' code is this compiler's register allocation
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "suncet C++/CUDA kernels";
  m.def("build_info", &build_info, "What this build of the extension contains");
  m.def("cpu_variant", &suncet::cpu_variant,
        "The instruction-set variant the CPU kernels run: the best this processor supports, or the one forced");
  m.def("set_cpu_variant", &suncet::set_cpu_variant, "Force a CPU kernel variant this processor supports",
        py::arg("name"));
  m.def("cpu_variants", &suncet::cpu_variants, "The CPU kernel variants of this build", py::arg("supported_only"));
  m.def("multi_positive_forward_cpu", &suncet::multi_positive_forward_cpu,
        "Fused multi-positive contrastive forward on CPU: (loss, valid, lse_all, lse_pos)", py::arg("q"),
        py::arg("k"), py::arg("row_keys"), py::arg("col_keys"), py::arg("row_groups"), py::arg("col_groups"),
        py::arg("self_offset"), py::arg("tau"), py::arg("one_tower"), py::call_guard<py::gil_scoped_release>());
  m.def("multi_positive_backward_cpu", &suncet::multi_positive_backward_cpu,
        "Fused multi-positive contrastive backward on CPU: (dq, dk), dk empty when one_tower", py::arg("grad_loss"),
        py::arg("q"), py::arg("k"), py::arg("row_keys"), py::arg("col_keys"), py::arg("row_groups"),
        py::arg("col_groups"), py::arg("lse_all"), py::arg("lse_pos"), py::arg("self_offset"), py::arg("tau"),
        py::arg("one_tower"), py::call_guard<py::gil_scoped_release>());
#ifdef SUNCET_WITH_CUDA
  m.def("multi_positive_forward_cuda", &suncet::multi_positive_forward_cuda,
        "Fused multi-positive contrastive forward on CUDA (bf16): (loss, valid, lse_all, lse_pos)",
        py::arg("q"), py::arg("k"), py::arg("row_keys"), py::arg("col_keys"), py::arg("row_groups"),
        py::arg("col_groups"), py::arg("self_offset"), py::arg("tau"), py::arg("one_tower"),
        py::call_guard<py::gil_scoped_release>());
  m.def("multi_positive_backward_cuda", &suncet::multi_positive_backward_cuda,
        "Fused multi-positive contrastive backward on CUDA (bf16): (dq, dk), dk empty when one_tower",
        py::arg("grad_loss"), py::arg("q"), py::arg("k"), py::arg("row_keys"), py::arg("col_keys"),
        py::arg("row_groups"), py::arg("col_groups"), py::arg("lse_all"), py::arg("lse_pos"),
        py::arg("self_offset"), py::arg("tau"), py::arg("one_tower"), py::call_guard<py::gil_scoped_release>());
#endif
}
