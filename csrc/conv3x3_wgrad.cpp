// The weight gradient of a 3x3, stride-1, padding-1 convolution on channels_last tensors, with an
// optional BatchNorm-apply + ReLU applied to the input as it is loaded:
//   dw[o, i, kh, kw] = sum over (n, y, x) of g[n, o, y, x] * h[n, i, y + kh - 1, x + kw - 1],
//   h = relu(x * scale + shift) (or x itself), zero outside the image (the padding is on h).
// oneDNN's channels_last weight-gradient kernel runs at about half its forward's speed on AVX2;
// this one is an im2col GEMM: tiles of pixels are unfolded into an L2-sized (P, 9 C_in) buffer
// (h computed on the fly, so the recurrent step's h_{k-1} never goes to memory) and multiplied by
// the matching (P, C_out) rows of g. Fixed tile ranges accumulate into their own partial sums,
// added in order, so the result has the same bits for any thread count. On AVX2 CPUs float32 takes
// Winograd F(2x2, 3x3) (csrc/conv3x3_winograd_wgrad.cpp) where both channel counts are multiples
// of 8, else the direct kernel of csrc/conv3x3_wgrad_direct.cpp, each faster than this one at every
// channel count measured; the GEMM stays for float64 and other CPUs.
#include "recurrent_conv.h"

#include "conv3x3_wgrad_direct.h"
#include "conv3x3_winograd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

namespace r2unet_fast {
namespace {

// Unfolded values per tile (P * 9 * C_in): 128 K elements, 512 KB in float32, stay in L2.
constexpr int64_t kColumnElements = 1 << 17;
// Partial sums at most this many, and at most this many bytes together.
constexpr int64_t kMaxPartials = 4;
constexpr int64_t kPartialBytes = 16 << 20;

// col[j, (kh * 3 + kw) * C_in + i] for the tile's pixels p0 .. p0 + len - 1 (image-major order).
template <typename T, bool kPrologue>
void unfold_tile(const WgradShape& d, const T* x, const T* scale, const T* shift, int64_t p0, int64_t len, T* col) {
  const int64_t c = d.c_in, hw = d.h * d.w;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t p = p0 + j, image = p / hw, y = (p % hw) / d.w, xx = p % d.w;
    for (int64_t kh = 0; kh < 3; ++kh) {
      for (int64_t kw = 0; kw < 3; ++kw) {
        T* dst = col + j * 9 * c + (kh * 3 + kw) * c;
        const int64_t yy = y + kh - 1, xw = xx + kw - 1;
        if (yy < 0 || yy >= d.h || xw < 0 || xw >= d.w) {
          std::fill(dst, dst + c, T(0));
          continue;
        }
        const T* src = x + ((image * d.h + yy) * d.w + xw) * c;
        if constexpr (kPrologue) {
#pragma omp simd
          for (int64_t i = 0; i < c; ++i) {
            const T v = src[i] * scale[i] + shift[i];
            dst[i] = v < T(0) ? T(0) : v;  // torch.relu: NaN stays NaN
          }
        } else {
          std::copy(src, src + c, dst);
        }
      }
    }
  }
}

template <typename T, bool kPrologue>
void wgrad(const WgradShape& d, const T* g, const T* x, const T* scale, const T* shift, T* dw,
           const at::TensorOptions& options) {
  const int64_t row = 9 * d.c_in, pixels = d.pixels();
  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(pixels, kColumnElements / row));
  const int64_t tiles = (pixels + tile - 1) / tile;
  const int64_t partial_bytes = d.c_out * row * static_cast<int64_t>(sizeof(T));
  const int64_t partials =
      std::max<int64_t>(1, std::min({tiles, kMaxPartials, kPartialBytes / std::max<int64_t>(partial_bytes, 1)}));
  std::vector<at::Tensor> acc(partials);
  for (auto& a : acc) {
    a = at::zeros({d.c_out, row}, options);
  }
  at::parallel_for(0, partials, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> col(tile * row);
    const at::Tensor columns = at::from_blob(col.data(), {tile, row}, options);
    for (int64_t part = begin; part < end; ++part) {
      for (int64_t t = tiles * part / partials; t < tiles * (part + 1) / partials; ++t) {
        const int64_t p0 = t * tile, len = std::min(tile, pixels - p0);
        unfold_tile<T, kPrologue>(d, x, scale, shift, p0, len, col.data());
        const at::Tensor rows = at::from_blob(const_cast<T*>(g) + p0 * d.c_out, {len, d.c_out}, options);
        acc[part].addmm_(rows.t(), columns.narrow(0, 0, len));
      }
    }
  });
  // dw is channels_last: its memory order (o, kh, kw, i) is acc's (o, (kh * 3 + kw) * C_in + i)
  at::Tensor out = at::from_blob(dw, {d.c_out, row}, options);
  out.copy_(acc[0]);
  for (int64_t part = 1; part < partials; ++part) {
    out.add_(acc[part]);
  }
}

