// The recurrent conv step's backward pass on CPU: BN + ReLU backward with batch statistics
// (the per-channel sums, then ds and dF += ds), recomputing the ReLU mask from s. The work split
// is csrc/recurrent_conv_chunks.h; the forward passes are csrc/recurrent_conv.cpp.
#include "recurrent_conv.h"

#include <ATen/Dispatch.h>

#include <vector>

#include "recurrent_conv_chunks.h"

namespace r2unet_fast {
#define R2UNET_FAST_PASSES "recurrent_conv_bwd_passes.h"
#include "recurrent_conv_isa.h"

using namespace rc_detail;

void rc_bn_relu_bwd(const at::Tensor& s, const at::Tensor& dh, const at::Tensor& scale, const at::Tensor& shift,
                    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& gamma,
                    const std::optional<at::Tensor>& dfeed, const std::optional<at::Tensor>& ds,
                    at::Tensor sum_dy, at::Tensor sum_dy_xhat) {
  check_dtype(s);
  const Layout d = layout_of(s, "s");
  check_like(dh, s, d, "dh");
  for (const auto& [t, name] : {std::pair{dfeed, "dfeed"}, std::pair{ds, "ds"}}) {
    if (t.has_value()) {
      check_like(*t, s, d, name);
    }
  }
  for (const auto& [v, name] : {std::pair{scale, "scale"}, std::pair{shift, "shift"}, std::pair{mean, "mean"},
                                std::pair{rstd, "rstd"}, std::pair{gamma, "gamma"}, std::pair{sum_dy, "sum_dy"},
                                std::pair{sum_dy_xhat, "sum_dy_xhat"}}) {
    check_vector(v, d.c, s.scalar_type(), name);
  }
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "rc_bn_relu_bwd", [&] {
    const auto bn_relu_bwd = use_avx2_kernels() ? rc_avx2::bn_relu_bwd<scalar_t> : rc_base::bn_relu_bwd<scalar_t>;
    bn_relu_bwd(d, s.data_ptr<scalar_t>(), dh.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                          shift.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(),
                          gamma.data_ptr<scalar_t>(), mutable_data_or_null<scalar_t>(dfeed),
                          mutable_data_or_null<scalar_t>(ds), sum_dy.data_ptr<scalar_t>(),
                          sum_dy_xhat.data_ptr<scalar_t>());
  });
}

}  // namespace r2unet_fast
