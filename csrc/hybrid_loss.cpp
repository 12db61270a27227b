// Fused hybrid loss on CPU: one pass over logits+target for the per-image
// sums, a small epilogue (csrc/hybrid_loss_epilogue.cpp) from the sums to the
// loss and the per-image gradient coefficients, one pass (read logits+target,
// write the gradient) for the backward.
//
// Same contract as r2unet_fast/ops/triton/hybrid_loss.py: five sums per image
//   I = sum p*t, P = sum p, T = sum t,
//   B0 = sum (1-t)*softplus(x), B1 = sum t*softplus(-x)
// and, from c = dLoss/dsums (N, 5) at grad_output 1 and the grad_output go,
// with g = go*c and q = 1 - p,
//   dL/dx = p*q*(gI*t + gP) + gB0*(1-t)*p - gB1*t*q
//   dL/dt = gI*p + gT + gB1*softplus(-x) - gB0*softplus(x)
// softplus(x) is computed as x + softplus(-x) so that x = -inf gives NaN, as
// the reference's (1-t)*x + (...)*softplus(-x) does: non-finite logits give
// the reference's NaNs and infinities, never a finite stand-in.
//
// Parallel over (image, chunk) work items; partial sums land in a buffer
// indexed by work item and are reduced in a fixed order, so results do not
// depend on the thread count.

#include "hybrid_loss.h"

#include "fast_math.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace r2unet_fast {
namespace {

// A work item: big enough to amortise scheduling, small enough that 16
// images of 256x256 give every core many items.
constexpr int64_t kChunk = 8192;
// float lane sums are flushed into double every kBlock elements, so the
// float accumulators never sum more than kBlock / vector-width terms.
constexpr int64_t kBlock = 512;

// exp(-|x|), log1p(e) and the sign select of csrc/fast_math.h
template <typename T>
using Math = FastMath<T>;

// max(x, 0) by the sign bit, without a compare; unlike (|x| + x) / 2 it is
// inf, not NaN, at x = inf (a NaN x may give 0: callers add log1p(e), NaN then)
template <typename T>
inline T relu(T x) {
  return Math<T>::if_neg(x, T(0), x);
}

// softplus(-x) = -log(sigmoid(x)) and softplus(x) = x + softplus(-x) from
// l = log1p(exp(-|x|)). For finite x, x + relu(-x) is exactly relu(x); at
// x = -inf it is NaN, as is the reference's (1-t)*x + (...)*softplus(-x).
template <typename T>
struct Softplus {
  T neg, pos;
  static inline Softplus of(T x, T l) {
    const T neg = relu(-x) + l;
    return {neg, (x + relu(-x)) + l};
  }
};

// sigmoid(x) and 1 - sigmoid(x) from e = exp(-|x|), each without cancellation
template <typename T>
struct Sigmoid {
  T p, q;
  static inline Sigmoid of(T x, T e) {
    const T r = T(1) / (T(1) + e);
    return {Math<T>::if_neg(x, e * r, r), Math<T>::if_neg(x, r, e * r)};
  }
};

template <typename scalar_t, typename target_t>
R2UNET_VECTOR_CLONES void fwd_item(const scalar_t* x, const target_t* t, int64_t len, double* out) {
  using acc_t = at::opmath_type<scalar_t>;
  using M = Math<acc_t>;
  double total[kNumSums] = {0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t m = std::min(kBlock, len - b);
    const scalar_t* xb = x + b;
    const target_t* tb = t + b;
    acc_t s_pt = 0, s_p = 0, s_t = 0, s_b0 = 0, s_b1 = 0;
#pragma omp simd reduction(+ : s_pt, s_p, s_t, s_b0, s_b1)
    for (int64_t j = 0; j < m; ++j) {
      const acc_t xv = static_cast<acc_t>(xb[j]);
      const acc_t tv = static_cast<acc_t>(tb[j]);
      const acc_t e = M::exp_neg_abs(xv);
      const acc_t p = Sigmoid<acc_t>::of(xv, e).p;
      const Softplus<acc_t> sp = Softplus<acc_t>::of(xv, M::log1p_unit(e));
      s_pt += p * tv;
      s_p += p;
      s_t += tv;
      s_b0 += (acc_t(1) - tv) * sp.pos;
      s_b1 += tv * sp.neg;
    }
    total[0] += s_pt;
    total[1] += s_p;
    total[2] += s_t;
    total[3] += s_b0;
    total[4] += s_b1;
  }
  std::copy(total, total + kNumSums, out);
}

// g: this image's gradient of the loss with respect to its five sums, grad_output applied
template <typename scalar_t, typename target_t, bool kGradTarget>
R2UNET_VECTOR_CLONES void bwd_item(const scalar_t* x, const target_t* t, int64_t len,
                                   const at::opmath_type<scalar_t>* g, scalar_t* gx, target_t* gt) {
  using acc_t = at::opmath_type<scalar_t>;
  using M = Math<acc_t>;
  const acc_t g_i = g[0], g_p = g[1], g_t = g[2], g_b0 = g[3], g_b1 = g[4];
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const acc_t xv = static_cast<acc_t>(x[j]);
    const acc_t tv = static_cast<acc_t>(t[j]);
    const acc_t e = M::exp_neg_abs(xv);
    const auto [p, q] = Sigmoid<acc_t>::of(xv, e);
    gx[j] = static_cast<scalar_t>(p * q * (g_i * tv + g_p) + g_b0 * (acc_t(1) - tv) * p - g_b1 * tv * q);
    if constexpr (kGradTarget) {
      const Softplus<acc_t> sp = Softplus<acc_t>::of(xv, M::log1p_unit(e));
      gt[j] = static_cast<target_t>(g_i * p + g_t + g_b1 * sp.neg - g_b0 * sp.pos);
    }
  }
}

