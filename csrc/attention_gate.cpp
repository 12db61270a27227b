// Additive attention gate on CPU: the pointwise chain fused around ATen GEMMs.
//
//   a = W_x x + W_g g + bias          (F per pixel; two GEMMs)
//   psi = sigmoid(w_psi . relu(a) + b_psi),  out = x * psi
//
// Same contract as the reference (r2unet_fast/ops/reference.py, attention_gate)
// and the Triton twin. The work is split into fixed chunks of at most kChunk
// pixels of one image. Each chunk, in its own thread:
//   forward:  a (F x len) = bias + W_x x_c, += W_g g_c    (two single-threaded GEMMs)
//             one pass: relu, dot with w_psi, + b_psi, sigmoid -> psi; out = x * psi
//   backward: a read back from the forward's kept buffer (or recomputed as above when
//             there is none), then one pass:
//             psi again; dpsi = sum_c grad_out_c x_c + grad_psi; dx = grad_out * psi;
//             dq = dpsi psi (1 - psi); da = dq w_psi where a > 0, written over a;
//             partial sums of da, dq * relu(a) and dq;
//             then GEMMs: dx += W_x^T da, dg = W_g^T da, and the chunk's partial
//             dW_x = da x_c^T, dW_g = da g_c^T.
// The partials are reduced in chunk order (in double), so every result is
// independent of the thread count. Between the passes the only M x F tensor is the
// kept copy of a: on 2 CPU cores the GEMMs decide the time, and reading a back costs
// less than the two GEMMs that would recompute it. The per-pixel passes live in
// csrc/attention_gate_pointwise.h.
//
// Layouts: a chunk of an NCHW image is the (C, len) matrix at row stride HW; of a
// channels_last image it is the transposed (len, C) block of the pixel-major
// matrix. Both are GEMM operands as they stand, so neither layout is copied.
//
// NaN: relu keeps NaN (as torch.relu) and the relu mask is "a <= 0 -> 0", which
// passes the gradient at a NaN a (as torch's threshold_backward); the mask is a
// select, so a NaN dq where a <= 0 gives 0 there, as the reference does.

#include "attention_gate.h"
#include "attention_gate_pointwise.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace r2unet_fast {
namespace {

using namespace gate;

template <typename T>
at::Tensor matrix(const T* data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {row_stride, col_stride},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// The weights as GEMM operands and pointwise constants.
template <typename T>
struct Weights {
  at::Tensor w_x, w_g, w_x_t, w_g_t;  // (F, Cx), (F, Cg), (Cx, F), (Cg, F)
  const T* bias_data;
  const T* w_psi;
  T b_psi;
  Weights(const Dims& d, const at::Tensor& wx, const at::Tensor& wg, const at::Tensor& b, const at::Tensor& wpsi,
          const at::Tensor& bpsi)
      : w_x(matrix(wx.const_data_ptr<T>(), d.f, d.cx, d.cx, 1)),
        w_g(matrix(wg.const_data_ptr<T>(), d.f, d.cg, d.cg, 1)),
        w_x_t(matrix(wx.const_data_ptr<T>(), d.cx, d.f, 1, d.cx)),
        w_g_t(matrix(wg.const_data_ptr<T>(), d.cg, d.f, 1, d.cg)),
        bias_data(b.const_data_ptr<T>()),
        w_psi(wpsi.const_data_ptr<T>()),
        b_psi(*bpsi.const_data_ptr<T>()) {}
};

// A chunk of a (N, C, H, W) tensor as the (C, len) matrix of its pixels, in either layout.
template <typename T>
at::Tensor chunk_matrix(const Dims& d, const T* data, int64_t c, int64_t image, int64_t start, int64_t len) {
  return matrix(data + d.offset(c, image, start), c, len, d.channel_stride(), d.pixel_stride(c));
}

// The transposed chunk: (len, C).
template <typename T>
at::Tensor chunk_matrix_t(const Dims& d, const T* data, int64_t c, int64_t image, int64_t start, int64_t len) {
  return matrix(data + d.offset(c, image, start), len, c, d.pixel_stride(c), d.channel_stride());
}

// a (F x len, contiguous) = bias + W_x x_c + W_g g_c: two single-threaded GEMMs (inside a parallel region)
template <typename T>
void preactivation(const Dims& d, const Weights<T>& w, const T* x, const T* g, int64_t image, int64_t start,
                   int64_t len, T* a) {
  at::Tensor a_t = matrix(a, d.f, len, len, 1);
  at::cpu::addmm_out(a_t, matrix(w.bias_data, d.f, len, 1, 0), w.w_x, chunk_matrix(d, x, d.cx, image, start, len));
  at::cpu::addmm_out(a_t, a_t, w.w_g, chunk_matrix(d, g, d.cg, image, start, len));
}

// Calls fn(item, image, start, len, a) for every chunk, in parallel; a is a
// per-thread scratch of F x kChunk elements.
template <typename T, typename Fn>
void for_each_chunk(const Dims& d, const Fn& fn) {
  const int64_t chunks = d.chunks_per_image();
  at::parallel_for(0, d.items(), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> a(static_cast<size_t>(d.f * std::min(kChunk, d.hw)));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t image = item / chunks;
      const int64_t start = (item % chunks) * kChunk;
      fn(item, image, start, std::min(kChunk, d.hw - start), a.data());
    }
  });
}

