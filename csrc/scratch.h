// A thread's scratch buffer for the CPU convolution kernels (csrc/conv3x3_wgrad_direct.cpp,
// csrc/conv3x3_winograd.cpp), kept between calls and grown when a call needs more: the kernels run
// dozens of times a training step, and a buffer allocated per call above glibc's mmap threshold is
// mapped and faulted in anew each time. It starts on a cache line, so no 8-float vector straddles
// two lines.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

namespace r2unet_fast {

constexpr std::size_t kCacheLine = 64;

class Scratch {
 public:
  explicit Scratch(const char* owner) : owner_(owner) {}

  float* get(int64_t count) {
    if (count > size_) {
      const std::size_t bytes =
          (static_cast<std::size_t>(count) * sizeof(float) + kCacheLine - 1) / kCacheLine * kCacheLine;
      data_.reset();
      size_ = 0;
      data_.reset(static_cast<float*>(std::aligned_alloc(kCacheLine, bytes)));
      TORCH_CHECK(data_ != nullptr, owner_, " (cpu): could not allocate ", bytes, " bytes of scratch");
      size_ = count;
    }
    return data_.get();
  }

 private:
  struct FreeDeleter {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float[], FreeDeleter> data_;
  int64_t size_ = 0;
  const char* owner_;
};

}  // namespace r2unet_fast
