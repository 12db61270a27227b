// The recurrent conv step's forward passes on CPU: add + batch statistics, and BN-apply + ReLU
// (+ feed, + residual). Each replaces three to five eager kernels and their intermediate tensors
// (see docs/kernels.md); the backward pass is csrc/recurrent_conv_bwd.cpp, the work split
// csrc/recurrent_conv_chunks.h.
#include "recurrent_conv.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "recurrent_conv_chunks.h"

namespace r2unet_fast {
#define R2UNET_FAST_PASSES "recurrent_conv_passes.h"
#include "recurrent_conv_isa.h"

namespace {

using namespace rc_detail;

// The checks of an add + statistics pass's out and feed; out's layout.
Layout check_add_stats(const at::Tensor& out, const std::optional<at::Tensor>& feed) {
  check_dtype(out);
  const Layout d = layout_of(out, "out");
  if (feed.has_value()) {
    check_like(*feed, out, d, "feed");
  }
  TORCH_CHECK(d.n * d.hw > 0, "recurrent_conv (cpu): batch statistics need at least one pixel");
  return d;
}

}  // namespace

void rc_add_stats(at::Tensor out, const std::optional<at::Tensor>& feed, at::Tensor mean, at::Tensor var) {
  const Layout d = check_add_stats(out, feed);
  check_vector(mean, d.c, out.scalar_type(), "mean");
  check_vector(var, d.c, out.scalar_type(), "var");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "rc_add_stats", [&] {
    const auto add_stats = use_avx2_kernels() ? rc_avx2::add_stats<scalar_t> : rc_base::add_stats<scalar_t>;
    add_stats(d, out.data_ptr<scalar_t>(), data_or_null<scalar_t>(feed), mean.data_ptr<scalar_t>(),
              var.data_ptr<scalar_t>());
  });
}

void rc_add_stats_affine(at::Tensor out, const std::optional<at::Tensor>& feed, const at::Tensor& gamma,
                         const at::Tensor& beta, int64_t row, double eps, at::Tensor stats, int64_t step) {
  const Layout d = check_add_stats(out, feed);
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == 5 && stats.size(2) == d.c && stats.is_contiguous() &&
                  stats.scalar_type() == out.scalar_type() && step >= 0 && step < stats.size(1),
              "recurrent_conv (cpu): stats must be a contiguous (5, steps, ", d.c, ") tensor of out's dtype and step "
              "one of its steps, got ", stats.sizes(), " ", stats.scalar_type(), " step ", step);
  for (const auto& [v, name] : {std::pair{gamma, "gamma"}, std::pair{beta, "beta"}}) {
    TORCH_CHECK(v.dim() == 2 && v.size(1) == d.c && v.is_contiguous() && v.scalar_type() == out.scalar_type() &&
                    row >= 0 && row < v.size(0),
                "recurrent_conv (cpu): ", name, " must be a contiguous (norms, ", d.c, ") tensor of out's dtype and row "
                "one of its rows, got ", v.sizes(), " row ", row);
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "rc_add_stats_affine", [&] {
    const int64_t steps = stats.size(1), c = d.c;
    scalar_t* base = stats.data_ptr<scalar_t>();
    scalar_t* field[5];
    for (int64_t f = 0; f < 5; ++f) {
      field[f] = base + (f * steps + step) * c;
    }
    const auto add_stats = use_avx2_kernels() ? rc_avx2::add_stats<scalar_t> : rc_base::add_stats<scalar_t>;
    add_stats(d, out.data_ptr<scalar_t>(), data_or_null<scalar_t>(feed), field[0], field[1]);
    const scalar_t* g = gamma.data_ptr<scalar_t>() + row * c;
    const scalar_t* b = beta.data_ptr<scalar_t>() + row * c;
    // the BatchNorm as s * scale + shift, as ops/library/recurrent_conv.py's _affine computes it
    for (int64_t ch = 0; ch < c; ++ch) {
      const scalar_t rstd = scalar_t(1) / std::sqrt(field[1][ch] + static_cast<scalar_t>(eps));
      field[2][ch] = g[ch] * rstd;
      field[3][ch] = b[ch] - field[0][ch] * field[2][ch];
      field[4][ch] = rstd;
    }
  });
}

