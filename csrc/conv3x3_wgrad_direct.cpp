// A register-blocked float32 3x3 weight gradient for AVX2 + FMA CPUs, without im2col:
//   dw[o, kh, kw, i] = sum over (n, y, x) of g[n, y, x, o] * h[n, y + kh - 1, x + kw - 1, i].
// Work items are bands of image rows. A band's input rows and their halo are copied once into a
// zero-padded (rows + 2, W + 2, C_in rounded up to 8) buffer, with the recomputed BatchNorm +
// ReLU applied on the way; then every tap (kh, kw) is a shifted view of that buffer. A block of the
// three taps of one kernel row, 4 output channels and 8 input channels accumulates in 12 ymm
// registers over all the band's pixels: per pixel 3 vector loads (the neighbouring pixels) and 4
// broadcasts feed 12 FMAs, and every C_out that is a multiple of 4 fills all 12 registers (a block of
// 6 outputs by 16 inputs per tap left 4- and 2-output remainders at 16 and 32 channels, and ran
// about 8 % slower). Why not im2col + GEMM: at 16 to 64 channels the GEMM's (C_out, 9 C_in) output is
// too thin for BLAS, and the unfolded copy is 9x the input.
//
// Fixed ranges of bands accumulate into their own partial sums, added in order at the end, so the
// bits do not depend on the thread count.
#include "conv3x3_wgrad_direct.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "recurrent_conv_chunks.h"
#include "scratch.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define R2UNET_FAST_X86 1
#endif

