// The one Python module of the C++ kernels, r2unet_fast._C. Each op's
// kernels live in their own csrc/<op>*.cpp, declared in csrc/<op>.h; bind them
// here. Python (r2unet_fast/ops/cpu.py) allocates every output, so tests can
// poison them; the kernels validate again with TORCH_CHECK.

#include <torch/csrc/utils/pybind.h>

#include <optional>

#include "attention_gate.h"
#include "hybrid_loss.h"
#include "recurrent_conv.h"
#include "recurrent_conv_chunks.h"

namespace {

r2unet_fast::LossOptions loss_options(double pos_weight, double dice_weight, double bce_weight, double smooth,
                                      bool per_image) {
  return {pos_weight, dice_weight, bce_weight, smooth, per_image};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "r2unet_fast C++ CPU kernels (OpenMP); see r2unet_fast/ops/cpu.py for the Python side.";
  m.def(
      "hybrid_loss_fwd",
      [](const at::Tensor& logits, const at::Tensor& target, at::Tensor loss, at::Tensor coef, double pos_weight,
         double dice_weight, double bce_weight, double smooth, bool per_image) {
        r2unet_fast::hybrid_loss_fwd(logits, target, loss, coef,
                                     loss_options(pos_weight, dice_weight, bce_weight, smooth, per_image));
      },
      "The hybrid loss into loss (0-d) and its gradient coefficients per image into coef (N, 5).",
      py::arg("logits"), py::arg("target"), py::arg("loss"), py::arg("coef"), py::arg("pos_weight"),
      py::arg("dice_weight"), py::arg("bce_weight"), py::arg("smooth"), py::arg("per_image"),
      py::call_guard<py::gil_scoped_release>());
  m.def("hybrid_loss_bwd", &r2unet_fast::hybrid_loss_bwd,
        "Gradients of the hybrid loss from coef (N, 5) and grad_loss (0-d) into grad_logits (and grad_target "
        "unless None).",
        py::arg("logits"), py::arg("target"), py::arg("coef"), py::arg("grad_loss"), py::arg("grad_logits"),
        py::arg("grad_target"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "hybrid_loss_epilogue",
      [](const at::Tensor& partials, int64_t numel, at::Tensor loss, at::Tensor coef, double pos_weight,
         double dice_weight, double bce_weight, double smooth, bool per_image) {
        r2unet_fast::hybrid_loss_epilogue(partials, numel, loss, coef,
                                          loss_options(pos_weight, dice_weight, bce_weight, smooth, per_image));
      },
      "The forward's epilogue alone (for tests): float64 partials (N, chunks, 5) into loss and coef.",
      py::arg("partials"), py::arg("numel"), py::arg("loss"), py::arg("coef"), py::arg("pos_weight"),
      py::arg("dice_weight"), py::arg("bce_weight"), py::arg("smooth"), py::arg("per_image"),
      py::call_guard<py::gil_scoped_release>());
  m.def("attention_gate_fwd", &r2unet_fast::attention_gate_fwd,
        "The attention gate: psi = sigmoid(w_psi . relu(W_x x + W_g g + bias) + b_psi) into psi (N, 1, H, W) "
        "and x * psi into out (x's layout).",
        py::arg("x"), py::arg("g"), py::arg("w_x"), py::arg("w_g"), py::arg("bias"), py::arg("w_psi"),
        py::arg("b_psi"), py::arg("out"), py::arg("psi"), py::arg("kept") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("attention_gate_kept_numel", &r2unet_fast::attention_gate_kept_numel,
        "Elements of the forward's kept pre-activation buffer for x (N, ., H, W) and F channels.", py::arg("n"),
        py::arg("h"), py::arg("w"), py::arg("f"));
  m.def("attention_gate_bwd", &r2unet_fast::attention_gate_bwd,
        "Gradients of the attention gate from grad_out and grad_psi (None: psi got no gradient) into dx, dg, "
        "dw_x, dw_g, dbias, dw_psi, db_psi.",
        py::arg("x"), py::arg("g"), py::arg("w_x"), py::arg("w_g"), py::arg("bias"), py::arg("w_psi"),
        py::arg("b_psi"), py::arg("grad_out"), py::arg("grad_psi"), py::arg("dx"), py::arg("dg"), py::arg("dw_x"),
        py::arg("dw_g"), py::arg("dbias"), py::arg("dw_psi"), py::arg("db_psi"), py::arg("kept") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("rc_add_stats", &r2unet_fast::rc_add_stats,
        "out += feed (None: nothing added), then out's per-channel mean and biased variance into mean, var (C,).",
        py::arg("out"), py::arg("feed"), py::arg("mean"), py::arg("var"), py::call_guard<py::gil_scoped_release>());
  m.def("rc_add_stats_affine", &r2unet_fast::rc_add_stats_affine,
        "rc_add_stats for one step, then that step's BatchNorm as scale and shift: stats (5, steps, C) gets "
        "mean, biased var, scale, shift, rstd at [., step, .] from gamma and beta row `row`.",
        py::arg("out"), py::arg("feed"), py::arg("gamma"), py::arg("beta"), py::arg("row"), py::arg("eps"),
        py::arg("stats"), py::arg("step"), py::call_guard<py::gil_scoped_release>());
  m.def("rc_bn_relu", &r2unet_fast::rc_bn_relu,
        "h = relu((s + feed) * scale + shift) + residual (feed, residual: None for none).", py::arg("s"),
        py::arg("feed"), py::arg("scale"), py::arg("shift"), py::arg("residual"), py::arg("h"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rc_update_running_stats", &r2unet_fast::rc_update_running_stats,
        "nn.BatchNorm2d's running-statistics update from each step's mean and biased variance (stats rows 0 and 1), "
        "step after step.",
        py::arg("stats"), py::arg("running_means"), py::arg("running_vars"), py::arg("num_batches_tracked"),
        py::arg("momentum"), py::arg("count"), py::call_guard<py::gil_scoped_release>());
  m.def("rc_bn_relu_bwd", &r2unet_fast::rc_bn_relu_bwd,
        "Backward of h = relu(s * scale + shift) with batch statistics: sum_dy, sum_dy_xhat (C,), ds (None: not "
        "written), dfeed += ds (None: nothing added).",
        py::arg("s"), py::arg("dh"), py::arg("scale"), py::arg("shift"), py::arg("mean"), py::arg("rstd"),
        py::arg("gamma"), py::arg("dfeed"), py::arg("ds"), py::arg("sum_dy"), py::arg("sum_dy_xhat"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rc_conv3x3_wgrad", &r2unet_fast::rc_conv3x3_wgrad,
        "Weight gradient of a 3x3 stride-1 padding-1 convolution into dw (channels_last), from channels_last grad "
        "and input; with scale and shift the input is relu(input * scale + shift).",
        py::arg("grad"), py::arg("input"), py::arg("scale"), py::arg("shift"), py::arg("dw"), py::arg("direct"),
        py::arg("winograd") = true, py::call_guard<py::gil_scoped_release>());
  m.def("rc_conv3x3_winograd", &r2unet_fast::rc_conv3x3_winograd,
        "y = conv3x3(relu(x * scale + shift), w) + bias + feed by Winograd F(2x2, 3x3) (float32, channels_last, "
        "channels multiples of 8); flip: the input gradient, x being the output's gradient.",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("scale"), py::arg("shift"), py::arg("feed"),
        py::arg("y"), py::arg("flip"), py::call_guard<py::gil_scoped_release>());
  m.def("avx2_kernels", &r2unet_fast::rc_detail::use_avx2_kernels,
        "Whether the recurrent conv kernels run their AVX2 + FMA versions (the CPU has them, and "
        "set_baseline_kernels(True) is not in force).");
  m.def("set_baseline_kernels", [](bool on) { r2unet_fast::rc_detail::baseline_forced() = on; },
        "Run the baseline versions even on an AVX2 CPU (for tests).", py::arg("on"));
}
