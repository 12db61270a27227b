// Winograd F(2x2, 3x3) for a float32 3x3 convolution on channels_last tensors (Lavin & Gray 2016):
// each 2x2 block of outputs ("tile") comes from the 4x4 input patch around it as
//   y = A^T [ sum over k of (G g_k G^T) . (B^T d_k B) ] A,
// 16 multiplies per tile, input channel and output channel instead of the direct 36: the sum is
// 16 independent (tiles x K) @ (K x Cout) GEMMs, one per position of the 4x4 transformed tile.
//
// Work items are blocks of consecutive tiles (image-major). A block's input patches are loaded
// once, with the recomputed BatchNorm + ReLU applied on the way (zero padding after it), and
// transformed into V (16, tiles, K); the 16 GEMMs against the transformed weights U (16, K, Cout)
// write M (16, tiles, Cout); the output transform adds the bias and the feed and stores the tile's
// in-image pixels. V and M stay in L2 between the three stages. Every output pixel is computed by
// one thread in a fixed order, so the bits do not depend on the thread count.
//
// Rounding: the transforms' coefficients are 0, +-1 and +-1/2, so the error is a small constant
// times the direct convolution's (tests/test_conv3x3_winograd.py holds it to the ratio rule).
#include "conv3x3_winograd.h"

#include "recurrent_conv.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "recurrent_conv_chunks.h"
#include "scratch.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define R2UNET_FAST_X86 1
#include "conv3x3_winograd_tiles.h"
#endif

namespace r2unet_fast {
namespace winograd {

bool applies(int64_t k, int64_t c_out) { return k > 0 && c_out > 0 && k % 8 == 0 && c_out % 8 == 0; }

#ifdef R2UNET_FAST_X86

bool supported() { return rc_detail::use_avx2_kernels(); }

namespace {

// y's pixels of the tile at ``pos`` from M[p][b][.] (m points at tile b's row of position 0;
// positions ms floats apart), plus bias and feed (kFeed).
template <bool kFeed>
__attribute__((target("avx2,fma"))) void output_tile(const ConvShape& d, const TilePos& pos, const float* m,
                                                      int64_t ms, const float* bias, const float* feed, float* y) {
  const int64_t c_out = d.c_out, y0 = 2 * pos.ty, x0 = 2 * pos.tx;
  const int rows = y0 + 1 < d.h ? 2 : 1, cols = x0 + 1 < d.w ? 2 : 1;
  const int64_t base = ((pos.image * d.h + y0) * d.w + x0) * c_out;
  const int64_t offset[2][2] = {{base, base + c_out}, {base + d.w * c_out, base + (d.w + 1) * c_out}};
  for (int64_t o = 0; o < c_out; o += 8) {
    __m256 p[4][4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        p[i][j] = _mm256_load_ps(m + (i * 4 + j) * ms + o);
      }
    }
    __m256 q[2][4];  // A^T p
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      q[0][j] = _mm256_add_ps(_mm256_add_ps(p[0][j], p[1][j]), p[2][j]);
      q[1][j] = _mm256_sub_ps(_mm256_sub_ps(p[1][j], p[2][j]), p[3][j]);
    }
    const __m256 bv = _mm256_loadu_ps(bias + o);
#pragma GCC unroll 2
    for (int i = 0; i < 2; ++i) {
      const __m256 r[2] = {_mm256_add_ps(_mm256_add_ps(q[i][0], q[i][1]), q[i][2]),
                           _mm256_sub_ps(_mm256_sub_ps(q[i][1], q[i][2]), q[i][3])};
#pragma GCC unroll 2
      for (int j = 0; j < 2; ++j) {
        if (i < rows && j < cols) {
          __m256 out = _mm256_add_ps(r[j], bv);
          if (kFeed) {
            out = _mm256_add_ps(out, _mm256_loadu_ps(feed + offset[i][j] + o));
          }
          _mm256_storeu_ps(y + offset[i][j] + o, out);
        }
      }
    }
  }
}

// U[.][i][o0 .. o0 + 8] = G g G^T for 8 output channels at once; g: their 3x3 filters as 9 taps
// of 8 contiguous floats.
__attribute__((target("avx2,fma"))) void transform_filters(const float* g, int64_t k, int64_t c_out, float* u) {
  const __m256 half = _mm256_set1_ps(0.5f);
  __m256 t[4][3];  // G g
#pragma GCC unroll 3
  for (int c = 0; c < 3; ++c) {
    const __m256 g0 = _mm256_loadu_ps(g + c * 8), g1 = _mm256_loadu_ps(g + (3 + c) * 8);
    const __m256 g2 = _mm256_loadu_ps(g + (6 + c) * 8), outer = _mm256_add_ps(g0, g2);
    t[0][c] = g0;
    t[1][c] = _mm256_mul_ps(half, _mm256_add_ps(outer, g1));
    t[2][c] = _mm256_mul_ps(half, _mm256_sub_ps(outer, g1));
    t[3][c] = g2;
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) {  // (G g) G^T
    const __m256 outer = _mm256_add_ps(t[r][0], t[r][2]);
    const __m256 v[4] = {t[r][0], _mm256_mul_ps(half, _mm256_add_ps(outer, t[r][1])),
                         _mm256_mul_ps(half, _mm256_sub_ps(outer, t[r][1])), t[r][2]};
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      _mm256_storeu_ps(u + (r * 4 + c) * k * c_out, v[c]);
    }
  }
}

}  // namespace

