// Declarations shared by csrc/hybrid_loss.cpp (pixel loops), csrc/hybrid_loss_epilogue.cpp
// (sums -> loss and gradient coefficients) and csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace r2unet_fast {

constexpr int kNumSums = 5;  // I, P, T, B0, B1 per image (csrc/hybrid_loss.cpp)

// The scalar options of the loss, as the reference's hybrid_loss takes them.
struct LossOptions {
  double pos_weight, dice_weight, bce_weight, smooth;
  bool per_image;
};

// partial: (images, chunks, kNumSums) per-chunk sums, reduced per image in chunk order.
// Writes the loss and, per image, its gradient with respect to the five sums at
// grad_output 1 (coef, (images, kNumSums)); numel counts every pixel of the batch.
template <typename out_t>
void hybrid_loss_epilogue_from_partials(const double* partial, int64_t images, int64_t chunks, int64_t numel,
                                        const LossOptions& options, out_t* loss, out_t* coef);

void hybrid_loss_fwd(const at::Tensor& logits, const at::Tensor& target, at::Tensor loss, at::Tensor coef,
                     const LossOptions& options);
void hybrid_loss_bwd(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& coef,
                     const at::Tensor& grad_loss, at::Tensor grad_logits, const std::optional<at::Tensor>& grad_target);
void hybrid_loss_epilogue(const at::Tensor& partials, int64_t numel, at::Tensor loss, at::Tensor coef,
                          const LossOptions& options);

}  // namespace r2unet_fast
