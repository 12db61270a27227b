// The attention gate's per-pixel passes on CPU (used by csrc/attention_gate.cpp, which
// runs them between the GEMMs of each chunk): the forward's relu, psi dot, sigmoid and
// x * psi, and the backward's chain back to da and the chunk's partial sums.
#pragma once

#include "fast_math.h"

#include <algorithm>
#include <cstdint>

namespace r2unet_fast {
namespace gate {

// Pixels per work item: the GEMMs of one chunk (F x kChunk x C) are big enough
// to run near peak on one core, and a (F x kChunk) stays in L2 between them and
// the pointwise pass. Results depend on it (it fixes the summation order).
constexpr int64_t kChunk = 2048;
// Pixels per block of the pointwise pass: its per-pixel temporaries stay in L1,
// and the float lane sums are flushed into double after every block.
constexpr int64_t kBlock = 256;

// relu and its mask with torch's NaN semantics, on top of csrc/fast_math.h. Float: by bit
// patterns and integer compares, so the loops vectorise; double: plain compares.
template <typename T>
struct Math;

template <>
struct Math<float> : FastMath<float> {
  // torch.relu: 0 for x < 0, x otherwise, NaN included (a NaN may carry the sign bit)
  static inline float relu(float x) {
    const int32_t i = bits(x);
    const int32_t zero = (i >> 31) & ~nan_mask(i);
    return from_bits(i & ~zero);
  }
  // threshold_backward: 0 where x <= 0, else v (NaN x passes v)
  static inline float relu_grad(float x, float v) {
    const int32_t i = bits(x);
    const int32_t zero = -static_cast<int32_t>(i <= 0) & ~nan_mask(i);
    return from_bits(bits(v) & ~zero);
  }
};

template <>
struct Math<double> : FastMath<double> {
  static inline double relu(double x) { return x < 0.0 ? 0.0 : x; }
  static inline double relu_grad(double x, double v) { return x <= 0.0 ? 0.0 : v; }
};

// sigmoid(z) and 1 - sigmoid(z), each without cancellation; NaN for NaN
template <typename T>
inline void sigmoid_pair(T z, T& p, T& q) {
  const T e = Math<T>::exp_neg_abs(z);
  const T r = T(1) / (T(1) + e);
  p = Math<T>::if_neg(z, e * r, r);
  q = Math<T>::if_neg(z, r, e * r);
}

// Sizes, and where channel c of pixel j of a chunk lies: base + c * cs + j * ps.
struct Dims {
  int64_t n, cx, cg, f, hw;
  bool channels_last;
  int64_t channel_stride() const { return channels_last ? 1 : hw; }
  int64_t pixel_stride(int64_t c) const { return channels_last ? c : 1; }
  int64_t offset(int64_t c, int64_t image, int64_t start) const {
    return channels_last ? (image * hw + start) * c : image * c * hw + start;
  }
  int64_t chunks_per_image() const { return (hw + kChunk - 1) / kChunk; }
  int64_t items() const { return n * chunks_per_image(); }
};

// z[j] = b_psi + sum_f w_psi[f] relu(a[f, j]) for the m pixels of a block; a has row stride lda
template <typename T>
inline void gate_logits(const T* a, int64_t lda, int64_t f_count, int64_t m, const T* w_psi, T b_psi, T* z) {
  for (int64_t j = 0; j < m; ++j) {
    z[j] = b_psi;
  }
  for (int64_t f = 0; f < f_count; ++f) {
    const T wf = w_psi[f];
    const T* af = a + f * lda;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      z[j] += wf * Math<T>::relu(af[j]);
    }
  }
}

// The forward's pointwise pass over one chunk: psi (len) and out = x * psi.
// x and out point at the chunk (d.offset); a is (F, len) contiguous.
template <typename T, bool kChannelsLast>
R2UNET_VECTOR_CLONES void fwd_chunk(const Dims& d, const T* a, int64_t len, const T* w_psi, T b_psi, const T* x,
                                    T* out, T* psi) {
  const int64_t hw = d.hw, cx = d.cx;
  T p[kBlock], z[kBlock];
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t m = std::min(kBlock, len - b);
    gate_logits(a + b, len, d.f, m, w_psi, b_psi, z);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      T pj, qj;
      sigmoid_pair(z[j], pj, qj);
      p[j] = pj;
      psi[b + j] = pj;
    }
    if constexpr (kChannelsLast) {
      for (int64_t j = 0; j < m; ++j) {
        const T* xj = x + (b + j) * cx;
        T* oj = out + (b + j) * cx;
        const T pj = p[j];
#pragma omp simd
        for (int64_t c = 0; c < cx; ++c) {
          oj[c] = xj[c] * pj;
        }
      }
    } else {
      for (int64_t c = 0; c < cx; ++c) {
        const T* xc = x + c * hw + b;
        T* oc = out + c * hw + b;
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) {
          oc[j] = xc[j] * p[j];
        }
      }
    }
  }
}