// out[e] = sum over items k, in order, of partial[k * count + e] (in double)
template <typename P, typename T>
void reduce_in_order(const P* partial, int64_t items, int64_t count, T* out) {
  at::parallel_for(0, count, 1024, [&](int64_t begin, int64_t end) {
    std::vector<double> acc(static_cast<size_t>(end - begin), 0.0);
    for (int64_t k = 0; k < items; ++k) {
      const P* pk = partial + k * count + begin;
      for (int64_t e = 0; e < end - begin; ++e) {
        acc[e] += static_cast<double>(pk[e]);
      }
    }
    for (int64_t e = 0; e < end - begin; ++e) {
      out[begin + e] = static_cast<T>(acc[e]);
    }
  });
}

// ---- input checks ----

void check_cpu(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "attention_gate (cpu): ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "attention_gate (cpu): ", name, " must be a CPU tensor, got ", t.device());
}

void check_param(const char* name, const at::Tensor& t, at::IntArrayRef sizes, at::ScalarType dtype) {
  check_cpu(name, t);
  TORCH_CHECK(t.sizes() == sizes, "attention_gate (cpu): ", name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "attention_gate (cpu): ", name, " must have dtype ", dtype,
              " (the dtype x is computed in), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "attention_gate (cpu): ", name, " must be contiguous, got strides ", t.strides());
}

at::MemoryFormat format_of(const Dims& d) {
  return d.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// A tensor that must be laid out like x (or g): shape, dtype and the chosen memory format.
void check_like(const char* name, const at::Tensor& t, const at::Tensor& like, const Dims& d) {
  check_cpu(name, t);
  TORCH_CHECK(t.sizes() == like.sizes(), "attention_gate (cpu): ", name, " must have shape ", like.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "attention_gate (cpu): ", name, " must have dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(format_of(d)), "attention_gate (cpu): ", name, " must be ",
              d.channels_last ? "channels_last" : "contiguous (NCHW)", " like x and g, got strides ", t.strides());
}

Dims check_inputs(const at::Tensor& x, const at::Tensor& g, const at::Tensor& w_x, const at::Tensor& w_g,
                  const at::Tensor& bias, const at::Tensor& w_psi, const at::Tensor& b_psi) {
  check_cpu("x", x);
  check_cpu("g", g);
  TORCH_CHECK(x.dim() == 4 && g.dim() == 4, "attention_gate (cpu): x and g must be 4-D (N, C, H, W), got shapes ",
              x.sizes(), " and ", g.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "attention_gate (cpu): x must be float32 or float64 (the Python launcher computes bfloat16 and "
              "float16 in float32), got ",
              x.scalar_type());
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), "attention_gate (cpu): g must have x's dtype ", x.scalar_type(),
              ", got ", g.scalar_type());
  TORCH_CHECK(g.size(0) == x.size(0) && g.size(2) == x.size(2) && g.size(3) == x.size(3),
              "attention_gate (cpu): x and g must share N, H and W, got shapes ", x.sizes(), " and ", g.sizes());
  TORCH_CHECK(x.numel() > 0 && g.numel() > 0, "attention_gate (cpu): needs non-empty x and g, got shapes ",
              x.sizes(), " and ", g.sizes());
  TORCH_CHECK(w_x.dim() == 2 && w_x.size(0) > 0, "attention_gate (cpu): w_x must be (F, Cx) with F > 0, got ",
              w_x.sizes());
  Dims d{x.size(0), x.size(1), g.size(1), w_x.size(0), x.size(2) * x.size(3), false};
  if (x.is_contiguous() && g.is_contiguous()) {
    d.channels_last = false;
  } else if (x.is_contiguous(at::MemoryFormat::ChannelsLast) && g.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    d.channels_last = true;
  } else {
    TORCH_CHECK(false, "attention_gate (cpu): x and g must both be contiguous (NCHW) or both channels_last, got "
                "strides ", x.strides(), " and ", g.strides());
  }
  const at::ScalarType dtype = x.scalar_type();
  check_param("w_x", w_x, {d.f, d.cx}, dtype);
  check_param("w_g", w_g, {d.f, d.cg}, dtype);
  check_param("bias", bias, {d.f}, dtype);
  check_param("w_psi", w_psi, {d.f}, dtype);
  check_param("b_psi", b_psi, {1}, dtype);
  return d;
}

}  // namespace

