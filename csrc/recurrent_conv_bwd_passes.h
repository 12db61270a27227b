// The recurrent conv step's backward pass kernels on CPU: BN + ReLU backward with batch
// statistics; csrc/recurrent_conv_bwd.cpp checks the tensors and picks the copy.
// Included once per instruction set by csrc/recurrent_conv_isa.h, so that its functions take that
// copy's target options. No include guard, on purpose.

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