// Partial sums of one chunk: dbias (F), dw_psi (F), db_psi (1).
inline int64_t num_partials(int64_t f) { return 2 * f + 1; }

// The backward's pointwise pass over one chunk: writes dx = grad_out * psi, overwrites a
// (F, len) with da, and adds the chunk's sums of da, dq * relu(a) and dq into partial.
// gp: grad_psi at the chunk, or nullptr.
template <typename T, bool kChannelsLast>
R2UNET_VECTOR_CLONES void bwd_chunk(const Dims& d, T* a, int64_t len, const T* w_psi, T b_psi, const T* x,
                                    const T* go, const T* gp, T* dx, double* partial) {
  const int64_t hw = d.hw, cx = d.cx, f_count = d.f;
  double* p_bias = partial;
  double* p_wpsi = partial + f_count;
  double* p_bpsi = partial + 2 * f_count;
  T p[kBlock], q[kBlock], dq[kBlock];
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t m = std::min(kBlock, len - b);
    gate_logits(a + b, len, f_count, m, w_psi, b_psi, dq);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      T pj, qj;
      sigmoid_pair(dq[j], pj, qj);
      p[j] = pj;
      q[j] = qj;
    }
    // dq holds dpsi until it is scaled below
    if (gp != nullptr) {
      std::copy(gp + b, gp + b + m, dq);
    } else {
      std::fill(dq, dq + m, T(0));
    }
    if constexpr (kChannelsLast) {
      for (int64_t j = 0; j < m; ++j) {
        const T* xj = x + (b + j) * cx;
        const T* gj = go + (b + j) * cx;
        T* dj = dx + (b + j) * cx;
        const T pj = p[j];
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < cx; ++c) {
          s += gj[c] * xj[c];
          dj[c] = gj[c] * pj;
        }
        dq[j] += s;
      }
    } else {
      for (int64_t c = 0; c < cx; ++c) {
        const T* xc = x + c * hw + b;
        const T* gc = go + c * hw + b;
        T* dc = dx + c * hw + b;
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) {
          dq[j] += gc[j] * xc[j];
          dc[j] = gc[j] * p[j];
        }
      }
    }
    T s_bpsi = 0;
#pragma omp simd reduction(+ : s_bpsi)
    for (int64_t j = 0; j < m; ++j) {
      dq[j] = dq[j] * p[j] * q[j];
      s_bpsi += dq[j];
    }
    *p_bpsi += s_bpsi;
    for (int64_t f = 0; f < f_count; ++f) {
      const T wf = w_psi[f];
      T* af = a + f * len + b;
      T s_wpsi = 0, s_bias = 0;
#pragma omp simd reduction(+ : s_wpsi, s_bias)
      for (int64_t j = 0; j < m; ++j) {
        const T av = af[j];
        s_wpsi += dq[j] * Math<T>::relu(av);
        const T da = Math<T>::relu_grad(av, dq[j] * wf);
        s_bias += da;
        af[j] = da;
      }
      p_wpsi[f] += s_wpsi;
      p_bias[f] += s_bias;
    }
  }
}

}  // namespace gate
}  // namespace r2unet_fast