int64_t attention_gate_kept_numel(int64_t n, int64_t h, int64_t w, int64_t f) { return n * h * w * f; }

namespace {

// A chunk's slot in the kept buffer: its (F, len) block, packed in pixel order, so every element
// of the buffer is written.
template <typename T>
T* kept_slot(const Dims& d, const std::optional<at::Tensor>& kept, int64_t image, int64_t start) {
  return kept.has_value() ? kept->data_ptr<T>() + (image * d.hw + start) * d.f : nullptr;
}

void check_kept(const Dims& d, const std::optional<at::Tensor>& kept, at::ScalarType dtype) {
  if (kept.has_value()) {
    TORCH_CHECK(kept->scalar_type() == dtype && kept->is_contiguous() && kept->device().is_cpu() &&
                    kept->numel() == d.n * d.hw * d.f,
                "attention_gate (cpu): kept must be a contiguous CPU buffer of ", dtype, " with ",
                d.n * d.hw * d.f, " elements, got ", kept->scalar_type(),
                " with ", kept->numel());
  }
}

}  // namespace

void attention_gate_fwd(const at::Tensor& x, const at::Tensor& g, const at::Tensor& w_x, const at::Tensor& w_g,
                        const at::Tensor& bias, const at::Tensor& w_psi, const at::Tensor& b_psi, at::Tensor out,
                        at::Tensor psi, const std::optional<at::Tensor>& kept) {
  const Dims d = check_inputs(x, g, w_x, w_g, bias, w_psi, b_psi);
  check_kept(d, kept, x.scalar_type());
  check_like("out", out, x, d);
  check_param("psi", psi, {d.n, 1, x.size(2), x.size(3)}, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_gate_fwd", [&] {
    using T = scalar_t;
    const Weights<T> w(d, w_x, w_g, bias, w_psi, b_psi);
    const T* xp = x.const_data_ptr<T>();
    const T* gp = g.const_data_ptr<T>();
    T* op = out.data_ptr<T>();
    T* pp = psi.data_ptr<T>();
    for_each_chunk<T>(d, [&](int64_t, int64_t image, int64_t start, int64_t len, T* a) {
      preactivation(d, w, xp, gp, image, start, len, a);
      if (T* slot = kept_slot<T>(d, kept, image, start)) {
        std::copy(a, a + d.f * len, slot);
      }
      const int64_t ox = d.offset(d.cx, image, start);
      T* psi_c = pp + image * d.hw + start;
      if (d.channels_last) {
        fwd_chunk<T, true>(d, a, len, w.w_psi, w.b_psi, xp + ox, op + ox, psi_c);
      } else {
        fwd_chunk<T, false>(d, a, len, w.w_psi, w.b_psi, xp + ox, op + ox, psi_c);
      }
    });
  });
}