void transform_weight(const float* w, const int64_t strides[4], int64_t k, int64_t c_out, bool flip, float* u) {
  at::parallel_for(0, k, 8, [&](int64_t begin, int64_t end) {
    float g[9 * 8];  // 8 output channels' filters, tap-major
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t o0 = 0; o0 < c_out; o0 += 8) {
        for (int64_t o = 0; o < 8; ++o) {
          const float* f = flip ? w + i * strides[0] + (o0 + o) * strides[1] : w + (o0 + o) * strides[0] + i * strides[1];
          for (int64_t tap = 0; tap < 9; ++tap) {
            const int64_t r = flip ? 2 - tap / 3 : tap / 3, c = flip ? 2 - tap % 3 : tap % 3;
            g[tap * 8 + o] = f[r * strides[2] + c * strides[3]];
          }
        }
        transform_filters(g, k, c_out, u + i * c_out + o0);
      }
    }
  });
}

void conv(const ConvShape& d, const float* x, const float* u, const float* scale, const float* shift,
          const float* bias, const float* feed, float* y) {
  TORCH_CHECK(applies(d.k, d.c_out), "conv3x3 winograd (cpu): channels must be multiples of 8, got ", d.k, " -> ",
              d.c_out);
  const Blocks plan(d, d.c_out, 2 * at::get_num_threads(), kRows);  // at least two blocks a thread
  if (plan.tiles == 0) {
    return;
  }
  const std::vector<float> no_bias(bias == nullptr ? d.c_out : 0, 0.f);
  const float* const bias_or_zero = bias == nullptr ? no_bias.data() : bias;
  const int64_t vs = plan.vs, ms = plan.ms;
  at::parallel_for(0, plan.count, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch scratch("conv3x3 winograd");
    float* const v = scratch.get(16 * (vs + ms));
    float* const m = v + 16 * vs;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t count = plan.size(item);
      const TilePos pos = plan.start(item);
      if (scale != nullptr) {
        input_block<true>(d, plan.t, x, scale, shift, pos, count, vs, v);
      } else {
        input_block<false>(d, plan.t, x, nullptr, nullptr, pos, count, vs, v);
      }
      for (int64_t p = 0; p < 16; ++p) {
        const float* vp = v + p * vs;
        const float* up = u + p * d.k * d.c_out;
        float* mp = m + p * ms;
        for (int64_t o = 0; o < d.c_out; o += 16) {
          const bool wide = o + 16 <= d.c_out;
          for (int64_t b = 0; b < count; b += kRows) {
            const int64_t rows = std::min<int64_t>(kRows, count - b);
            const GemmFn fn = wide ? gemm_for<2, false>(rows) : gemm_for<1, false>(rows);
            fn(vp + b * d.k, d.k, 1, up + o, d.c_out, d.k, mp + b * d.c_out + o, d.c_out);
          }
        }
      }
      TilePos at = pos;
      for (int64_t i = 0; i < count; ++i, at.next(plan.t)) {
        if (feed != nullptr) {
          output_tile<true>(d, at, m + i * d.c_out, ms, bias_or_zero, feed, y);
        } else {
          output_tile<false>(d, at, m + i * d.c_out, ms, bias_or_zero, nullptr, y);
        }
      }
    }
  });
}

