// Declarations of csrc/attention_gate.cpp, bound in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace r2unet_fast {

// psi = sigmoid(w_psi . relu(W_x x + W_g g + bias) + b_psi) into psi (N, 1, H, W), x * psi into out.
// x (N, Cx, H, W) and g (N, Cg, H, W): float32 or float64, both contiguous or both channels_last;
// out in x's layout. Weights: w_x (F, Cx), w_g (F, Cg), bias (F), w_psi (F), b_psi (1), x's dtype.
// With `kept` (attention_gate_kept_numel elements of x's dtype), the pre-activation W_x x + W_g g + bias
// of every chunk is also written there, for a backward that then need not recompute it.
void attention_gate_fwd(const at::Tensor& x, const at::Tensor& g, const at::Tensor& w_x, const at::Tensor& w_g,
                        const at::Tensor& bias, const at::Tensor& w_psi, const at::Tensor& b_psi, at::Tensor out,
                        at::Tensor psi, const std::optional<at::Tensor>& kept);

// Elements of the forward's `kept` buffer for x (N, ., H, W) and F intermediate channels.
int64_t attention_gate_kept_numel(int64_t n, int64_t h, int64_t w, int64_t f);

// Every gradient of the gate from grad_out (x's layout) and grad_psi (N, 1, H, W), or none for psi.
// With `kept` (the forward's buffer) the pre-activation is read from it instead of recomputed.
// dx, dg in x's and g's layouts; weight gradients contiguous in the weights' shapes.
void attention_gate_bwd(const at::Tensor& x, const at::Tensor& g, const at::Tensor& w_x, const at::Tensor& w_g,
                        const at::Tensor& bias, const at::Tensor& w_psi, const at::Tensor& b_psi,
                        const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_psi, at::Tensor dx,
                        at::Tensor dg, at::Tensor dw_x, at::Tensor dw_g, at::Tensor dbias, at::Tensor dw_psi,
                        at::Tensor db_psi, const std::optional<at::Tensor>& kept);

}  // namespace r2unet_fast