namespace r2unet_fast {
namespace wgrad_direct {

#ifdef R2UNET_FAST_X86

bool supported() { return rc_detail::use_avx2_kernels(); }

namespace {

// A band's padded input and gradient rows together stay within about half an L2 cache.
constexpr int64_t kBandBytes = 192 << 10;
// Partial sums at most this many, and at most this many bytes together.
constexpr int64_t kMaxPartials = 4;
constexpr int64_t kPartialBytes = 16 << 20;
// Output channels per register block (3 taps x 4 outputs = 12 accumulators, 3 input loads and a
// broadcast: all 16 ymm registers).
constexpr int kBlockOut = 4;

struct Plan {
  int64_t cp;     // input channels rounded up to 8 (zeros beyond C_in)
  int64_t wp;     // padded row length, W + 2
  int64_t rows;   // rows per band
  int64_t bands;  // bands per image
};

// The band's input rows y0 - 1 .. y0 + rows (zero outside the image, and in the padding columns
// and channels), as relu(x * scale + shift) when scale is given.
__attribute__((target("avx2,fma"))) void load_band(const WgradShape& d, const Plan& p, const float* x,
                                                    const float* scale, const float* shift, int64_t image,
                                                    int64_t y0, int64_t rows, float* xb) {
  std::fill(xb, xb + (rows + 2) * p.wp * p.cp, 0.f);
  for (int64_t r = 0; r < rows + 2; ++r) {
    const int64_t y = y0 + r - 1;
    if (y < 0 || y >= d.h) {
      continue;
    }
    for (int64_t col = 0; col < d.w; ++col) {
      const float* src = x + ((image * d.h + y) * d.w + col) * d.c_in;
      float* dst = xb + (r * p.wp + col + 1) * p.cp;
      if (scale != nullptr) {
#pragma omp simd
        for (int64_t i = 0; i < d.c_in; ++i) {
          const float v = src[i] * scale[i] + shift[i];
          dst[i] = v < 0.f ? 0.f : v;  // torch.relu: NaN stays NaN
        }
      } else {
        std::copy(src, src + d.c_in, dst);
      }
    }
  }
}

// out[(o * 9 + kw) * cp + i] += sum over the band's pixels of g[pixel, o] * xb[pixel + kw, i] for
// o < kOut, kw < 3, i < 8 (= instead of += when kStore: a partial's first band, so partials are
// never zero-filled); g and xb already point at the block's first channel and kernel row.
template <int kOut, bool kStore>
__attribute__((target("avx2,fma"))) void block(const float* g, int64_t c_out, const float* xb, const Plan& p,
                                                int64_t rows, int64_t w, float* out) {
  __m256 acc[3][kOut];
#pragma GCC unroll 3
  for (int k = 0; k < 3; ++k) {
#pragma GCC unroll 4
    for (int o = 0; o < kOut; ++o) {
      acc[k][o] = _mm256_setzero_ps();
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* gr = g + r * w * c_out;
    const float* xr = xb + r * p.wp * p.cp;
    for (int64_t col = 0; col < w; ++col) {
      const float* xp = xr + col * p.cp;
      const __m256 x0 = _mm256_loadu_ps(xp);
      const __m256 x1 = _mm256_loadu_ps(xp + p.cp);
      const __m256 x2 = _mm256_loadu_ps(xp + 2 * p.cp);
      const float* gp = gr + col * c_out;
#pragma GCC unroll 4
      for (int o = 0; o < kOut; ++o) {
        const __m256 gv = _mm256_broadcast_ss(gp + o);
        acc[0][o] = _mm256_fmadd_ps(gv, x0, acc[0][o]);
        acc[1][o] = _mm256_fmadd_ps(gv, x1, acc[1][o]);
        acc[2][o] = _mm256_fmadd_ps(gv, x2, acc[2][o]);
      }
    }
  }
#pragma GCC unroll 3
  for (int k = 0; k < 3; ++k) {
#pragma GCC unroll 4
    for (int o = 0; o < kOut; ++o) {
      float* dst = out + (o * 9 + k) * p.cp;
      _mm256_storeu_ps(dst, kStore ? acc[k][o] : _mm256_add_ps(_mm256_loadu_ps(dst), acc[k][o]));
    }
  }
}

using BlockFn = void (*)(const float*, int64_t, const float*, const Plan&, int64_t, int64_t, float*);

template <bool kStore>
BlockFn block_for(int64_t out) {
  switch (out) {
    case 1: return block<1, kStore>;
    case 2: return block<2, kStore>;
    case 3: return block<3, kStore>;
    default: return block<4, kStore>;
  }
}

// One band's contribution to a partial (C_out, 9, cp), which the first band (``first``) overwrites.
void band(const WgradShape& d, const Plan& p, const float* g, const float* xb, int64_t image, int64_t y0,
          int64_t rows, bool first, float* partial) {
  const float* gb = g + (image * d.h + y0) * d.w * d.c_out;
  for (int64_t kh = 0; kh < 3; ++kh) {
    const float* xk = xb + kh * p.wp * p.cp;
    for (int64_t o0 = 0; o0 < d.c_out; o0 += kBlockOut) {
      const int64_t out = std::min<int64_t>(kBlockOut, d.c_out - o0);
      const BlockFn fn = first ? block_for<true>(out) : block_for<false>(out);
      for (int64_t i0 = 0; i0 < p.cp; i0 += 8) {
        fn(gb + o0, d.c_out, xk + i0, p, rows, d.w, partial + (o0 * 9 + kh * 3) * p.cp + i0);
      }
    }
  }
}

}  // namespace

void wgrad(const WgradShape& d, const float* g, const float* x, const float* scale, const float* shift, float* dw) {
  Plan p{};
  p.cp = (d.c_in + 7) / 8 * 8;
  p.wp = d.w + 2;
  const int64_t row_bytes = (p.wp * p.cp + d.w * d.c_out) * static_cast<int64_t>(sizeof(float));
  p.rows = std::clamp<int64_t>(kBandBytes / row_bytes - 2, 1, d.h);
  p.bands = (d.h + p.rows - 1) / p.rows;
  const int64_t items = d.n * p.bands, partial_size = d.c_out * 9 * p.cp;
  const int64_t partials = std::max<int64_t>(
      1, std::min({items, kMaxPartials, kPartialBytes / (partial_size * static_cast<int64_t>(sizeof(float)))}));
  // the calling thread's partial sums; every partial has at least one band (partials <= items)
  thread_local Scratch partial_scratch("conv3x3_wgrad");
  float* const acc = partial_scratch.get(partials * partial_size);
  at::parallel_for(0, partials, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch band_scratch("conv3x3_wgrad");
    float* const xb = band_scratch.get((p.rows + 2) * p.wp * p.cp);
    for (int64_t part = begin; part < end; ++part) {
      const int64_t first = items * part / partials;
      for (int64_t item = first; item < items * (part + 1) / partials; ++item) {
        const int64_t image = item / p.bands, y0 = (item % p.bands) * p.rows;
        const int64_t rows = std::min(p.rows, d.h - y0);
        load_band(d, p, x, scale, shift, image, y0, rows, xb);
        band(d, p, g, xb, image, y0, rows, item == first, acc + part * partial_size);
      }
    }
  });
  for (int64_t o = 0; o < d.c_out; ++o) {
    for (int64_t tap = 0; tap < 9; ++tap) {
      float* dst = dw + (o * 9 + tap) * d.c_in;
      const float* src = acc + (o * 9 + tap) * p.cp;
      std::copy(src, src + d.c_in, dst);
      for (int64_t part = 1; part < partials; ++part) {
        const float* more = src + part * partial_size;
        for (int64_t i = 0; i < d.c_in; ++i) {
          dst[i] += more[i];
        }
      }
    }
  }
}

#else  // not x86-64: the im2col kernel runs instead

bool supported() { return false; }

void wgrad(const WgradShape&, const float*, const float*, const float*, const float*, float*) {
  TORCH_CHECK(false, "conv3x3_wgrad (cpu): the direct kernel needs an x86-64 CPU with AVX2 and FMA");
}

#endif

}  // namespace wgrad_direct
}  // namespace r2unet_fast