void attention_gate_bwd(const at::Tensor& x, const at::Tensor& g, const at::Tensor& w_x, const at::Tensor& w_g,
                        const at::Tensor& bias, const at::Tensor& w_psi, const at::Tensor& b_psi,
                        const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_psi, at::Tensor dx,
                        at::Tensor dg, at::Tensor dw_x, at::Tensor dw_g, at::Tensor dbias, at::Tensor dw_psi,
                        at::Tensor db_psi, const std::optional<at::Tensor>& kept) {
  const Dims d = check_inputs(x, g, w_x, w_g, bias, w_psi, b_psi);
  check_kept(d, kept, x.scalar_type());
  check_like("grad_out", grad_out, x, d);
  if (grad_psi.has_value()) {
    check_param("grad_psi", *grad_psi, {d.n, 1, x.size(2), x.size(3)}, x.scalar_type());
  }
  check_like("dx", dx, x, d);
  check_like("dg", dg, g, d);
  check_param("dw_x", dw_x, {d.f, d.cx}, x.scalar_type());
  check_param("dw_g", dw_g, {d.f, d.cg}, x.scalar_type());
  check_param("dbias", dbias, {d.f}, x.scalar_type());
  check_param("dw_psi", dw_psi, {d.f}, x.scalar_type());
  check_param("db_psi", db_psi, {1}, x.scalar_type());
  const int64_t items = d.items();
  const int64_t np = num_partials(d.f);
  std::vector<double> partial(static_cast<size_t>(items * np), 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_gate_bwd", [&] {
    using T = scalar_t;
    const Weights<T> w(d, w_x, w_g, bias, w_psi, b_psi);
    const T* xp = x.const_data_ptr<T>();
    const T* gp = g.const_data_ptr<T>();
    const T* gop = grad_out.const_data_ptr<T>();
    const T* gpsi = grad_psi.has_value() ? grad_psi->const_data_ptr<T>() : nullptr;
    T* dxp = dx.data_ptr<T>();
    T* dgp = dg.data_ptr<T>();
    // per-chunk dW_x and dW_g, reduced in chunk order below
    std::vector<T> part_wx(static_cast<size_t>(items * d.f * d.cx));
    std::vector<T> part_wg(static_cast<size_t>(items * d.f * d.cg));
    for_each_chunk<T>(d, [&](int64_t item, int64_t image, int64_t start, int64_t len, T* a) {
      // a copy, not the kept slot itself: the pass below turns a into da in place, and the kept
      // buffer must survive a second backward (retain_graph)
      if (const T* slot = kept_slot<T>(d, kept, image, start)) {
        std::copy(slot, slot + d.f * len, a);
      } else {
        preactivation(d, w, xp, gp, image, start, len, a);
      }
      const int64_t ox = d.offset(d.cx, image, start);
      const T* gpsi_c = gpsi != nullptr ? gpsi + image * d.hw + start : nullptr;
      double* part = partial.data() + item * np;
      if (d.channels_last) {
        bwd_chunk<T, true>(d, a, len, w.w_psi, w.b_psi, xp + ox, gop + ox, gpsi_c, dxp + ox, part);
      } else {
        bwd_chunk<T, false>(d, a, len, w.w_psi, w.b_psi, xp + ox, gop + ox, gpsi_c, dxp + ox, part);
      }
      const at::Tensor da = matrix<T>(a, d.f, len, len, 1);
      at::Tensor dx_c = chunk_matrix<T>(d, dxp, d.cx, image, start, len);
      at::cpu::addmm_out(dx_c, dx_c, w.w_x_t, da);
      at::Tensor dg_c = chunk_matrix<T>(d, dgp, d.cg, image, start, len);
      at::cpu::mm_out(dg_c, w.w_g_t, da);
      at::Tensor pwx = matrix<T>(part_wx.data() + item * d.f * d.cx, d.f, d.cx, d.cx, 1);
      at::cpu::mm_out(pwx, da, chunk_matrix_t<T>(d, xp, d.cx, image, start, len));
      at::Tensor pwg = matrix<T>(part_wg.data() + item * d.f * d.cg, d.f, d.cg, d.cg, 1);
      at::cpu::mm_out(pwg, da, chunk_matrix_t<T>(d, gp, d.cg, image, start, len));
    });
    reduce_in_order(part_wx.data(), items, d.f * d.cx, dw_x.data_ptr<T>());
    reduce_in_order(part_wg.data(), items, d.f * d.cg, dw_g.data_ptr<T>());
    std::vector<T> sums(static_cast<size_t>(np));
    reduce_in_order(partial.data(), items, np, sums.data());
    std::copy(sums.begin(), sums.begin() + d.f, dbias.data_ptr<T>());
    std::copy(sums.begin() + d.f, sums.begin() + 2 * d.f, dw_psi.data_ptr<T>());
    *db_psi.data_ptr<T>() = sums[2 * d.f];
  });
}

}  // namespace r2unet_fast
