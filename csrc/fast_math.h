// Scalar math the CPU kernels share (csrc/hybrid_loss.cpp, csrc/attention_gate.cpp).
//
// The float versions work on bit patterns and integer compares and call no libm, so the
// loops that use them vectorise; double keeps libm and plain compares, as it serves
// gradcheck, not speed. NaN stays NaN everywhere.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Functions marked R2UNET_VECTOR_CLONES are compiled for AVX-512 and AVX2 as well as
// the baseline ISA, picked at load time by the CPU (GCC function multi-versioning):
// the extension is built without -march flags, so it runs on any x86-64.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define R2UNET_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define R2UNET_VECTOR_CLONES
#endif

namespace r2unet_fast {

// exp(-|x|), log1p(e) for e in [0, 1], and a select on the sign of x. The
// float versions avoid libm calls and floating-point compares (GCC will not
// if-convert a compare that may trap under the default -ftrapping-math), so
// loops using them vectorise; double keeps libm, as it serves gradcheck, not speed.
template <typename T>
struct FastMath;

template <>
struct FastMath<float> {
  static inline int32_t bits(float f) {
    int32_t i;
    std::memcpy(&i, &f, sizeof(i));
    return i;
  }
  static inline float from_bits(int32_t i) {
    float f;
    std::memcpy(&f, &i, sizeof(f));
    return f;
  }
  // all ones where the float with bits i is NaN, else 0
  static inline int32_t nan_mask(int32_t i) { return (0x7f800000 - (i & 0x7fffffff)) >> 31; }
  // a where x has its sign bit set, else b
  static inline float if_neg(float x, float a, float b) {
    const int32_t m = bits(x) >> 31;
    return from_bits((bits(a) & m) | (bits(b) & ~m));
  }
  static inline float exp_neg_abs(float x) {
    // |x| clamped to 87 by comparing bit patterns (non-negative floats order
    // like their bits): 2^n stays a normal float, and exp(-87) ~ 1.6e-38 is
    // zero for every use here (p, 1 - p and log1p(e) of such e). NaN's bits
    // lie above +inf's, so the clamp would make it 87: it is put back below.
    constexpr int32_t kBits87 = 0x42ae0000;
    const int32_t a = bits(x) & 0x7fffffff;
    const int32_t is_nan = nan_mask(a);
    const float y = -from_bits(a < kBits87 ? a : kBits87);
    // round to nearest: y*log2(e) <= 0 and the conversion truncates toward zero
    const int32_t n = static_cast<int32_t>(y * 1.44269504088896341f - 0.5f);
    const float fn = static_cast<float>(n);
    // Cody-Waite reduction (ln 2 = 0.693359375 - 2.12194440e-4), Cephes expf polynomial
    const float r = (y - fn * 0.693359375f) + fn * 2.12194440e-4f;
    float poly = 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    poly = poly * r * r + r + 1.0f;
    const float e = poly * from_bits((n + 127) << 23);
    return from_bits((bits(e) & ~is_nan) | (a & is_nan));
  }
  static inline float log1p_unit(float e) {
    // log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3: the series in s^2 <= 1/9
    // reaches float precision by s^13 and stays relative-accurate as e -> 0.
    const float s = e / (2.0f + e);
    const float z = s * s;
    float poly = 1.0f / 13.0f;
    poly = poly * z + 1.0f / 11.0f;
    poly = poly * z + 1.0f / 9.0f;
    poly = poly * z + 1.0f / 7.0f;
    poly = poly * z + 1.0f / 5.0f;
    poly = poly * z + 1.0f / 3.0f;
    poly = poly * z + 1.0f;
    return 2.0f * s * poly;
  }
};

template <>
struct FastMath<double> {
  static inline double if_neg(double x, double a, double b) { return std::signbit(x) ? a : b; }
  static inline double exp_neg_abs(double x) { return std::exp(-std::abs(x)); }
  static inline double log1p_unit(double e) { return std::log1p(e); }
};

}  // namespace r2unet_fast
