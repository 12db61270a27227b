// Internal to the Winograd F(2x2, 3x3) kernels (csrc/conv3x3_winograd.cpp: forward and input
// gradient; csrc/conv3x3_winograd_wgrad.cpp: weight gradient): the tiling, and the input transform
// both share. x86-64 with AVX2 + FMA only (the includers check R2UNET_FAST_X86).
//
// Every fixed-trip loop over registers carries `#pragma GCC unroll`: without it GCC kept the __m256
// arrays (the GEMM's accumulators, a tile's 16 vectors) on the stack, at half the speed.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "conv3x3_winograd.h"
#include "scratch.h"

namespace r2unet_fast {
namespace winograd {
namespace {

// The two transformed operands of a block together fill about half of a 512 KB L2.
constexpr int64_t kBlockBytes = 256 << 10;

struct Tiles {
  int64_t th, tw;  // tiles per column and per row
  int64_t per_image() const { return th * tw; }
};

// A tile's place: image, tile row and tile column; stepped through a block in order, as divisions
// per tile showed in the profile at 16 channels.
struct TilePos {
  int64_t image, ty, tx;
  void next(const Tiles& t) {
    if (++tx == t.tw) {
      tx = 0;
      if (++ty == t.th) {
        ty = 0;
        ++image;
      }
    }
  }
};

// V[p][b][.] (v points at tile b's row of position 0; positions vs floats apart) from the tile's
// 4x4 input patch, whose pixels are at element offsets ``offset`` (-1: the zero padding; never
// when kInterior).
template <bool kPrologue, bool kInterior>
__attribute__((target("avx2,fma"))) void input_tile(const float* x, int64_t k, const int64_t (&offset)[4][4],
                                                     const float* scale, const float* shift, int64_t vs, float* v) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < k; k0 += 8) {
    __m256 p[4][4];
    const __m256 sc = kPrologue ? _mm256_loadu_ps(scale + k0) : zero;
    const __m256 sh = kPrologue ? _mm256_loadu_ps(shift + k0) : zero;
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        if (!kInterior && offset[i][j] < 0) {
          p[i][j] = zero;
        } else {
          const __m256 val = _mm256_loadu_ps(x + offset[i][j] + k0);
          // max(0, v) keeps a NaN v, as torch.relu does
          p[i][j] = kPrologue ? _mm256_max_ps(zero, _mm256_fmadd_ps(val, sc, sh)) : val;
        }
      }
    }
    __m256 q[4][4];  // B^T p
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      q[0][j] = _mm256_sub_ps(p[0][j], p[2][j]);
      q[1][j] = _mm256_add_ps(p[1][j], p[2][j]);
      q[2][j] = _mm256_sub_ps(p[2][j], p[1][j]);
      q[3][j] = _mm256_sub_ps(p[1][j], p[3][j]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {  // (B^T p) B
      const __m256 r[4] = {_mm256_sub_ps(q[i][0], q[i][2]), _mm256_add_ps(q[i][1], q[i][2]),
                           _mm256_sub_ps(q[i][2], q[i][1]), _mm256_sub_ps(q[i][1], q[i][3])};
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        _mm256_store_ps(v + (i * 4 + j) * vs + k0, r[j]);
      }
    }
  }
}

// The input transform of a block's ``count`` tiles from ``pos`` on, into V (positions vs apart).
template <bool kPrologue>
void input_block(const ConvShape& d, const Tiles& t, const float* x, const float* scale, const float* shift,
                 TilePos pos, int64_t count, int64_t vs, float* v) {
  for (int64_t b = 0; b < count; ++b, pos.next(t)) {
    int64_t offset[4][4];
    bool interior = true;
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        const int64_t y = 2 * pos.ty - 1 + i, xx = 2 * pos.tx - 1 + j;
        const bool inside = y >= 0 && y < d.h && xx >= 0 && xx < d.w;
        offset[i][j] = inside ? ((pos.image * d.h + y) * d.w + xx) * d.k : -1;
        interior = interior && inside;
      }
    }
    if (interior) {
      input_tile<kPrologue, true>(x, d.k, offset, scale, shift, vs, v + b * d.k);
    } else {
      input_tile<kPrologue, false>(x, d.k, offset, scale, shift, vs, v + b * d.k);
    }
  }
}

