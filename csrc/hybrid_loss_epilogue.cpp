// The hybrid loss from its per-chunk sums: one pass over (images, chunks, 5)
// in a fixed order, in double. It writes the scalar loss and, per image, the
// loss's gradient with respect to that image's five sums at grad_output 1
// (the loss is linear in grad_output, so the backward only scales them).
//
// The formula is the reference's loss_from_sums (r2unet_fast/ops/reference.py),
// written out with the gradients autograd would take through it; the tests
// check the two against each other and both against a hand computation.
// Each gradient keeps the reference's operations (d(num/den) = g/den and
// -g*num/den^2), so a NaN or 0/0 shows up where the reference has one.

#include "hybrid_loss.h"

#include <ATen/Dispatch.h>

#include <vector>

namespace r2unet_fast {

template <typename out_t>
void hybrid_loss_epilogue_from_partials(const double* partial, int64_t images, int64_t chunks, int64_t numel,
                                        const LossOptions& o, out_t* loss, out_t* coef) {
  // d loss / d B0 and d B1: loss = bce_weight * (sum (B0 + pos_weight*B1) / numel) + ...
  const double g_b0 = o.bce_weight / static_cast<double>(numel);
  const double g_b1 = g_b0 * o.pos_weight;
  double bce = 0.0, dice_sum = 0.0, total[3] = {0.0, 0.0, 0.0};
  for (int64_t i = 0; i < images; ++i) {
    double s[kNumSums] = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (int64_t c = 0; c < chunks; ++c) {
      for (int k = 0; k < kNumSums; ++k) {
        s[k] += partial[(i * chunks + c) * kNumSums + k];
      }
    }
    bce += s[3] + o.pos_weight * s[4];
    out_t* row = coef + i * kNumSums;
    row[3] = static_cast<out_t>(g_b0);
    row[4] = static_cast<out_t>(g_b1);
    if (o.per_image) {
      // dice_i = num/den; loss += dice_weight * (1 - mean dice_i)
      const double num = 2.0 * s[0] + o.smooth, den = s[1] + s[2] + o.smooth;
      const double g_dice = -o.dice_weight / static_cast<double>(images);
      dice_sum += num / den;
      const double g_den = -g_dice * num / (den * den);
      row[0] = static_cast<out_t>(2.0 * (g_dice / den));
      row[1] = row[2] = static_cast<out_t>(g_den);
    } else {
      for (int k = 0; k < 3; ++k) {
        total[k] += s[k];
      }
    }
  }
  double dice = dice_sum / static_cast<double>(images);
  if (!o.per_image) {
    // one Dice over the pooled sums: every image gets the same coefficients
    const double num = 2.0 * total[0] + o.smooth, den = total[1] + total[2] + o.smooth;
    const double g_dice = -o.dice_weight;
    dice = num / den;
    const out_t g_i = static_cast<out_t>(2.0 * (g_dice / den));
    const out_t g_den = static_cast<out_t>(-g_dice * num / (den * den));
    for (int64_t i = 0; i < images; ++i) {
      coef[i * kNumSums + 0] = g_i;
      coef[i * kNumSums + 1] = coef[i * kNumSums + 2] = g_den;
    }
  }
  *loss = static_cast<out_t>(o.bce_weight * (bce / static_cast<double>(numel)) + o.dice_weight * (1.0 - dice));
}

template void hybrid_loss_epilogue_from_partials<float>(const double*, int64_t, int64_t, int64_t,
                                                        const LossOptions&, float*, float*);
template void hybrid_loss_epilogue_from_partials<double>(const double*, int64_t, int64_t, int64_t,
                                                         const LossOptions&, double*, double*);

void hybrid_loss_epilogue(const at::Tensor& partials, int64_t numel, at::Tensor loss, at::Tensor coef,
                          const LossOptions& options) {
  TORCH_CHECK(partials.device().is_cpu() && partials.dim() == 3 && partials.size(2) == kNumSums &&
                  partials.scalar_type() == at::kDouble && partials.is_contiguous(),
              "partials must be a contiguous float64 CPU tensor (images, chunks, 5), got ", partials.sizes(), " ",
              partials.scalar_type());
  const int64_t images = partials.size(0);
  TORCH_CHECK(images > 0 && numel > 0, "the epilogue needs images and pixels");
  TORCH_CHECK(loss.dim() == 0 && coef.sizes() == at::IntArrayRef({images, kNumSums}) && coef.is_contiguous() &&
                  loss.scalar_type() == coef.scalar_type(),
              "loss must be 0-d and coef a contiguous (images, 5) tensor of its dtype");
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "hybrid_loss_epilogue", [&] {
    hybrid_loss_epilogue_from_partials<scalar_t>(partials.const_data_ptr<double>(), images, partials.size(1), numel,
                                                 options, loss.data_ptr<scalar_t>(), coef.data_ptr<scalar_t>());
  });
}

}  // namespace r2unet_fast
