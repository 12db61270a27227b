"""The training loop, as small overridable hooks (nnU-Net style).

Subclass :class:`Trainer` and override ``build_model``, ``build_loss``, ``build_optimizer``,
``build_scheduler``, ``compute_loss``, ``train_step``, ``validate`` or ``on_epoch_end`` to
change one step without copying the loop.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..data.stored_split import SPLIT_FILE
from ..files import remove_stale_temporaries
from ..losses import HybridLoss
from ..metrics import METRICS, MetricAccumulator
from ..nn import R2AttUNet
from ..nn.sync_norm import convert_sync_batchnorm
from . import optim
from .census import MaskCensus, check_training_masks, mask_census, positive_weight_of
from .checkpoint import CHECKPOINT_DIR, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .config import TrainConfig, UsageError
from .distributed import DistContext
from .inference import build_model, to_device, to_input
from .loaders import eval_loader, make_loader, run_splits, train_sampler
from .logs import TAIL_COLUMNS, RunLog, progress
from .norm_calibration import calibration_epochs, calibration_loader, recalibrate_batchnorm
from .plots import plot_curves, plot_predictions
from .runtime import autocast, check_amp, default_workers, deterministic_algorithms, peak_memory_mb, \
    reset_peak_memory, seed_everything


def check_sync_bn(config: TrainConfig, dist: DistContext) -> None:
    """--sync-bn needs a process group (torchrun); UsageError otherwise."""
    if config.sync_bn and not dist.enabled:
        raise UsageError("--sync-bn synchronizes BatchNorm statistics across the processes of a torchrun launch, "
                         "and this run has no process group; launch it with torchrun or drop --sync-bn")


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN/inf; the message says where and which checkpoint is intact."""


