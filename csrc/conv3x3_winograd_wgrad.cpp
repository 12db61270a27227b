// The weight gradient of a float32 3x3 convolution by Winograd F(2x2, 3x3), on the forward's tiles
// (csrc/conv3x3_winograd.cpp). With U = G g G^T, V = B^T d B and M = sum over k of U . V, the
// output tile is A^T M A, so
//   dL/dU[p] = sum over tiles of V[p] dM[p],  dM = A dY A^T,  and  dL/dg = G^T (dL/dU) G:
// 16 multiplies per tile and channel pair instead of the direct kernel's 36. A block of tiles is
// transformed into V (16, tiles, K), with the recomputed BatchNorm + ReLU applied on load, and
// into dM (16, tiles, C_out); 16 register-blocked GEMMs (6 output x 16 input channels in 12 ymm
// registers, reduced over the block's tiles) add V^T dM into the partial dU (16, C_out, K). Fixed
// ranges of blocks have their own partials, added in order at the end, so the bits do not depend
// on the thread count; then the filter transform G^T dU G, once per call.
#include "conv3x3_winograd.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

#include "recurrent_conv_chunks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define R2UNET_FAST_X86 1
#include "conv3x3_winograd_tiles.h"
#endif

namespace r2unet_fast {
namespace winograd {

#ifdef R2UNET_FAST_X86

namespace {

// Partial sums at most this many, and at most this many bytes together (16 C_out K floats each:
// 1 MB at 128 channels).
constexpr int64_t kMaxPartials = 4;
constexpr int64_t kPartialBytes = 16 << 20;

// dM[p][b][.] (m points at tile b's row of position 0; positions ms floats apart) = A dY A^T of the
// tile at ``pos``, dY being zero outside the image.
__attribute__((target("avx2,fma"))) void grad_tile(const ConvShape& d, const TilePos& pos, const float* g,
                                                    int64_t ms, float* m) {
  const int64_t c = d.c_out, y0 = 2 * pos.ty, x0 = 2 * pos.tx;
  const bool row2 = y0 + 1 < d.h, col2 = x0 + 1 < d.w;
  const int64_t base = ((pos.image * d.h + y0) * d.w + x0) * c;
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t o = 0; o < c; o += 8) {
    const __m256 dy[2][2] = {
        {_mm256_loadu_ps(g + base + o), col2 ? _mm256_loadu_ps(g + base + c + o) : zero},
        {row2 ? _mm256_loadu_ps(g + base + d.w * c + o) : zero,
         row2 && col2 ? _mm256_loadu_ps(g + base + (d.w + 1) * c + o) : zero}};
    __m256 q[4][2];  // A dY
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) {
      q[0][j] = dy[0][j];
      q[1][j] = _mm256_add_ps(dy[0][j], dy[1][j]);
      q[2][j] = _mm256_sub_ps(dy[0][j], dy[1][j]);
      q[3][j] = _mm256_sub_ps(zero, dy[1][j]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {  // (A dY) A^T
      const __m256 r[4] = {q[i][0], _mm256_add_ps(q[i][0], q[i][1]), _mm256_sub_ps(q[i][0], q[i][1]),
                           _mm256_sub_ps(zero, q[i][1])};
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        _mm256_store_ps(m + (i * 4 + j) * ms + o, r[j]);
      }
    }
  }
}

// dw[o][.][.][i0 .. i0 + 8] = G^T dU G, dU[p] the sum of the partials' [p][o][i0 ..] in order.
__attribute__((target("avx2,fma"))) void filter_grad(const float* partials, int64_t parts, int64_t partial_size,
                                                      int64_t k, int64_t c_out, int64_t o, int64_t i0, float* dw) {
  const __m256 half = _mm256_set1_ps(0.5f);
  __m256 du[4][4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const float* src = partials + ((i * 4 + j) * c_out + o) * k + i0;
      du[i][j] = _mm256_loadu_ps(src);
      for (int64_t part = 1; part < parts; ++part) {
        du[i][j] = _mm256_add_ps(du[i][j], _mm256_loadu_ps(src + part * partial_size));
      }
    }
  }
  __m256 r[3][4];  // G^T dU
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m256 inner = _mm256_mul_ps(half, _mm256_add_ps(du[1][j], du[2][j]));
    r[0][j] = _mm256_add_ps(du[0][j], inner);
    r[1][j] = _mm256_mul_ps(half, _mm256_sub_ps(du[1][j], du[2][j]));
    r[2][j] = _mm256_add_ps(inner, du[3][j]);
  }
#pragma GCC unroll 3
  for (int a = 0; a < 3; ++a) {  // (G^T dU) G
    const __m256 inner = _mm256_mul_ps(half, _mm256_add_ps(r[a][1], r[a][2]));
    const __m256 out[3] = {_mm256_add_ps(r[a][0], inner), _mm256_mul_ps(half, _mm256_sub_ps(r[a][1], r[a][2])),
                           _mm256_add_ps(inner, r[a][3])};
#pragma GCC unroll 3
    for (int b = 0; b < 3; ++b) {
      _mm256_storeu_ps(dw + (o * 9 + a * 3 + b) * k + i0, out[b]);
    }
  }
}

}  // namespace

