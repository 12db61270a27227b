// The direct (no im2col) float32 weight gradient of a 3x3 convolution, in AVX2 + FMA, chosen at
// run time (csrc/conv3x3_wgrad_direct.cpp); csrc/conv3x3_wgrad.cpp falls back to its im2col GEMM
// on other CPUs and for float64.
#pragma once

#include <cstdint>

namespace r2unet_fast {

// The tensors' sizes: input (N, C_in, H, W), grad (N, C_out, H, W), both channels_last.
struct WgradShape {
  int64_t n, c_in, c_out, h, w;
  int64_t pixels() const { return n * h * w; }
};

namespace wgrad_direct {

// Whether the kernel runs here: AVX2 and FMA on x86-64 (false elsewhere), and no test forcing the
// baseline kernels.
bool supported();

// dw (C_out, 3, 3, C_in: a channels_last (C_out, C_in, 3, 3) tensor's memory) from g and x, with
// x replaced by relu(x * scale + shift) as it is loaded when scale is not null. Requires supported().
void wgrad(const WgradShape& d, const float* g, const float* x, const float* scale, const float* shift, float* dw);

}  // namespace wgrad_direct
}  // namespace r2unet_fast
