"""Optimizer (AdamW/Adam without decay on norms and biases) and the warm-up + cosine schedule."""
from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from .config import TrainConfig


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay conv weights only: decaying BatchNorm scales and biases just fights the normalisation."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim > 1 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_step_supported(model: torch.nn.Module) -> bool:
    """Whether torch's fused Adam/AdamW (one kernel over all parameters) runs this model: floating
    point parameters on the CPU or a CUDA device."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in model.parameters())


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled decay) or Adam (L2 decay) at ``config.lr``, fused where supported: on a
    2-core CPU the per-parameter update of R2AttUNet (169 tensors) took 10-15 ms a step, the fused
    one 2-3.5 ms; the arithmetic is the same."""
    groups = parameter_groups(model, config.weight_decay)
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=config.lr, fused=fused_step_supported(model) or None)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR factor at ``step``: linear ramp over ``warmup_steps``, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """Per-step warm-up + cosine over ``config.epochs``; its state is just the step count, so a resumed
    run with more epochs continues on the stretched curve."""
    total = config.epochs * steps_per_epoch
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    return LambdaLR(optimizer, functools.partial(warmup_cosine, warmup_steps=warmup, total_steps=total,
                                                 min_ratio=config.min_lr_ratio))
