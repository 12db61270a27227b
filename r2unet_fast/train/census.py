"""One pass over the training masks before training: refuse mostly-empty masks, and ``--pos-weight auto``.

A training set whose masks are empty (a mask format read wrongly, masks of another data
set, a resize that wipes out tiny lesions) trains a model that predicts nothing, with
every step succeeding and exit code 0. Counting the masks once, at the training size,
turns that into one ``error:`` line before the first step. For file datasets the pass also
fills the decode cache, which the first epoch then reads instead of decoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from ..data import DataError
from .config import UsageError
from .distributed import DistContext
from .loaders import eval_loader

# More than this share of empty training masks is an error: no real segmentation set looks like that.
MAX_EMPTY_SHARE = 0.5
_EXAMPLES = 3


@dataclass
class MaskCensus:
    """Lesion and total pixel counts, and the empty masks (by file, or by id for generated data)."""

    lesion_pixels: float = 0.0
    pixels: float = 0.0
    items: int = 0
    empty: list[str] = field(default_factory=list)


def _name(dataset: Dataset, index: int, item_id: str) -> str:
    samples = getattr(dataset, "samples", None)
    if samples is not None and samples[index].mask_path is not None:
        return str(samples[index].mask_path)
    return item_id


def mask_census(dataset: Dataset, dist: DistContext, batch_size: int, workers: int) -> MaskCensus:
    """Count ``dataset``'s masks (pass an un-augmented dataset); each rank counts its shard, the totals and
    the empty masks' names are gathered from every rank."""
    census = MaskCensus()
    for batch in eval_loader(dataset, dist, batch_size, workers):
        masks = batch["mask"].flatten(1)
        per_item = masks.sum(dim=1, dtype=torch.float64)
        census.lesion_pixels += float(per_item.sum())
        census.pixels += masks.numel()
        census.items += masks.shape[0]
        census.empty += [_name(dataset, int(index), str(item_id))
                         for index, item_id, lesion in zip(batch["index"], batch["id"], per_item) if lesion == 0]
    census.lesion_pixels, census.pixels, items = dist.sum([census.lesion_pixels, census.pixels, census.items])
    census.items = int(items)
    census.empty = [name for names in dist.all_gather(census.empty) for name in names]
    return census


def check_training_masks(census: MaskCensus, image_size: int) -> str | None:
    """DataError when all or most (> MAX_EMPTY_SHARE) training masks are empty; a note when a few are."""
    if not census.empty:
        return None
    count = f"{len(census.empty)} of {census.items} training masks"
    examples = ", ".join(sorted(census.empty)[:_EXAMPLES]) + (", ..." if len(census.empty) > _EXAMPLES else "")
    if len(census.empty) == census.items or len(census.empty) > MAX_EMPTY_SHARE * census.items:
        raise DataError(
            f"{count} are empty (no lesion pixel at {image_size} px), e.g. {examples}; a mask marks the lesion with "
            "the higher of its two values, or where any channel is above half range: fix or replace these masks")
    return f"note: {count} are empty (no lesion pixel at {image_size} px), e.g. {examples}"


def positive_weight_of(census: MaskCensus) -> float:
    """Background / lesion pixel ratio: the ``--pos-weight auto`` value."""
    if census.lesion_pixels == 0:
        raise UsageError("the training masks contain no lesion pixels, so --pos-weight auto is undefined; "
                         "check the masks or pass --pos-weight 1")
    return (census.pixels - census.lesion_pixels) / census.lesion_pixels


def positive_weight(dataset: Dataset, dist: DistContext, batch_size: int, workers: int) -> float:
    """Background / lesion pixel ratio over ``dataset``'s masks (pass an un-augmented dataset)."""
    return positive_weight_of(mask_census(dataset, dist, batch_size, workers))
