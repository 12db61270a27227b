// The recurrent conv step's three fused passes on CPU: add + batch statistics, BN-apply + ReLU
// (+ feed, + residual), and the BN + ReLU backward. Each replaces three to five eager kernels and
// their intermediate tensors (see docs/kernels.md).
//
// Work items are fixed chunks of at most kChunk pixels of one image (all channels), run in
// parallel; per-chunk partial sums are reduced in chunk order in double, so every result has the
// same bits for any thread count. A chunk of a channels_last image is a (len, C) row block; of an
// NCHW image, C rows of len contiguous pixels at stride HW.
#include "recurrent_conv.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace r2unet_fast {
namespace {

// Pixels per work item: a chunk of a 64-channel float image (256 KB) stays in L2 between the two
// sweeps of the statistics pass. It fixes the summation order.
constexpr int64_t kChunk = 1024;

struct Layout {
  int64_t n, c, hw;
  bool channels_last;
  int64_t chunks_per_image() const { return (hw + kChunk - 1) / kChunk; }
  int64_t items() const { return n * chunks_per_image(); }
  // element (image, channel, pixel)
  int64_t at(int64_t image, int64_t ch, int64_t p) const {
    return channels_last ? (image * hw + p) * c + ch : (image * c + ch) * hw + p;
  }
};

Layout layout_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "recurrent_conv (cpu): ", name, " must be (N, C, H, W), got ", t.sizes());
  const bool cl = !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(cl || t.is_contiguous(), "recurrent_conv (cpu): ", name,
              " must be NCHW-contiguous or channels_last (the Python launcher makes it so)");
  return {t.size(0), t.size(1), t.size(2) * t.size(3), cl};
}

void check_like(const at::Tensor& t, const at::Tensor& like, const Layout& d, const char* name) {
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), "recurrent_conv (cpu): ", name,
              " must have the shape and dtype of s, got ", t.sizes(), " ", t.scalar_type());
  const Layout e = layout_of(t, name);
  TORCH_CHECK(e.channels_last == d.channels_last || d.c == 1 || d.hw == 1, "recurrent_conv (cpu): ", name,
              " must have s's memory layout");
}

void check_vector(const at::Tensor& v, int64_t c, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == c && v.is_contiguous() && v.scalar_type() == dtype,
              "recurrent_conv (cpu): ", name, " must be a contiguous (", c, ",) ", dtype, " vector, got ",
              v.sizes(), " ", v.scalar_type());
}

// fn(item, image, start, len) for every chunk, in parallel
template <typename Fn>
void for_each_chunk(const Layout& d, const Fn& fn) {
  const int64_t chunks = d.chunks_per_image();
  at::parallel_for(0, d.items(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t image = item / chunks, start = (item % chunks) * kChunk;
      fn(item, image, start, std::min(kChunk, d.hw - start));
    }
  });
}

// fn(index, channel) over a chunk's elements in memory order
template <typename Fn>
inline void for_each_element(const Layout& d, int64_t image, int64_t start, int64_t len, const Fn& fn) {
  if (d.channels_last) {
    for (int64_t j = 0; j < len; ++j) {
      const int64_t base = d.at(image, 0, start + j);
#pragma omp simd
      for (int64_t ch = 0; ch < d.c; ++ch) {
        fn(base + ch, ch);
      }
    }
  } else {
    for (int64_t ch = 0; ch < d.c; ++ch) {
      const int64_t base = d.at(image, ch, start);
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        fn(base + j, ch);
      }
    }
  }
}

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

// Per chunk and channel: the sums of dy and dy * xhat, in T. A chunk holds at most kChunk pixels, so
// float partials lose at most ~kChunk ulps and vectorize at full width; chunks merge in double.
template <typename T>
void bn_relu_bwd_partials(const Layout& d, int64_t image, int64_t start, int64_t len, const T* s, const T* dh,
                          const T* scale, const T* shift, const T* mean, const T* rstd, T* pd, T* px) {
  const int64_t c = d.c;
  std::fill(pd, pd + c, T(0));
  std::fill(px, px + c, T(0));
  if (d.channels_last) {
    for (int64_t j = 0; j < len; ++j) {
      const int64_t base = d.at(image, 0, start + j);
      const T* sj = s + base;
      const T* dhj = dh + base;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) {
        // threshold_backward: a pre-activation <= 0 stops the gradient, a NaN one passes it. The
        // load comes first: a load under the condition is control flow, which stops vectorization.
        const T g = dhj[ch];
        const T dy = sj[ch] * scale[ch] + shift[ch] <= T(0) ? T(0) : g;
        pd[ch] += dy;
        px[ch] += dy * ((sj[ch] - mean[ch]) * rstd[ch]);
      }
    }
    return;
  }
  for (int64_t ch = 0; ch < c; ++ch) {
    const int64_t base = d.at(image, ch, start);
    const T* sc = s + base;
    const T* dhc = dh + base;
    const T a = scale[ch], b = shift[ch], m = mean[ch], r = rstd[ch];
    T sum_dy = 0, sum_dyx = 0;
#pragma omp simd reduction(+ : sum_dy, sum_dyx)
    for (int64_t j = 0; j < len; ++j) {
      const T g = dhc[j];
      const T dy = sc[j] * a + b <= T(0) ? T(0) : g;
      sum_dy += dy;
      sum_dyx += dy * ((sc[j] - m) * r);
    }
    pd[ch] = sum_dy;
    px[ch] = sum_dyx;
  }
}

