// The recurrent conv step's forward pass kernels on CPU: add + batch statistics, and BN-apply +
// ReLU (+ feed, + residual); csrc/recurrent_conv.cpp checks the tensors and picks the copy.
// Included once per instruction set by csrc/recurrent_conv_isa.h, so that its functions take that
// copy's target options. No include guard, on purpose.

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