bool channels_last_4d(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace

void rc_conv3x3_wgrad(const at::Tensor& grad, const at::Tensor& input, const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& shift, at::Tensor dw, bool direct, bool winograd) {
  TORCH_CHECK(grad.device().is_cpu() && input.device().is_cpu() && dw.device().is_cpu(),
              "conv3x3_wgrad (cpu): tensors must be on the CPU");
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble,
              "conv3x3_wgrad (cpu): float32 or float64, got ", grad.scalar_type());
  TORCH_CHECK(input.scalar_type() == grad.scalar_type() && dw.scalar_type() == grad.scalar_type(),
              "conv3x3_wgrad (cpu): grad, input and dw must share a dtype");
  TORCH_CHECK(channels_last_4d(grad) && channels_last_4d(input),
              "conv3x3_wgrad (cpu): grad and input must be (N, C, H, W) channels_last, got strides ", grad.strides(),
              " and ", input.strides());
  const WgradShape d{input.size(0), input.size(1), grad.size(1), input.size(2), input.size(3)};
  TORCH_CHECK(grad.size(0) == d.n && grad.size(2) == d.h && grad.size(3) == d.w,
              "conv3x3_wgrad (cpu): grad ", grad.sizes(), " does not match input ", input.sizes());
  TORCH_CHECK(dw.dim() == 4 && dw.size(0) == d.c_out && dw.size(1) == d.c_in && dw.size(2) == 3 && dw.size(3) == 3 &&
                  dw.is_contiguous(at::MemoryFormat::ChannelsLast),
              "conv3x3_wgrad (cpu): dw must be a channels_last (", d.c_out, ", ", d.c_in, ", 3, 3) tensor, got ",
              dw.sizes(), " strides ", dw.strides());
  TORCH_CHECK(scale.has_value() == shift.has_value(), "conv3x3_wgrad (cpu): give both scale and shift, or neither");
  for (const auto& v : {scale, shift}) {
    TORCH_CHECK(!v.has_value() || (v->dim() == 1 && v->size(0) == d.c_in && v->is_contiguous() &&
                                   v->scalar_type() == grad.scalar_type()),
                "conv3x3_wgrad (cpu): scale and shift must be contiguous (", d.c_in, ",) vectors of grad's dtype");
  }
  if (d.pixels() == 0 || d.c_in == 0 || d.c_out == 0) {
    dw.zero_();
    return;
  }
  const bool fp32 = grad.scalar_type() == at::kFloat;
  if (winograd && fp32 && winograd::supported() && winograd::applies(d.c_in, d.c_out)) {
    const winograd::ConvShape shape{d.n, d.c_in, d.c_out, d.h, d.w};
    winograd::wgrad(shape, grad.data_ptr<float>(), input.data_ptr<float>(),
                    scale.has_value() ? scale->data_ptr<float>() : nullptr,
                    shift.has_value() ? shift->data_ptr<float>() : nullptr, dw.data_ptr<float>());
    return;
  }
  if (direct && fp32 && wgrad_direct::supported()) {
    wgrad_direct::wgrad(d, grad.data_ptr<float>(), input.data_ptr<float>(),
                        scale.has_value() ? scale->data_ptr<float>() : nullptr,
                        shift.has_value() ? shift->data_ptr<float>() : nullptr, dw.data_ptr<float>());
    return;
  }
  const auto options = grad.options().memory_format(at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "rc_conv3x3_wgrad", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* x = input.data_ptr<scalar_t>();
    if (scale.has_value()) {
      wgrad<scalar_t, true>(d, g, x, scale->data_ptr<scalar_t>(), shift->data_ptr<scalar_t>(),
                            dw.data_ptr<scalar_t>(), options);
    } else {
      wgrad<scalar_t, false>(d, g, x, nullptr, nullptr, dw.data_ptr<scalar_t>(), options);
    }
  });
}

}  // namespace r2unet_fast
