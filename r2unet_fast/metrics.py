"""Segmentation metrics of Alom et al. and ISIC: counted per image, reduced per image, then averaged.

Counting (:func:`confusion_counts`) and reducing (:func:`metrics_from_counts`) are
separate so a whole loader can be evaluated by streaming counts
(:class:`MetricAccumulator`) without holding predictions in memory.
"""
from __future__ import annotations

import torch

METRICS: tuple[str, ...] = ("accuracy", "sensitivity", "specificity", "dice", "jaccard", "thresholded_jaccard")
ISIC2018_JACCARD_THRESHOLD = 0.65


def confusion_counts(probs: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-image TP, FP, TN, FN of ``probs > threshold`` against ``target >= 0.5``.

    Args:
        probs: (N, 1, H, W) or (N, H, W) probabilities.
        target: same shape, binary (soft values are binarised at 0.5).
    Returns:
        (N, 4) int64 counts: tp, fp, tn, fn.
    """
    if probs.shape != target.shape:
        raise ValueError(f"probs and target must have one shape, got {tuple(probs.shape)} and {tuple(target.shape)}")
    if probs.dim() < 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be (N, 1, H, W) with N >= 1, got {tuple(probs.shape)}")
    n = probs.shape[0]
    pred = (probs > threshold).reshape(n, -1)
    true = (target >= 0.5).reshape(n, -1)
    tp = (pred & true).sum(1)
    fp = (pred & ~true).sum(1)
    fn = (~pred & true).sum(1)
    tn = pred.shape[1] - tp - fp - fn
    return torch.stack([tp, fp, tn, fn], dim=1).long()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # An empty denominator means nothing could go wrong (e.g. no lesion and none predicted): 1.0.
    return torch.where(den > 0, num / den.clamp(min=1), torch.ones_like(num))


def metrics_from_counts(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image metrics from (N, 4) counts; each value is float64 (N,)."""
    tp, fp, tn, fn = counts.double().unbind(1)
    jaccard = _ratio(tp, tp + fp + fn)
    return {
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "jaccard": jaccard,
        "thresholded_jaccard": torch.where(jaccard >= ISIC2018_JACCARD_THRESHOLD, jaccard, torch.zeros_like(jaccard)),
    }


def segmentation_metrics(probs: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Mean over images of each metric in :data:`METRICS` (probs and target (N, 1, H, W))."""
    per_image = metrics_from_counts(confusion_counts(probs, target, threshold))
    return {k: float(v.mean()) for k, v in per_image.items()}


class MetricAccumulator:
    """Streams per-image metrics over batches; keeps only per-image scalars.

    ``update(probs, target, ids)`` per batch, ``compute()`` for the means,
    ``per_image()`` for rows (id + metrics), ``all_reduce()`` to merge ranks in DDP.
    """

    def __init__(self, threshold: float = 0.5, keep_per_image: bool = True) -> None:
        self.threshold = threshold
        self.keep_per_image = keep_per_image
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._sums = torch.zeros(len(METRICS), dtype=torch.float64)
        self._count = 0
        self._rows: list[dict[str, float | str]] = []

    @property
    def count(self) -> int:
        """Images seen so far."""
        return self._count

    def update(self, probs: torch.Tensor, target: torch.Tensor, ids: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Add a batch (N, 1, H, W); returns its per-image metrics."""
        per_image = metrics_from_counts(confusion_counts(probs.detach(), target.detach(), self.threshold))
        stacked = torch.stack([per_image[k].cpu() for k in METRICS], dim=1)
        self._sums += stacked.sum(0)
        self._count += stacked.shape[0]
        if self.keep_per_image:
            names = ids if ids is not None else [str(self._count - len(stacked) + i) for i in range(len(stacked))]
            for name, row in zip(names, stacked.tolist()):
                self._rows.append({"id": name, **dict(zip(METRICS, row))})
        return per_image

    def all_reduce(self) -> None:
        """Sum the running totals over every process of the default group (per-image rows stay local)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        packed = torch.cat([self._sums, torch.tensor([float(self._count)], dtype=torch.float64)]).to(backend_device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        self._sums, self._count = packed[:-1], int(packed[-1].item())

    def compute(self) -> dict[str, float]:
        """Mean of each metric over all images seen."""
        if self._count == 0:
            raise ValueError("MetricAccumulator.compute() called before any update()")
        return {k: float(v) for k, v in zip(METRICS, self._sums / self._count)}

    def per_image(self) -> list[dict[str, float | str]]:
        """One dict per image seen (``id`` and each metric), in update order."""
        return list(self._rows)