// Calls fn(work item, image, offset in the image, length) for every work item, in parallel.
template <typename Fn>
void for_each_chunk(int64_t num_images, int64_t numel_per_image, const Fn& fn) {
  const int64_t chunks = (numel_per_image + kChunk - 1) / kChunk;
  at::parallel_for(0, num_images * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t image = item / chunks;
      const int64_t start = (item % chunks) * kChunk;
      fn(item, image, start, std::min(kChunk, numel_per_image - start));
    }
  });
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Each image's elements must fill one dense block of memory, in the same
// order in both tensors (strides may differ only on size-1 dims).
void check_image_major(const char* name, const at::Tensor& t) {
  const int64_t per_image = t.numel() / t.size(0);
  TORCH_CHECK(t.is_non_overlapping_and_dense() && (t.size(0) == 1 || t.stride(0) == per_image), name,
              " must be dense with the batch dimension outermost (contiguous or channels_last), got strides ",
              t.strides());
}

void check_same_layout(const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ", t.sizes());
  for (int64_t d = 0; d < t.dim(); ++d) {
    TORCH_CHECK(t.size(d) == 1 || t.stride(d) == like.stride(d), name, " must have the memory layout of ",
                "logits (strides ", like.strides(), "), got ", t.strides());
  }
}

void check_inputs(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.device().is_cpu() && target.device().is_cpu(), "hybrid_loss (cpu) needs CPU tensors");
  TORCH_CHECK(logits.dim() >= 1 && logits.size(0) > 0 && logits.numel() > 0,
              "hybrid_loss needs a non-empty batch, got shape ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "logits must be floating point, got ", logits.scalar_type());
  const at::ScalarType acc = acc_type(logits.scalar_type());
  TORCH_CHECK(target.scalar_type() == logits.scalar_type() || target.scalar_type() == acc,
              "target dtype must be the logits dtype or ", acc, ", got ", target.scalar_type());
  check_image_major("logits", logits);
  check_same_layout("target", target, logits);
}

void check_buffer(const char* name, const at::Tensor& t, at::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.sizes() == sizes && t.scalar_type() == dtype && t.is_contiguous(), name,
              " must be a contiguous CPU tensor of shape ", sizes, " and dtype ", dtype, ", got ", t.sizes(), " ",
              t.scalar_type());
}

