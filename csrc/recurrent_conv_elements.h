// The element loop of the recurrent conv step's CPU passes (csrc/recurrent_conv_passes.h,
// csrc/recurrent_conv_bwd_passes.h). It lives with them, not in csrc/recurrent_conv_chunks.h: the
// passes' lambdas are inlined into it only when both are compiled for the same instruction set.
// Included once per instruction set by csrc/recurrent_conv_isa.h, so that its functions take that
// copy's target options. No include guard, on purpose.

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

