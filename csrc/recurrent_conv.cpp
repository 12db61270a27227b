// The recurrent conv step's forward passes on CPU: add + batch statistics, and BN-apply + ReLU
// (+ feed, + residual). Each replaces three to five eager kernels and their intermediate tensors
// (see docs/kernels.md); the backward pass is csrc/recurrent_conv_bwd.cpp, the work split
// csrc/recurrent_conv_chunks.h.
#include "recurrent_conv.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "recurrent_conv_chunks.h"

namespace r2unet_fast {
namespace {

using namespace rc_detail;

// One chunk's per-channel mean (in double) and M2 (sum of squared deviations from that mean
// rounded to T), after out += feed when kFeed. The sums run in T over at most kChunk pixels and of
// x - pivot, the chunk's first value per channel: at a mean far from zero a plain float sum would
// lose the mean's low bits (measured: 3e-5 relative variance error at mean 1e4). The second sweep
// finds the chunk in cache, and deviations from the chunk mean do not cancel. `sums` is scratch.
template <typename T, bool kFeed>
void add_stats_chunk(const Layout& d, int64_t image, int64_t start, int64_t len, T* out, const T* feed, T* sums,
                     T* m2, double* mean) {
  const int64_t c = d.c;
  if (d.channels_last) {
    T* pivot = m2;  // m2 holds the pivots until the second sweep
    for (int64_t j = 0; j < len; ++j) {
      T* o = out + d.at(image, 0, start + j);
      if constexpr (kFeed) {
        const T* f = feed + d.at(image, 0, start + j);
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) {
          o[ch] += f[ch];
        }
      }
      if (j == 0) {
        std::copy(o, o + c, pivot);
        std::fill(sums, sums + c, T(0));
      }
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) {
        sums[ch] += o[ch] - pivot[ch];
      }
    }
    for (int64_t ch = 0; ch < c; ++ch) {
      mean[ch] = static_cast<double>(pivot[ch]) + static_cast<double>(sums[ch]) / static_cast<double>(len);
      sums[ch] = static_cast<T>(mean[ch]);
      m2[ch] = T(0);
    }
    for (int64_t j = 0; j < len; ++j) {
      const T* o = out + d.at(image, 0, start + j);
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) {
        const T dev = o[ch] - sums[ch];
        m2[ch] += dev * dev;
      }
    }
    return;
  }
  for (int64_t ch = 0; ch < c; ++ch) {
    T* o = out + d.at(image, ch, start);
    if constexpr (kFeed) {
      const T* f = feed + d.at(image, ch, start);
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        o[j] += f[j];
      }
    }
    const T pivot = o[0];
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < len; ++j) {
      sum += o[j] - pivot;
    }
    mean[ch] = static_cast<double>(pivot) + static_cast<double>(sum) / static_cast<double>(len);
    const T rounded = static_cast<T>(mean[ch]);
    T sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < len; ++j) {
      const T dev = o[j] - rounded;
      sq += dev * dev;
    }
    m2[ch] = sq;
  }
}

template <typename T>
void add_stats(const Layout& d, T* out, const T* feed, T* mean, T* var) {
  const int64_t items = d.items(), c = d.c;
  std::vector<double> chunk_mean(items * c), chunk_m2(items * c), chunk_n(items);
  for_each_chunk(d, [&](int64_t item, int64_t image, int64_t start, int64_t len) {
    std::vector<T> sums(c), m2(c);
    double* cm = chunk_mean.data() + item * c;
    if (feed != nullptr) {
      add_stats_chunk<T, true>(d, image, start, len, out, feed, sums.data(), m2.data(), cm);
    } else {
      add_stats_chunk<T, false>(d, image, start, len, out, feed, sums.data(), m2.data(), cm);
    }
    // M2 about the exact mean: sum (x - r)^2 = M2 + n (mean - r)^2 for the rounded mean r
    for (int64_t ch = 0; ch < c; ++ch) {
      const double shift = cm[ch] - static_cast<double>(static_cast<T>(cm[ch]));
      chunk_m2[item * c + ch] = static_cast<double>(m2[ch]) - static_cast<double>(len) * shift * shift;
    }
    chunk_n[item] = static_cast<double>(len);
  });
  // Chan et al.'s pairwise merge, in chunk order
  std::vector<double> m(chunk_mean.begin(), chunk_mean.begin() + c), s(chunk_m2.begin(), chunk_m2.begin() + c);
  double count = chunk_n[0];
  for (int64_t item = 1; item < items; ++item) {
    const double nb = chunk_n[item], total = count + nb;
    const double* mb = chunk_mean.data() + item * c;
    const double* sb = chunk_m2.data() + item * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      const double delta = mb[ch] - m[ch];
      m[ch] += delta * nb / total;
      s[ch] += sb[ch] + delta * delta * count * nb / total;
    }
    count = total;
  }
  for (int64_t ch = 0; ch < c; ++ch) {
    mean[ch] = static_cast<T>(m[ch]);
    var[ch] = static_cast<T>(s[ch] / count);
  }
}

template <typename T, bool kFeed, bool kResidual>
void bn_relu_impl(const Layout& d, const T* s, const T* feed, const T* scale, const T* shift, const T* residual,
                  T* h) {
  for_each_chunk(d, [&](int64_t, int64_t image, int64_t start, int64_t len) {
    for_each_element(d, image, start, len, [&](int64_t i, int64_t ch) {
      T v = s[i];
      if constexpr (kFeed) {
        v += feed[i];
      }
      v = v * scale[ch] + shift[ch];
      // torch.relu: NaN stays NaN
      const T r = v < T(0) ? T(0) : v;
      if constexpr (kResidual) {
        h[i] = r + residual[i];
      } else {
        h[i] = r;
      }
    });
  });
}