// Dispatches on the logits dtype, then on the target dtype (the logits
// dtype or its accumulation dtype, as Python passes it).
template <typename Fn>
void dispatch_dtypes(const at::Tensor& logits, const at::Tensor& target, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "hybrid_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (target.scalar_type() == logits.scalar_type()) {
      fn(scalar_t(), scalar_t());
    } else {
      fn(scalar_t(), acc_t());
    }
  });
}

}  // namespace

void hybrid_loss_fwd(const at::Tensor& logits, const at::Tensor& target, at::Tensor loss, at::Tensor coef,
                     const LossOptions& options) {
  check_inputs(logits, target);
  const int64_t n = logits.size(0);
  const int64_t per_image = logits.numel() / n;
  const at::ScalarType acc = acc_type(logits.scalar_type());
  check_buffer("loss", loss, {}, acc);
  check_buffer("coef", coef, {n, kNumSums}, acc);
  const int64_t chunks = (per_image + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(n * chunks * kNumSums));
  dispatch_dtypes(logits, target, [&](auto x_tag, auto t_tag) {
    using scalar_t = decltype(x_tag);
    using target_t = decltype(t_tag);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const target_t* t = target.const_data_ptr<target_t>();
    for_each_chunk(n, per_image, [&](int64_t item, int64_t image, int64_t start, int64_t len) {
      const int64_t offset = image * per_image + start;
      fwd_item<scalar_t, target_t>(x + offset, t + offset, len, partial.data() + item * kNumSums);
    });
  });
  AT_DISPATCH_FLOATING_TYPES(acc, "hybrid_loss_epilogue", [&] {
    hybrid_loss_epilogue_from_partials<scalar_t>(partial.data(), n, chunks, logits.numel(), options,
                                                 loss.data_ptr<scalar_t>(), coef.data_ptr<scalar_t>());
  });
}

void hybrid_loss_bwd(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& coef,
                     const at::Tensor& grad_loss, at::Tensor grad_logits, const std::optional<at::Tensor>& grad_target) {
  check_inputs(logits, target);
  const int64_t n = logits.size(0);
  const int64_t per_image = logits.numel() / n;
  const at::ScalarType acc = acc_type(logits.scalar_type());
  check_buffer("coef", coef, {n, kNumSums}, acc);
  check_buffer("grad_loss", grad_loss, {}, acc);
  TORCH_CHECK(grad_logits.scalar_type() == logits.scalar_type(), "grad_logits must have dtype ",
              logits.scalar_type());
  check_same_layout("grad_logits", grad_logits, logits);
  if (grad_target.has_value()) {
    TORCH_CHECK(grad_target->scalar_type() == target.scalar_type(), "grad_target must have dtype ",
                target.scalar_type());
    check_same_layout("grad_target", *grad_target, logits);
  }
  dispatch_dtypes(logits, target, [&](auto x_tag, auto t_tag) {
    using scalar_t = decltype(x_tag);
    using target_t = decltype(t_tag);
    using acc_t = at::opmath_type<scalar_t>;
    // the gradient with respect to the sums: coefficients at grad_output 1, times grad_output
    const acc_t go = *grad_loss.const_data_ptr<acc_t>();
    const acc_t* c = coef.const_data_ptr<acc_t>();
    std::vector<acc_t> g(static_cast<size_t>(n * kNumSums));
    for (int64_t k = 0; k < n * kNumSums; ++k) {
      g[k] = go * c[k];
    }
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const target_t* t = target.const_data_ptr<target_t>();
    scalar_t* gx = grad_logits.data_ptr<scalar_t>();
    target_t* gt = grad_target.has_value() ? grad_target->data_ptr<target_t>() : nullptr;
    for_each_chunk(n, per_image, [&](int64_t, int64_t image, int64_t start, int64_t len) {
      const int64_t offset = image * per_image + start;
      const acc_t* gi = g.data() + image * kNumSums;
      if (gt != nullptr) {
        bwd_item<scalar_t, target_t, true>(x + offset, t + offset, len, gi, gx + offset, gt + offset);
      } else {
        bwd_item<scalar_t, target_t, false>(x + offset, t + offset, len, gi, gx + offset, nullptr);
      }
    });
  });
}

}  // namespace r2unet_fast
