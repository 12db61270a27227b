// Shared by the recurrent conv step's CPU passes (csrc/recurrent_conv.cpp, forward, and
// csrc/recurrent_conv_bwd.cpp, backward): how a tensor is cut into work items, and the checks.
//
// Work items are fixed chunks of at most kChunk pixels of one image (all channels), run in
// parallel; per-chunk partial sums are reduced in chunk order in double, so every result has the
// same bits for any thread count. A chunk of a channels_last image is a (len, C) row block; of an
// NCHW image, C rows of len contiguous pixels at stride HW.
#pragma once

// The pass kernels (csrc/recurrent_conv_passes.h, csrc/recurrent_conv_bwd_passes.h) are compiled
// twice where this is 1: for the baseline instruction set and, under GCC's target pragma, for AVX2
// + FMA, chosen at run time (cpu_has_avx2_fma). The wider vectors halve their time on such CPUs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define R2UNET_FAST_AVX2_PASSES 1
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>

namespace r2unet_fast {
namespace rc_detail {

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

inline Layout layout_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "recurrent_conv (cpu): ", name, " must be (N, C, H, W), got ", t.sizes());
  const bool cl = !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(cl || t.is_contiguous(), "recurrent_conv (cpu): ", name,
              " must be NCHW-contiguous or channels_last (the Python launcher makes it so)");
  return {t.size(0), t.size(1), t.size(2) * t.size(3), cl};
}

inline void check_like(const at::Tensor& t, const at::Tensor& like, const Layout& d, const char* name) {
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), "recurrent_conv (cpu): ", name,
              " must have the shape and dtype of s, got ", t.sizes(), " ", t.scalar_type());
  const Layout e = layout_of(t, name);
  TORCH_CHECK(e.channels_last == d.channels_last || d.c == 1 || d.hw == 1, "recurrent_conv (cpu): ", name,
              " must have s's memory layout");
}

inline void check_vector(const at::Tensor& v, int64_t c, at::ScalarType dtype, const char* name) {
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

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

inline void check_dtype(const at::Tensor& s) {
  TORCH_CHECK(s.device().is_cpu(), "recurrent_conv (cpu): tensors must be on the CPU, got ", s.device());
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble,
              "recurrent_conv (cpu): activations must be float32 or float64 (the Python launcher computes half "
              "precision in float32), got ",
              s.scalar_type());
}

// Whether this CPU has AVX2 and FMA (false off x86-64).
inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// Set by tests (r2unet_fast.ops.cpu.baseline_kernels) to run the baseline copies on an AVX2 CPU.
inline std::atomic<bool>& baseline_forced() {
  static std::atomic<bool> forced{false};
  return forced;
}

// Whether the kernels run their AVX2 + FMA versions: the CPU has them and no test forbids it.
inline bool use_avx2_kernels() { return cpu_has_avx2_fma() && !baseline_forced().load(std::memory_order_relaxed); }

}  // namespace rc_detail
}  // namespace r2unet_fast