// The flags become template arguments: a pointer test inside the element loop is control flow,
// which GCC does not vectorize.
template <typename T>
void bn_relu(const Layout& d, const T* s, const T* feed, const T* scale, const T* shift, const T* residual, T* h) {
  if (feed != nullptr) {
    if (residual != nullptr) {
      bn_relu_impl<T, true, true>(d, s, feed, scale, shift, residual, h);
    } else {
      bn_relu_impl<T, true, false>(d, s, feed, scale, shift, residual, h);
    }
  } else if (residual != nullptr) {
    bn_relu_impl<T, false, true>(d, s, feed, scale, shift, residual, h);
  } else {
    bn_relu_impl<T, false, false>(d, s, feed, scale, shift, residual, h);
  }
}


// The checks of an add + statistics pass's out and feed; out's layout.
Layout check_add_stats(const at::Tensor& out, const std::optional<at::Tensor>& feed) {
  check_dtype(out);
  const Layout d = layout_of(out, "out");
  if (feed.has_value()) {
    check_like(*feed, out, d, "feed");
  }
  TORCH_CHECK(d.n * d.hw > 0, "recurrent_conv (cpu): batch statistics need at least one pixel");
  return d;
}

}  // namespace

void rc_add_stats(at::Tensor out, const std::optional<at::Tensor>& feed, at::Tensor mean, at::Tensor var) {
  const Layout d = check_add_stats(out, feed);
  check_vector(mean, d.c, out.scalar_type(), "mean");
  check_vector(var, d.c, out.scalar_type(), "var");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "rc_add_stats", [&] {
    add_stats<scalar_t>(d, out.data_ptr<scalar_t>(), data_or_null<scalar_t>(feed), mean.data_ptr<scalar_t>(),
                        var.data_ptr<scalar_t>());
  });
}

void rc_add_stats_affine(at::Tensor out, const std::optional<at::Tensor>& feed, const at::Tensor& gamma,
                         const at::Tensor& beta, int64_t row, double eps, at::Tensor stats, int64_t step) {
  const Layout d = check_add_stats(out, feed);
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == 5 && stats.size(2) == d.c && stats.is_contiguous() &&
                  stats.scalar_type() == out.scalar_type() && step >= 0 && step < stats.size(1),
              "recurrent_conv (cpu): stats must be a contiguous (5, steps, ", d.c, ") tensor of out's dtype and step "
              "one of its steps, got ", stats.sizes(), " ", stats.scalar_type(), " step ", step);
  for (const auto& [v, name] : {std::pair{gamma, "gamma"}, std::pair{beta, "beta"}}) {
    TORCH_CHECK(v.dim() == 2 && v.size(1) == d.c && v.is_contiguous() && v.scalar_type() == out.scalar_type() &&
                    row >= 0 && row < v.size(0),
                "recurrent_conv (cpu): ", name, " must be a contiguous (norms, ", d.c, ") tensor of out's dtype and row "
                "one of its rows, got ", v.sizes(), " row ", row);
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "rc_add_stats_affine", [&] {
    const int64_t steps = stats.size(1), c = d.c;
    scalar_t* base = stats.data_ptr<scalar_t>();
    scalar_t* field[5];
    for (int64_t f = 0; f < 5; ++f) {
      field[f] = base + (f * steps + step) * c;
    }
    add_stats<scalar_t>(d, out.data_ptr<scalar_t>(), data_or_null<scalar_t>(feed), field[0], field[1]);
    const scalar_t* g = gamma.data_ptr<scalar_t>() + row * c;
    const scalar_t* b = beta.data_ptr<scalar_t>() + row * c;
    // the BatchNorm as s * scale + shift, as ops/library/recurrent_conv.py's _affine computes it
    for (int64_t ch = 0; ch < c; ++ch) {
      const scalar_t rstd = scalar_t(1) / std::sqrt(field[1][ch] + static_cast<scalar_t>(eps));
      field[2][ch] = g[ch] * rstd;
      field[3][ch] = b[ch] - field[0][ch] * field[2][ch];
      field[4][ch] = rstd;
    }
  });
}

void rc_bn_relu(const at::Tensor& s, const std::optional<at::Tensor>& feed, const at::Tensor& scale,
                const at::Tensor& shift, const std::optional<at::Tensor>& residual, at::Tensor h) {
  check_dtype(s);
  const Layout d = layout_of(s, "s");
  for (const auto& [t, name] : {std::pair{feed, "feed"}, std::pair{residual, "residual"}}) {
    if (t.has_value()) {
      check_like(*t, s, d, name);
    }
  }
  check_like(h, s, d, "h");
  check_vector(scale, d.c, s.scalar_type(), "scale");
  check_vector(shift, d.c, s.scalar_type(), "shift");
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "rc_bn_relu", [&] {
    bn_relu<scalar_t>(d, s.data_ptr<scalar_t>(), data_or_null<scalar_t>(feed), scale.data_ptr<scalar_t>(),
                      shift.data_ptr<scalar_t>(), data_or_null<scalar_t>(residual), h.data_ptr<scalar_t>());
  });
}


}  // namespace r2unet_fast
