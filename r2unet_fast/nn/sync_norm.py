"""BatchNorm with statistics over the whole process group's batch, on any device.

``torch.nn.SyncBatchNorm`` runs on GPUs only; this one also runs on CPU with gloo, so a
CPU DDP run (and its tests) can use synchronized statistics. :func:`convert_sync_batchnorm`
picks torch's fused version for CUDA models and this one elsewhere.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn


# The public differentiable all_reduce is deprecated for a private module with no stable autograd
# story; it is still the documented way, so its warning is silenced here, narrowly.
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_reduce is deprecated",
                        category=FutureWarning)


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode mean and variance are those of the batch concatenated
    over all processes (two differentiable all-reduces: the sum, then the centred sum of squares,
    so no cancellation), with running statistics updated exactly as BatchNorm2d would on that
    batch. Eval mode, or a single process, is plain BatchNorm2d.

    Shapes: (N, C, H, W) -> (N, C, H, W).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _group_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = (0, 2, 3)
        compute = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = torch.tensor([x.numel() // x.shape[1]], dtype=compute.dtype, device=x.device)
        sums = all_reduce(torch.cat([compute.sum(dims), count]))
        total = sums[-1]
        mean = sums[:-1] / total
        centred = compute - mean[None, :, None, None]
        var = all_reduce(centred.square().sum(dims)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * total / (total - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def _convert(module: nn.Module, cls: type[nn.BatchNorm2d]) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, cls):
        like = module.weight if module.affine else module.running_mean
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                  device=like.device, dtype=like.dtype)
        new.load_state_dict(module.state_dict())
        return new.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, _convert(child, cls))
    return module


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d of ``module`` synchronized over the process group: torch's SyncBatchNorm
    for a CUDA model, :class:`DistributedBatchNorm2d` otherwise. Parameters, buffers and
    state_dict keys are kept; the module is changed in place where possible and returned."""
    device = next(module.parameters()).device
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module, DistributedBatchNorm2d)