class Trainer:
    """Trains an R2AttUNet on one dataset and writes a run folder.

    Args:
        config: the run's settings (validated).
        dist: process/rank/device context (:func:`setup_distributed`).
        out: the run folder (created by rank 0).
        resume: a checkpoint dict to continue from, or None for a fresh run.
    """

    def __init__(self, config: TrainConfig, dist: DistContext, out: Path,
                 resume: dict[str, Any] | None = None) -> None:
        self.config, self.dist, self.device, self.out = config, dist, dist.device, Path(out)
        check_amp(config.amp, self.device)
        check_sync_bn(config, dist)
        self.log = RunLog(self.out, dist.is_main)
        if dist.is_main:  # a run killed mid-write leaves its temporary beside the intact file
            for folder in (self.out, self.out / CHECKPOINT_DIR):
                if folder.is_dir():
                    remove_stale_temporaries(folder)
        if config.amp != "off" and self.device.type == "cpu":
            self.log.say("note: bf16 autocast on CPU is correct but usually slower than fp32 unless the CPU has "
                         "AMX or AVX512-BF16; it is meant for CUDA")
        self.workers = config.workers if config.workers is not None else \
            default_workers(self.device, dist.local_world_size)
        # The split a resumed run started with; build_datasets reapplies it and sets self.split.
        self.split: dict[str, Any] | None = None
        self._resume_split = resume.get("split") if resume is not None else None
        self._resume_path = resume.get("path", "the checkpoint") if resume is not None else None
        self.datasets = self.build_datasets()
        self.census = self.count_masks(resume is None and config.pos_weight == "auto")
        self.loader_generator = torch.Generator()
        sampler = train_sampler(self.datasets["train"], dist, config.seed)
        self.train_loader = make_loader(self.datasets["train"], sampler, config.batch_size, self.workers,
                                        self.device, self.loader_generator)
        self.eval_loaders = {part: eval_loader(self.datasets[part], dist, config.batch_size, self.workers)
                             for part in ("val", "test") if part in self.datasets}
        seed_everything(config.seed)  # the initial weights depend on the seed only
        self.model = to_device(self.build_model(), self.device)
        if config.sync_bn:  # before the optimizer sees the parameters: conversion makes new norm modules
            self.model = convert_sync_batchnorm(self.model)
        self.pos_weight = resume["pos_weight"] if resume else self.resolve_pos_weight()
        self.loss_fn = self.build_loss(self.pos_weight)
        self.optimizer = self.build_optimizer(self.model)
        self.scheduler = self.build_scheduler(self.optimizer, len(self.train_loader))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.epoch, self.stale_epochs = 0, 0
        self.history: list[dict[str, float]] = []
        self.best: dict[str, Any] = {"epoch": 0, "jaccard": -1.0, "metrics": {}}
        if resume is not None:
            self.load_state(resume)
        self.net = self.wrap_model(self.model)

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the training steps call: ``model`` under DDP when a process group is live, then
        ``torch.compile`` of that with ``config.compile``. Checkpoints, validation and previews use
        the plain ``model`` (eager, and state_dict keys without ``module.``/``_orig_mod.``)."""
        net = model
        if self.dist.enabled:
            net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.config.compile:
            self.log.say("torch.compile: the first training epoch includes compiling the model")
            # dynamic=False: the fused-op dispatch breaks the graph at each attention gate, and the frames
            # after those breaks see one shape per decoder level; letting dynamo make them dynamic
            # (its default on the second shape) trips an inductor error on symbolic strides
            # (torch 2.13 CPU). Static shapes compile once per level and batch size instead.
            net = torch.compile(net, dynamic=False)
        return net

    # ---- construction hooks -------------------------------------------------------------------
    def build_datasets(self) -> dict[str, Dataset]:
        """train/val/test datasets (train augmented when ``config.augment``). A fresh run splits the data as
        it is now; a resumed one reapplies the split stored in its checkpoint. Sets ``self.split`` (stored in
        checkpoints and split.json) and makes ``config.data`` absolute, so the run can be resumed or
        evaluated from any directory."""
        data = run_splits(self.config, self._resume_split, checkpoint=self._resume_path)
        for note in data.notes:
            self.log.say(note)
        self.split = data.split
        if data.split is not None:
            self.config.data = data.split["data"]
        return data.datasets

    def count_masks(self, needed: bool) -> MaskCensus | None:
        """Count the un-augmented training masks (for file datasets, or when ``needed``): an error when
        all or most are empty, a note when a few are. Generated data skips it unless ``needed``."""
        train = self.datasets["train"]
        if not (needed or hasattr(train, "samples")):
            return None
        plain = train.without_augmentation() if hasattr(train, "without_augmentation") else train
        census = mask_census(plain, self.dist, self.config.batch_size, self.workers)
        note = check_training_masks(census, self.config.image_size)
        if note is not None:
            self.log.say(note)
        return census

    def build_model(self) -> R2AttUNet:
        return build_model(self.config)

    def build_loss(self, pos_weight: float) -> torch.nn.Module:
        return HybridLoss.named(self.config.loss, dice_weight=self.config.dice_weight, pos_weight=pos_weight,
                                backend=self.config.backend)

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return optim.build_optimizer(model, self.config)

    def build_scheduler(self, optimizer: torch.optim.Optimizer,
                        steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
        return optim.build_scheduler(optimizer, self.config, steps_per_epoch)

    def resolve_pos_weight(self) -> float:
        """``config.pos_weight``, or for "auto" the background/lesion pixel ratio of the un-augmented
        training masks (counted once, at the training resolution)."""
        if self.config.pos_weight != "auto":
            return float(self.config.pos_weight)
        census = self.census if self.census is not None else self.count_masks(True)
        value = positive_weight_of(census)
        self.log.say(f"--pos-weight auto: background/lesion pixel ratio of the training masks = {value:.4f}")
        return value

    # ---- steps --------------------------------------------------------------------------------
    def compute_loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Loss of logits (N, 1, S, S) against masks (N, 1, S, S), in float32 even under autocast."""
        return self.loss_fn(logits.float(), masks)

    def phase(self, name: str) -> ContextManager:
        """Context around each part of a training step, in order "to_device", "forward", "loss",
        "backward", "optimizer" (clipping, the finite check and the step). It labels the part for
        torch.profiler (``step.<name>``; next to nothing when no profiler runs); override it to time them."""
        return torch.profiler.record_function(f"step.{name}")

    def train_step(self, batch: dict[str, Any], epoch: int, step: int) -> float:
        """One optimisation step on ``batch``; returns its loss. Raises TrainingDiverged before
        touching the weights when the loss or gradient norm is not finite (on any rank)."""
        with self.phase("to_device"):
            images = to_input(batch["image"], self.device)
            masks = batch["mask"].to(self.device, non_blocking=True)
        with self.phase("forward"), autocast(self.device, self.config.amp):
            logits = self.net(images)
        with self.phase("loss"):
            loss = self.compute_loss(logits, masks)
        with self.phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        with self.phase("optimizer"):
            self.scaler.unscale_(self.optimizer)
            clip = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            value, norm_value = torch.stack([loss.detach().float(), norm.detach().float()]).tolist()
            # With fp16 loss scaling, inf gradients are routine: the scaler skips the step and lowers the scale.
            bad = not math.isfinite(value) or (not self.scaler.is_enabled() and not math.isfinite(norm_value))
            if self.dist.any(bad):
                raise TrainingDiverged(self.divergence_message(value if bad else float("nan"), epoch, step))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        return value

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set; returns train_loss, lr, seconds, images_per_s, peak_memory_mb
        and data_wait_share: the part of ``seconds`` spent blocked on the DataLoader for the next batch
        (worker start-up included; averaged over ranks), i.e. what faster input could win at most."""
        self.net.train()
        self.train_loader.sampler.set_epoch(epoch)
        if hasattr(self.datasets["train"], "set_epoch"):  # a custom build_datasets may return plain Datasets
            self.datasets["train"].set_epoch(epoch)
        self.loader_generator.manual_seed(self.config.seed * 100_003 + epoch)
        reset_peak_memory(self.device)
        start, loss_sum, images, lr = time.perf_counter(), 0.0, 0, self.optimizer.param_groups[0]["lr"]
        bar = progress(self.train_loader, len(self.train_loader), f"epoch {epoch + 1}/{self.config.epochs}",
                       self.dist.is_main)
        batches, waited, step = iter(bar), 0.0, -1
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - asked
            if batch is None:
                break
            step += 1
            lr = self.optimizer.param_groups[0]["lr"]
            loss = self.train_step(batch, epoch, step)
            count = batch["image"].shape[0]
            loss_sum, images = loss_sum + loss * count, images + count
            rate = images * self.dist.world_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}")
        seconds = time.perf_counter() - start
        loss_sum, images, waited, busy = self.dist.sum([loss_sum, images, waited, seconds])
        return {"train_loss": loss_sum / images, "lr": lr, "seconds": seconds, "images_per_s": images / seconds,
                "peak_memory_mb": peak_memory_mb(self.device), "data_wait_share": min(1.0, waited / busy)}

    def calibrate_norms(self, epoch: int) -> None:
        """While the model is young (the first epoch, and the rest of the LR warm-up), re-estimate the BatchNorm
        running statistics with the current weights before validating (see :mod:`.norm_calibration`). Every
        rank runs as many batches (SyncBatchNorm forwards are collectives); :meth:`validate` then hands rank
        0's statistics to all, and the checkpoints save exactly those."""
        if epoch >= calibration_epochs(self.config.warmup_epochs):
            return
        train = self.datasets["train"]
        plain = train.without_augmentation() if hasattr(train, "without_augmentation") else train
        loader = calibration_loader(plain, self.config.batch_size, self.dist.rank, self.dist.world_size,
                                    self.config.seed, epoch, self.workers)
        recalibrate_batchnorm(self.model, loader, self.device, self.config.amp)

    @torch.no_grad()
    def validate(self, loader: DataLoader) -> dict[str, float]:
        """Mean loss and metrics (:data:`METRICS`, threshold 0.5) over every rank's shard of ``loader``."""
        # DDP hands rank 0's buffers to every rank before each training forward, and then each rank's
        # BatchNorm updates its running statistics with its own batch: without this, each rank would
        # score its shard with statistics no checkpoint holds. Rank 0's are the ones saved.
        self.dist.broadcast_buffers(self.model)
        self.model.eval()
        accumulator = MetricAccumulator(keep_per_image=False)
        loss_sum = 0.0
        for batch in loader:
            images = to_input(batch["image"], self.device)
            masks = batch["mask"].to(self.device, non_blocking=True)
            with autocast(self.device, self.config.amp):
                logits = self.model(images)
            loss_sum += float(self.compute_loss(logits, masks)) * images.shape[0]
            accumulator.update(torch.sigmoid(logits.float()), masks)
        accumulator.all_reduce()
        (loss_sum,) = self.dist.sum([loss_sum])
        return {"loss": loss_sum / accumulator.count, **accumulator.compute()}

    # ---- epoch end, checkpoints ---------------------------------------------------------------
    def on_epoch_end(self, epoch: int, train: dict[str, float], val: dict[str, float]) -> None:
        """Record the epoch: history row, best/stale bookkeeping, checkpoints (best first, then last), log."""
        row = {"epoch": epoch + 1, "train_loss": train["train_loss"], "val_loss": val["loss"],
               **{f"val_{name}": val[name] for name in METRICS},
               **{k: train[k] for k in TAIL_COLUMNS if k in train}}  # an overridden train_epoch may omit some
        self.history.append(row)
        improved = val["jaccard"] > self.best["jaccard"]
        if improved:
            self.best = {"epoch": epoch + 1, "jaccard": val["jaccard"], "metrics": {k: val[k] for k in METRICS}}
            self.stale_epochs = 0
        else:
            self.stale_epochs += 1
        self.epoch = epoch + 1
        # best.pt before last.pt: a kill between the two leaves last.pt one epoch behind, and the
        # resumed run redoes that epoch and rewrites the same best.pt.
        self.save(["best.pt", "last.pt"] if improved else ["last.pt"])
        self.log.epoch(row, self.history, self.config.epochs)
        if self.should_stop():
            self.log.say(f"early stopping: validation Jaccard has not improved for {self.config.patience} epochs "
                         f"(best {self.best['jaccard']:.4f} at epoch {self.best['epoch']})")

    def should_stop(self) -> bool:
        """Early stopping: ``config.patience`` epochs in a row without a better validation Jaccard.
        Checked before each epoch too, so resuming an early-stopped run does not train on."""
        return bool(self.config.patience) and self.stale_epochs >= self.config.patience

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state` needs to continue exactly where this epoch ended."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
                "best": self.best, "stale_epochs": self.stale_epochs, "pos_weight": self.pos_weight,
                "history": self.history, "rng": capture_rng(), "config": self.config.to_dict(), "split": self.split,
                "versions": {"r2unet_fast": __version__, "torch": str(torch.__version__)}}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (weights, optimizer, schedule, bookkeeping, RNG)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.stale_epochs = int(state["epoch"]), int(state["stale_epochs"])
        self.best, self.history = dict(state["best"]), [dict(row) for row in state["history"]]
        restore_rng(state["rng"])

    def save(self, names: list[str]) -> None:
        """Rank 0 writes ``checkpoints/<name>`` atomically; every rank waits for it."""
        if self.dist.is_main:
            state = self.state_dict()
            for name in names:
                save_checkpoint(self.out / CHECKPOINT_DIR / name, state)
        self.dist.barrier()

    def divergence_message(self, value: float, epoch: int, step: int) -> str:
        last = self.out / CHECKPOINT_DIR / "last.pt"
        kept = (f"the last good checkpoint is kept: {last} (epoch {self.epoch})" if self.epoch
                else "no checkpoint was written (it diverged in the first epoch)")
        return (f"training diverged: loss is {value} at epoch {epoch + 1}, step {step + 1}; stopped without "
                f"saving it; {kept}; try a lower --lr (now {self.config.lr:g}), --grad-clip, or --amp off")

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train from ``self.epoch`` to ``config.epochs`` (or early stop), then evaluate the best
        checkpoint on val and test; returns the content of metrics.json."""
        self.log.write_json("config.json", self.config.to_dict())
        if self.split is not None:
            self.log.write_json(SPLIT_FILE, self.split)
        with deterministic_algorithms(self.device):
            for epoch in range(self.epoch, self.config.epochs):
                if self.should_stop():
                    break
                train = self.train_epoch(epoch)
                self.calibrate_norms(epoch)
                val = self.validate(self.eval_loaders["val"])
                self.on_epoch_end(epoch, train, val)
            return self.on_fit_end()

    def on_fit_end(self) -> dict[str, Any]:
        """Reload best.pt, score it on val and test, write metrics.json, curves.png, predictions.png."""
        best = load_checkpoint(self.out / CHECKPOINT_DIR / "best.pt")
        self.model.load_state_dict(best["model"])
        results: dict[str, Any] = {}
        for part, loader in self.eval_loaders.items():
            scores = self.validate(loader)
            results[part] = {name: scores[name] for name in METRICS}
        results.update(best_epoch=best["epoch"], epochs_run=self.epoch, pos_weight=self.pos_weight,
                       checkpoint=str(self.out / CHECKPOINT_DIR / "best.pt"))
        self.log.write_json("metrics.json", results)
        if self.dist.is_main:
            plot_curves(self.history, self.out / "curves.png")
            self.plot_preview()
        self.log.close()
        self.dist.barrier()
        return results

    @torch.no_grad()
    def plot_preview(self) -> None:
        """predictions.png for the first ``config.preview`` test cases (validation cases if no test set)."""
        dataset = self.datasets.get("test", self.datasets["val"])
        count = min(self.config.preview, len(dataset))
        if count == 0:
            return
        items = [dataset[i] for i in range(count)]
        images = torch.stack([item["image"] for item in items])
        self.model.eval()
        with autocast(self.device, self.config.amp):
            logits, maps = self.model(to_input(images, self.device), return_attention=True)
        attention = maps[-1].float().cpu() if maps else None
        plot_predictions(images, torch.stack([item["mask"] for item in items]), torch.sigmoid(logits.float()).cpu(),
                         attention, [str(item["id"]) for item in items], self.out / "predictions.png")
