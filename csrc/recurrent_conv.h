// The recurrent conv step's fused passes on CPU (csrc/recurrent_conv.cpp). The convolutions
// themselves are ATen's (oneDNN); r2unet_fast/ops/library/recurrent_conv.py runs the steps.
// Contracts: tests/recurrent_conv_oracle.py. float32 and float64 tensors, NCHW or channels_last.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace r2unet_fast {

// out += feed (when given), then the per-channel mean and biased variance of out over (N, H, W)
// into mean and var (C,): chunk statistics merged in chunk order (Chan et al.), so the bits do
// not depend on the thread count.
void rc_add_stats(at::Tensor out, const std::optional<at::Tensor>& feed, at::Tensor mean, at::Tensor var);

// rc_add_stats for step `step` of a unit, and the BatchNorm of that step as s * scale + shift with
// gamma and beta row `row` (norms, C): stats (5, steps, C) gets mean, biased var, scale, shift
// and rstd = 1 / sqrt(var + eps) in its rows [., step, .]. One call instead of a dozen tiny ops.
void rc_add_stats_affine(at::Tensor out, const std::optional<at::Tensor>& feed, const at::Tensor& gamma,
                         const at::Tensor& beta, int64_t row, double eps, at::Tensor stats, int64_t step);

// What nn.BatchNorm2d does with each step's batch statistics, step after step, from stats' mean and
// biased-variance rows (5, steps, C): running = (1 - f) running + f value, with the unbiased
// variance of `count` values, f = momentum or (no momentum) 1 / num_batches_tracked after its
// increment; step k updates BatchNorm min(k, norms - 1). One call instead of a dozen tiny ops.
void rc_update_running_stats(const at::Tensor& stats, const std::vector<at::Tensor>& running_means,
                             const std::vector<at::Tensor>& running_vars,
                             const std::optional<std::vector<at::Tensor>>& num_batches_tracked,
                             std::optional<double> momentum, int64_t count);

// h = relu((s + feed) * scale + shift) + residual; feed and residual optional.
void rc_bn_relu(const at::Tensor& s, const std::optional<at::Tensor>& feed, const at::Tensor& scale,
                const at::Tensor& shift, const std::optional<at::Tensor>& residual, at::Tensor h);

// The backward of h = relu(s * scale + shift) with batch statistics: sum_dy and sum_dy_xhat (C,),
// then ds into ds (when given) and added into dfeed (when given).
void rc_bn_relu_bwd(const at::Tensor& s, const at::Tensor& dh, const at::Tensor& scale, const at::Tensor& shift,
                    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& gamma,
                    const std::optional<at::Tensor>& dfeed, const std::optional<at::Tensor>& ds,
                    at::Tensor sum_dy, at::Tensor sum_dy_xhat);

// dw (C_out, C_in, 3, 3, channels_last) = the weight gradient of a 3x3 stride-1 padding-1
// convolution from grad (N, C_out, H, W) and its input, both channels_last; with scale and shift
// (C_in,) the input is relu(input * scale + shift), computed as it is loaded
// (csrc/conv3x3_wgrad.cpp). Where the CPU has AVX2 + FMA, float32 takes Winograd F(2x2, 3x3)
// (csrc/conv3x3_winograd_wgrad.cpp) when ``winograd`` and both channel counts are multiples of 8,
// else csrc/conv3x3_wgrad_direct.cpp's kernel when ``direct``; the rest the im2col GEMM.
void rc_conv3x3_wgrad(const at::Tensor& grad, const at::Tensor& input, const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& shift, at::Tensor dw, bool direct, bool winograd);

// y = conv3x3(relu(x * scale + shift), w) + bias + feed (stride 1, padding 1 on the activation;
// scale and shift both or neither; bias, feed optional) by Winograd F(2x2, 3x3), float32,
// channels_last x, y and feed, channels multiples of 8 (csrc/conv3x3_winograd.cpp). flip: the input
// gradient dx = conv(dy, rotated w) of a forward weight w (C_out, C_in, 3, 3), x being dy.
void rc_conv3x3_winograd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                         const std::optional<at::Tensor>& feed, at::Tensor y, bool flip);


}  // namespace r2unet_fast
