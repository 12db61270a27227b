// A float32 3x3, stride-1, padding-1 convolution by Winograd's minimal filtering F(2x2, 3x3), in
// AVX2 + FMA, chosen at run time (csrc/conv3x3_winograd.cpp): the recurrent conv step's forward
// convolutions and their input gradients on the CPU, where oneDNN's direct kernel already runs
// near the FMA peak and only fewer multiplies make them faster.
#pragma once

#include <cstdint>

namespace r2unet_fast {
namespace winograd {

// The convolution's sizes: input (N, K, H, W) to output (N, Cout, H, W), both channels_last.
struct ConvShape {
  int64_t n, k, c_out, h, w;
};

// Whether the kernel runs here: AVX2 and FMA on x86-64 (false elsewhere), and no test forcing the
// baseline kernels.
bool supported();

// Whether it runs these channel counts: multiples of 8 (one ymm register of channels) in and out.
bool applies(int64_t k, int64_t c_out);

// The weights' transform u (16, K, Cout): u[p] = G g G^T at position p of the 4x4 tile, g the 3x3
// filter from input channel k to output channel o. The filter is w[o][k] (w: (Cout, K, 3, 3) at
// the given element strides), or with ``flip`` (an input gradient: dx = conv(dy, flipped w)) the
// rotated w[k][o] of a (K, Cout, 3, 3) tensor.
void transform_weight(const float* w, const int64_t strides[4], int64_t k, int64_t c_out, bool flip, float* u);

// y = conv(relu(x * scale + shift), g) + bias + feed, the padding zero after the activation; scale
// and shift (K,) both or neither, bias (Cout,) and feed (like y) optional (nullptr). x: the
// channels_last memory of (N, K, H, W); y and feed of (N, Cout, H, W); u from transform_weight.
// Requires supported() and applies().
void conv(const ConvShape& d, const float* x, const float* u, const float* scale, const float* shift,
          const float* bias, const float* feed, float* y);

// dw (C_out, 3, 3, K: a channels_last (C_out, K, 3, 3) tensor's memory) = the weight gradient of
// conv(relu(x * scale + shift), w) from g, its output's gradient (the channels_last memory of
// (N, Cout, H, W)), by the same tiles (csrc/conv3x3_winograd_wgrad.cpp). scale and shift both or
// neither. Requires supported() and applies().
void wgrad(const ConvShape& d, const float* g, const float* x, const float* scale, const float* shift, float* dw);

}  // namespace winograd
}  // namespace r2unet_fast
