"""Datasets of a run (with the split it keeps) and DataLoaders."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..data import build_datasets
from ..data.registry import file_datasets, resolve_split, sample_splits, scheme_samples
from ..data.stored_split import absolute_root, apply_split, split_record
from .config import TrainConfig, UsageError
from .distributed import DistContext, ShardSampler
from .runtime import seed_worker

FILE_DATASETS: tuple[str, ...] = ("isic2017", "ph2", "folder")
# Where a dataset's folder is looked up when --data is not given.
DATA_ENV: dict[str, str] = {"isic2017": "R2UNET_FAST_ISIC2017", "ph2": "R2UNET_FAST_PH2"}
_DATA_HINT = {"isic2017": "the folder holding ISIC-2017_Training_Data/ etc.",
              "ph2": "the folder holding 'PH2 Dataset images/'",
              "folder": "a folder with images/ and masks/"}


def data_root(dataset: str, data: str | None) -> Path | None:
    """The dataset folder: ``data``, else the dataset's environment variable; None for synthetic."""
    if dataset not in FILE_DATASETS:
        if data is not None:
            raise UsageError(f"--dataset {dataset} is generated and reads no files; drop --data {data}")
        return None
    if data is None and os.environ.get(DATA_ENV.get(dataset, "")):
        data = os.environ[DATA_ENV[dataset]]
    if data is None:
        env = f" (or set ${DATA_ENV[dataset]})" if dataset in DATA_ENV else ""
        raise UsageError(f"--dataset {dataset} needs --data PATH{env}: {_DATA_HINT[dataset]}")
    return Path(data).expanduser()


def build_splits(config: TrainConfig, *, split: str | None = None, augment: bool | None = None) -> dict[str, Dataset]:
    """The config's datasets as the data is now (train/val/test, or "all"): ``split``/``augment`` override the
    config's. A run uses :func:`run_splits`, which keeps the split it started with."""
    return build_datasets(
        config.dataset, data_root(config.dataset, config.data), split=config.split if split is None else split,
        image_size=config.image_size, seed=config.seed, augment=config.augment if augment is None else augment,
        cache_dir=_cache_dir(config), synthetic_sizes=tuple(config.synthetic_sizes))


def _cache_dir(config: TrainConfig) -> Path | None:
    return None if config.cache_dir is None else Path(config.cache_dir)


@dataclass
class RunData:
    """A run's datasets, the split record to store with it (None for generated data) and notes to print."""

    datasets: dict[str, Dataset]
    split: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)


def run_splits(config: TrainConfig, stored: dict[str, Any] | None = None, *, checkpoint: str | None = None,
               augment: bool | None = None) -> RunData:
    """The run's train/val/test datasets: from ``stored`` (a split record) when given, else split now.

    ``checkpoint`` names the checkpoint being continued or scored; when it is given but holds no split
    (written before runs stored theirs), the split is recomputed with a one-line warning.
    """
    if config.dataset not in FILE_DATASETS:
        return RunData(build_splits(config, augment=augment), None)
    root = data_root(config.dataset, config.data)
    scheme = resolve_split(config.dataset, config.split)
    notes = []
    if stored is None:
        lists = sample_splits(config.dataset, root, split=scheme, seed=config.seed)
        record = split_record(config.dataset, root, scheme, config.seed, lists)
        if checkpoint is not None:
            notes.append(f"warning: {checkpoint} stores no split (written before runs kept theirs); recomputed it "
                         f"from {root} as it is now, which matches the original only if no case was added or removed")
    else:
        if not root.is_dir() and absolute_root(root) == stored["data"]:
            raise UsageError(f"this run's data folder {root} does not exist; if the data moved, pass --data "
                             "<its new place> (it is checked against the run's fingerprint)")
        lists, notes = apply_split(stored, scheme_samples(config.dataset, root, split=scheme), root)
        record = {**stored, "data": absolute_root(root)}
    datasets = file_datasets(lists, config.image_size, seed=config.seed,
                             augment=config.augment if augment is None else augment, cache_dir=_cache_dir(config))
    return RunData(datasets, record, notes)


def make_loader(dataset: Dataset, sampler: Sampler[int], batch_size: int, workers: int, device: torch.device,
                generator: torch.Generator | None = None) -> DataLoader:
    """A DataLoader with seeded workers; persistent workers so ``set_epoch`` reaches them cheaply."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", worker_init_fn=seed_worker, generator=generator,
                      persistent_workers=workers > 0, drop_last=False)


def train_sampler(dataset: Dataset, dist: DistContext, seed: int) -> DistributedSampler:
    """Shuffles with (seed, epoch) after ``set_epoch``, so the order is a pure function of the epoch:
    resuming mid-run sees the same batches as an uninterrupted run. Also used for one process."""
    return DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)


def eval_loader(dataset: Dataset, dist: DistContext, batch_size: int, workers: int) -> DataLoader:
    """In-order loader over this rank's shard of ``dataset``."""
    return make_loader(dataset, ShardSampler(len(dataset), dist.rank, dist.world_size), batch_size, workers,
                       dist.device)