void rc_update_running_stats(const at::Tensor& stats, const std::vector<at::Tensor>& running_means,
                             const std::vector<at::Tensor>& running_vars,
                             const std::optional<std::vector<at::Tensor>>& num_batches_tracked,
                             std::optional<double> momentum, int64_t count) {
  const int64_t norms = static_cast<int64_t>(running_means.size());
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) >= 2 && stats.is_contiguous() && stats.device().is_cpu(),
              "recurrent_conv (cpu): stats must be a contiguous CPU (5, steps, C) tensor, got ", stats.sizes());
  const int64_t steps = stats.size(1), c = stats.size(2);
  TORCH_CHECK(norms >= 1 && static_cast<int64_t>(running_vars.size()) == norms &&
                  (!num_batches_tracked.has_value() || static_cast<int64_t>(num_batches_tracked->size()) == norms),
              "recurrent_conv (cpu): one running mean, variance (and count) per BatchNorm");
  for (int64_t i = 0; i < norms; ++i) {
    for (const at::Tensor* v : {&running_means[i], &running_vars[i]}) {
      TORCH_CHECK(v->dim() == 1 && v->size(0) == c && v->is_contiguous() && v->device().is_cpu() &&
                      v->scalar_type() == stats.scalar_type(),
                  "recurrent_conv (cpu): running statistics must be contiguous CPU (", c, ",) tensors of the "
                  "statistics' dtype ", stats.scalar_type(), ", got ", v->sizes(), " ", v->scalar_type());
    }
    if (num_batches_tracked.has_value()) {
      const at::Tensor& n = (*num_batches_tracked)[i];
      TORCH_CHECK(n.numel() == 1 && n.scalar_type() == at::kLong && n.device().is_cpu(),
                  "recurrent_conv (cpu): num_batches_tracked must be one int64 CPU value per BatchNorm");
    }
  }
  const double unbias = static_cast<double>(count) / static_cast<double>(std::max<int64_t>(count - 1, 1));
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "rc_update_running_stats", [&] {
    const scalar_t* mean = stats.data_ptr<scalar_t>();
    const scalar_t* var = mean + steps * c;
    // step after step, as eager calls its BatchNorm t + 1 times (a shared one t + 1 times in order)
    for (int64_t k = 0; k < steps; ++k) {
      const int64_t i = std::min(k, norms - 1);
      double factor = momentum.value_or(0.0);
      if (num_batches_tracked.has_value()) {
        int64_t& tracked = *(*num_batches_tracked)[i].data_ptr<int64_t>();
        tracked += 1;
        if (!momentum.has_value()) {
          factor = 1.0 / static_cast<double>(tracked);
        }
      }
      const auto keep = static_cast<scalar_t>(1.0 - factor), take = static_cast<scalar_t>(factor);
      const auto take_var = static_cast<scalar_t>(factor * unbias);
      scalar_t* rm = running_means[i].data_ptr<scalar_t>();
      scalar_t* rv = running_vars[i].data_ptr<scalar_t>();
      for (int64_t ch = 0; ch < c; ++ch) {
        rm[ch] = rm[ch] * keep + mean[k * c + ch] * take;
        rv[ch] = rv[ch] * keep + var[k * c + ch] * take_var;
      }
    }
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
    const auto bn_relu = use_avx2_kernels() ? rc_avx2::bn_relu<scalar_t> : rc_base::bn_relu<scalar_t>;
    bn_relu(d, s.data_ptr<scalar_t>(), data_or_null<scalar_t>(feed), scale.data_ptr<scalar_t>(),
            shift.data_ptr<scalar_t>(), data_or_null<scalar_t>(residual), h.data_ptr<scalar_t>());
  });
}


}  // namespace r2unet_fast