void wgrad(const ConvShape& d, const float* g, const float* x, const float* scale, const float* shift, float* dw) {
  TORCH_CHECK(applies(d.k, d.c_out), "conv3x3 winograd (cpu): channels must be multiples of 8, got ", d.k, " -> ",
              d.c_out);
  const int64_t partial_size = 16 * d.c_out * d.k;
  const Blocks plan(d, d.c_out, kMaxPartials, 1);
  if (plan.tiles == 0) {
    std::fill(dw, dw + d.c_out * 9 * d.k, 0.f);
    return;
  }
  const int64_t parts = std::max<int64_t>(
      1, std::min({plan.count, kMaxPartials, kPartialBytes / (partial_size * static_cast<int64_t>(sizeof(float)))}));
  // the calling thread's partial sums; every partial has at least one block (parts <= blocks)
  thread_local Scratch partial_scratch("conv3x3_wgrad winograd");
  float* const partials = partial_scratch.get(parts * partial_size);
  const int64_t vs = plan.vs, ms = plan.ms;
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch scratch("conv3x3_wgrad winograd");
    float* const v = scratch.get(16 * (vs + ms));
    float* const m = v + 16 * vs;
    for (int64_t part = begin; part < end; ++part) {
      float* const du = partials + part * partial_size;
      std::memset(du, 0, partial_size * sizeof(float));
      for (int64_t item = plan.count * part / parts; item < plan.count * (part + 1) / parts; ++item) {
        const int64_t count = plan.size(item);
        TilePos pos = plan.start(item);
        if (scale != nullptr) {
          input_block<true>(d, plan.t, x, scale, shift, pos, count, vs, v);
        } else {
          input_block<false>(d, plan.t, x, nullptr, nullptr, pos, count, vs, v);
        }
        for (int64_t b = 0; b < count; ++b, pos.next(plan.t)) {
          grad_tile(d, pos, g, ms, m + b * d.c_out);
        }
        for (int64_t p = 0; p < 16; ++p) {
          for (int64_t o = 0; o < d.c_out; o += kRows) {
            const int64_t rows = std::min<int64_t>(kRows, d.c_out - o);
            for (int64_t i = 0; i < d.k; i += 16) {
              const GemmFn fn = i + 16 <= d.k ? gemm_for<2, true>(rows) : gemm_for<1, true>(rows);
              fn(m + p * ms + o, 1, d.c_out, v + p * vs + i, d.k, count, du + (p * d.c_out + o) * d.k + i, d.k);
            }
          }
        }
      }
    }
  });
  at::parallel_for(0, d.c_out, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t i = 0; i < d.k; i += 8) {
        filter_grad(partials, parts, partial_size, d.k, d.c_out, o, i, dw);
      }
    }
  });
}

#else  // not x86-64: the direct or im2col kernel runs instead

void wgrad(const ConvShape&, const float*, const float*, const float*, const float*, float*) {
  TORCH_CHECK(false, "conv3x3_wgrad winograd (cpu): the kernel needs an x86-64 CPU with AVX2 and FMA");
}

#endif

}  // namespace winograd
}  // namespace r2unet_fast