// ds = the BN + ReLU input gradient, dfeed += it; which of the two are written is a template
// argument, since a pointer test inside the element loop stops vectorization.
template <typename T>
struct BnBwdApply {
  const T *s, *dh, *scale, *shift, *mean, *rstd, *a, *b, *k;
  T *dfeed, *ds;

  template <bool kDs, bool kDfeed>
  void run(const Layout& d) const {
    for_each_chunk(d, [&](int64_t, int64_t image, int64_t start, int64_t len) {
      for_each_element(d, image, start, len, [&](int64_t i, int64_t ch) {
        const T grad = dh[i];
        const T dy = s[i] * scale[ch] + shift[ch] <= T(0) ? T(0) : grad;
        const T g = a[ch] * (dy - b[ch] - (s[i] - mean[ch]) * rstd[ch] * k[ch]);
        if constexpr (kDs) {
          ds[i] = g;
        }
        if constexpr (kDfeed) {
          dfeed[i] += g;
        }
      });
    });
  }
};

template <typename T>
void bn_relu_bwd(const Layout& d, const T* s, const T* dh, const T* scale, const T* shift, const T* mean,
                 const T* rstd, const T* gamma, T* dfeed, T* ds, T* sum_dy, T* sum_dy_xhat) {
  const int64_t items = d.items(), c = d.c;
  std::vector<T> part_dy(items * c), part_dyx(items * c);
  for_each_chunk(d, [&](int64_t item, int64_t image, int64_t start, int64_t len) {
    bn_relu_bwd_partials(d, image, start, len, s, dh, scale, shift, mean, rstd, part_dy.data() + item * c,
                         part_dyx.data() + item * c);
  });
  std::vector<double> total_dy(c, 0.0), total_dyx(c, 0.0);
  for (int64_t item = 0; item < items; ++item) {
    for (int64_t ch = 0; ch < c; ++ch) {
      total_dy[ch] += static_cast<double>(part_dy[item * c + ch]);
      total_dyx[ch] += static_cast<double>(part_dyx[item * c + ch]);
    }
  }
  const double count = static_cast<double>(d.n * d.hw);
  std::vector<T> a(c), b(c), k(c);
  for (int64_t ch = 0; ch < c; ++ch) {
    sum_dy[ch] = static_cast<T>(total_dy[ch]);
    sum_dy_xhat[ch] = static_cast<T>(total_dyx[ch]);
    a[ch] = gamma[ch] * rstd[ch];
    b[ch] = static_cast<T>(total_dy[ch] / count);
    k[ch] = static_cast<T>(total_dyx[ch] / count);
  }
  if (dfeed == nullptr && ds == nullptr) {
    return;
  }
  const BnBwdApply<T> apply{s, dh, scale, shift, mean, rstd, a.data(), b.data(), k.data(), dfeed, ds};
  if (ds != nullptr && dfeed != nullptr) {
    apply.template run<true, true>(d);
  } else if (ds != nullptr) {
    apply.template run<true, false>(d);
  } else {
    apply.template run<false, true>(d);
  }
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

void check_dtype(const at::Tensor& s) {
  TORCH_CHECK(s.device().is_cpu(), "recurrent_conv (cpu): tensors must be on the CPU, got ", s.device());
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble,
              "recurrent_conv (cpu): activations must be float32 or float64 (the Python launcher computes half "
              "precision in float32), got ",
              s.scalar_type());
}

}  // namespace

void rc_add_stats(at::Tensor out, const std::optional<at::Tensor>& feed, at::Tensor mean, at::Tensor var) {
  check_dtype(out);
  const Layout d = layout_of(out, "out");
  if (feed.has_value()) {
    check_like(*feed, out, d, "feed");
  }
  check_vector(mean, d.c, out.scalar_type(), "mean");
  check_vector(var, d.c, out.scalar_type(), "var");
  TORCH_CHECK(d.n * d.hw > 0, "recurrent_conv (cpu): batch statistics need at least one pixel");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "rc_add_stats", [&] {
    add_stats<scalar_t>(d, out.data_ptr<scalar_t>(), data_or_null<scalar_t>(feed), mean.data_ptr<scalar_t>(),
                        var.data_ptr<scalar_t>());
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

void rc_bn_relu_bwd(const at::Tensor& s, const at::Tensor& dh, const at::Tensor& scale, const at::Tensor& shift,
                    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& gamma,
                    const std::optional<at::Tensor>& dfeed, const std::optional<at::Tensor>& ds,
                    at::Tensor sum_dy, at::Tensor sum_dy_xhat) {
  check_dtype(s);
  const Layout d = layout_of(s, "s");
  check_like(dh, s, d, "dh");
  for (const auto& [t, name] : {std::pair{dfeed, "dfeed"}, std::pair{ds, "ds"}}) {
    if (t.has_value()) {
      check_like(*t, s, d, name);
    }
  }
  for (const auto& [v, name] : {std::pair{scale, "scale"}, std::pair{shift, "shift"}, std::pair{mean, "mean"},
                                std::pair{rstd, "rstd"}, std::pair{gamma, "gamma"}, std::pair{sum_dy, "sum_dy"},
                                std::pair{sum_dy_xhat, "sum_dy_xhat"}}) {
    check_vector(v, d.c, s.scalar_type(), name);
  }
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "rc_bn_relu_bwd", [&] {
    bn_relu_bwd<scalar_t>(d, s.data_ptr<scalar_t>(), dh.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                          shift.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(),
                          gamma.data_ptr<scalar_t>(), mutable_data_or_null<scalar_t>(dfeed),
                          mutable_data_or_null<scalar_t>(ds), sum_dy.data_ptr<scalar_t>(),
                          sum_dy_xhat.data_ptr<scalar_t>());
  });
}

}  // namespace r2unet_fast