#else  // not x86-64: ATen's convolution runs instead

bool supported() { return false; }

void transform_weight(const float*, const int64_t[4], int64_t, int64_t, bool, float*) {
  TORCH_CHECK(false, "conv3x3 winograd (cpu): the kernel needs an x86-64 CPU with AVX2 and FMA");
}

void conv(const ConvShape&, const float*, const float*, const float*, const float*, const float*, const float*,
          float*) {
  TORCH_CHECK(false, "conv3x3 winograd (cpu): the kernel needs an x86-64 CPU with AVX2 and FMA");
}

#endif

}  // namespace winograd
}  // namespace r2unet_fast

namespace r2unet_fast {
namespace {

void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 &&
                  t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "conv3x3 winograd (cpu): ", name, " must be a channels_last float32 (N, C, H, W) CPU tensor, got ",
              t.scalar_type(), " ", t.sizes(), " strides ", t.strides());
}

const float* vector_or_null(const std::optional<at::Tensor>& v, int64_t c, const char* name) {
  if (!v.has_value()) {
    return nullptr;
  }
  TORCH_CHECK(v->dim() == 1 && v->size(0) == c && v->is_contiguous() && v->scalar_type() == at::kFloat,
              "conv3x3 winograd (cpu): ", name, " must be a contiguous float32 (", c, ",) vector, got ", v->sizes());
  return v->data_ptr<float>();
}

}  // namespace

void rc_conv3x3_winograd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                         const std::optional<at::Tensor>& feed, at::Tensor y, bool flip) {
  check_activation(x, "x");
  check_activation(y, "y");
  TORCH_CHECK(winograd::supported(), "conv3x3 winograd (cpu): needs an x86-64 CPU with AVX2 and FMA");
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 4 && w.size(2) == 3 &&
                  w.size(3) == 3,
              "conv3x3 winograd (cpu): w must be a float32 (C_out, C_in, 3, 3) CPU tensor, got ", w.sizes());
  const winograd::ConvShape d{x.size(0), x.size(1), flip ? w.size(1) : w.size(0), x.size(2), x.size(3)};
  TORCH_CHECK(w.size(flip ? 0 : 1) == d.k, "conv3x3 winograd (cpu): w ", w.sizes(), " does not take x's ", d.k,
              " channels", flip ? " (the input gradient's w is the forward's, (C_out, C_in, 3, 3))" : "");
  TORCH_CHECK(y.size(0) == d.n && y.size(1) == d.c_out && y.size(2) == d.h && y.size(3) == d.w,
              "conv3x3 winograd (cpu): y must be (", d.n, ", ", d.c_out, ", ", d.h, ", ", d.w, "), got ", y.sizes());
  TORCH_CHECK(winograd::applies(d.k, d.c_out), "conv3x3 winograd (cpu): channels must be multiples of 8, got ", d.k,
              " -> ", d.c_out);
  TORCH_CHECK(scale.has_value() == shift.has_value(), "conv3x3 winograd (cpu): give both scale and shift, or neither");
  const float* sc = vector_or_null(scale, d.k, "scale");
  const float* sh = vector_or_null(shift, d.k, "shift");
  const float* b = vector_or_null(bias, d.c_out, "bias");
  if (feed.has_value()) {
    check_activation(*feed, "feed");
    TORCH_CHECK(feed->sizes() == y.sizes(), "conv3x3 winograd (cpu): feed must be y's shape ", y.sizes(), ", got ",
                feed->sizes());
  }
  const int64_t strides[4] = {w.stride(0), w.stride(1), w.stride(2), w.stride(3)};
  thread_local Scratch weights("conv3x3 winograd");
  float* const u = weights.get(16 * d.k * d.c_out);
  winograd::transform_weight(w.data_ptr<float>(), strides, d.k, d.c_out, flip, u);
  winograd::conv(d, x.data_ptr<float>(), u, sc, sh, b, feed.has_value() ? feed->data_ptr<float>() : nullptr,
                 y.data_ptr<float>());
}

}  // namespace r2unet_fast
