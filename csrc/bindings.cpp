// The one Python module of the C++ kernels, r2unet_fast._C. Each op's
// kernels live in their own csrc/<op>.cpp; declare and bind them here.
// Python (r2unet_fast/ops/cpu.py) allocates every output, so tests can
// poison them; the kernels validate again with TORCH_CHECK.

#include <torch/extension.h>

#include <optional>

namespace r2unet_fast {
void hybrid_loss_fwd(const at::Tensor& logits, const at::Tensor& target, at::Tensor out);
void hybrid_loss_bwd(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& grad_sums,
                     at::Tensor grad_logits, const std::optional<at::Tensor>& grad_target);
}  // namespace r2unet_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "r2unet_fast C++ CPU kernels (OpenMP); see r2unet_fast/ops/cpu.py for the Python side.";
  m.def("hybrid_loss_fwd", &r2unet_fast::hybrid_loss_fwd,
        "Per-image sums (I, P, T, B0, B1) of the hybrid loss into out (N, 5).", py::arg("logits"),
        py::arg("target"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("hybrid_loss_bwd", &r2unet_fast::hybrid_loss_bwd,
        "Gradients of the hybrid loss from grad_sums (N, 5) into grad_logits (and grad_target unless None).",
        py::arg("logits"), py::arg("target"), py::arg("grad_sums"), py::arg("grad_logits"), py::arg("grad_target"),
        py::call_guard<py::gil_scoped_release>());
}
