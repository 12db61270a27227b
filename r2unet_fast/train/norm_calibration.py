"""BatchNorm running statistics re-estimated before validating a young model.

During the first epoch the weights move fast (the LR warms up to its peak), while each
BatchNorm's running mean/variance is an exponential average (momentum 0.1) over the
last ~10 steps' batches, computed with older weights. Validation (eval mode) then
normalises with statistics that no longer match the layers' outputs: the Quick start's
first validation loss came out between 3 and 89 (depending on the machine) while its
training loss was 0.4. Re-estimating the statistics with the current
weights, as ``torch.optim.swa_utils.update_bn`` does (train-mode forwards under no_grad
with ``momentum=None``, i.e. a plain cumulative average), makes that first number
meaningful. It costs a few forward passes, so it runs only while the model is young:
the first epoch and the rest of the LR warm-up.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.transforms import make_rng
from .inference import to_input
from .runtime import autocast, seed_worker

# Batches per process used to re-estimate the statistics (at most one pass over the training set).
CALIBRATION_BATCHES = 8
# First word of the random stream that picks the calibration images, distinct from the other streams.
CALIBRATION_STREAM = 0xB7B7


def calibration_epochs(warmup_epochs: float) -> int:
    """How many first epochs get their statistics re-estimated: the first, and any other warm-up epoch."""
    return max(1, math.ceil(warmup_epochs))


class _FixedOrder(Sampler[int]):
    """Exactly these indices, in this order (no randomness, so the global RNG is never drawn)."""

    def __init__(self, indices: list[int]) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def calibration_indices(length: int, batch_size: int, rank: int, world_size: int, seed: int,
                        epoch: int) -> list[int]:
    """This rank's calibration images: whole batches, the same count on every rank (SyncBatchNorm
    forwards are collectives), drawn from a (seed, epoch) permutation of the training set."""
    batches = min(CALIBRATION_BATCHES, math.ceil(length / (batch_size * world_size)))
    order = make_rng(CALIBRATION_STREAM, seed, epoch).permutation(length)
    per_rank = batches * batch_size
    start = rank * per_rank
    # Wrap around when the set is smaller than batches * batch_size * world_size, so every batch is full.
    return [int(order[i % length]) for i in range(start, start + per_rank)]


def calibration_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                       workers: int) -> DataLoader:
    """The batches :func:`recalibrate_batchnorm` runs; its own generator keeps the global RNG untouched,
    so a resumed run stays bit-identical to an uninterrupted one."""
    indices = calibration_indices(len(dataset), batch_size, rank, world_size, seed, epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=_FixedOrder(indices), num_workers=workers,
                      worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, loader: Iterable[dict[str, Any]], device: torch.device,
                          amp: str = "off") -> int:
    """Replace every BatchNorm's running statistics with their average over ``loader``'s batches (each
    ``{"image": (N, 3, S, S)}``), computed with the current weights: train-mode forwards, no gradients.
    Momenta, ``num_batches_tracked`` and the train/eval mode are restored afterwards. Returns the number of
    BatchNorm layers recalibrated."""
    norms = [module for module in model.modules() if isinstance(module, _BatchNorm) and module.track_running_stats]
    if not norms:
        return 0
    saved = [(module.momentum, module.num_batches_tracked.clone()) for module in norms]
    was_training = model.training
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average over the calibration batches
    model.train()
    try:
        for batch in loader:
            with autocast(device, amp):
                model(to_input(batch["image"], device))
    finally:
        for module, (momentum, tracked) in zip(norms, saved):
            module.momentum = momentum
            module.num_batches_tracked.copy_(tracked)
        model.train(was_training)
    return len(norms)