// Rows per GEMM register block: 6 rows x 16 columns = 12 ymm accumulators, two B vectors and a
// broadcast.
constexpr int kRows = 6;

// c[r][j] = (kAccumulate: c[r][j] +) sum over s < steps of a[r * a_row + s * a_step] * b[s * b_step + j]
// for kR rows r and kV * 8 columns j; c's rows are c_row floats apart. The forward's 16 GEMMs take
// rows of tiles (a = V) by output channels (b = U); the weight gradient's take rows of output
// channels (a = dM) by input channels (b = V), reduced over the tiles.
template <int kR, int kV, bool kAccumulate>
__attribute__((target("avx2,fma"))) void gemm(const float* a, int64_t a_row, int64_t a_step, const float* b,
                                              int64_t b_step, int64_t steps, float* c, int64_t c_row) {
  __m256 acc[kR][kV];
#pragma GCC unroll 6
  for (int r = 0; r < kR; ++r) {
#pragma GCC unroll 2
    for (int j = 0; j < kV; ++j) {
      acc[r][j] = kAccumulate ? _mm256_loadu_ps(c + r * c_row + j * 8) : _mm256_setzero_ps();
    }
  }
  for (int64_t s = 0; s < steps; ++s) {
    __m256 w[kV];
#pragma GCC unroll 2
    for (int j = 0; j < kV; ++j) {
      w[j] = _mm256_loadu_ps(b + s * b_step + j * 8);
    }
#pragma GCC unroll 6
    for (int r = 0; r < kR; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * a_row + s * a_step);
#pragma GCC unroll 2
      for (int j = 0; j < kV; ++j) {
        acc[r][j] = _mm256_fmadd_ps(x, w[j], acc[r][j]);
      }
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < kR; ++r) {
#pragma GCC unroll 2
    for (int j = 0; j < kV; ++j) {
      _mm256_storeu_ps(c + r * c_row + j * 8, acc[r][j]);
    }
  }
}

using GemmFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t);

// The register block for ``rows`` rows (the last block of a dimension may have fewer than kRows)
// and 16 columns (kV = 2) or 8.
template <int kV, bool kAccumulate>
GemmFn gemm_for(int64_t rows) {
  switch (rows) {
    case 1: return gemm<1, kV, kAccumulate>;
    case 2: return gemm<2, kV, kAccumulate>;
    case 3: return gemm<3, kV, kAccumulate>;
    case 4: return gemm<4, kV, kAccumulate>;
    case 5: return gemm<5, kV, kAccumulate>;
    default: return gemm<kRows, kV, kAccumulate>;
  }
}

// How a convolution's tiles are cut into blocks of consecutive tiles, and where the 16 positions
// of a block's transformed operands sit: V (K values per tile) and a second operand of ``c``
// values per tile (M or the output gradient's transform).
struct Blocks {
  Tiles t;
  int64_t tiles, block, count;
  int64_t vs, ms;  // position strides of V and of the second operand, in floats

  Blocks(const ConvShape& d, int64_t c, int64_t min_blocks, int64_t multiple) : t{(d.h + 1) / 2, (d.w + 1) / 2} {
    tiles = d.n * t.per_image();
    block = kBlockBytes / (16 * (d.k + c) * static_cast<int64_t>(sizeof(float)));
    block = std::min(block, (tiles + min_blocks - 1) / min_blocks);
    block = std::max(multiple, block / multiple * multiple);
    count = (tiles + block - 1) / block;
    // A cache line between positions: at power-of-two strides the 16 positions of a tile, read and
    // written together by the transforms, would all fall into one L1 set.
    vs = block * d.k + static_cast<int64_t>(kCacheLine / sizeof(float));
    ms = block * c + static_cast<int64_t>(kCacheLine / sizeof(float));
  }
  int64_t first(int64_t item) const { return item * block; }
  int64_t size(int64_t item) const { return std::min(block, tiles - first(item)); }
  TilePos start(int64_t item) const {
    const int64_t f = first(item);
    return {f / t.per_image(), (f % t.per_image()) / t.tw, f % t.tw};
  }
};

}  // namespace
}  // namespace winograd
}  // namespace r2unet_fast
