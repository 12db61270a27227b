"""``python -m r2unet_fast.evaluate``: score a checkpoint at each image's original resolution.

The model predicts at its training size; each probability map is resized back (bilinear)
to the image's original size and compared with the original mask (threshold 0.5). The
synthetic dataset has no files and is scored at its generated size. Writes a summary JSON
and, beside it, a per-image CSV.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .data import DATASETS, DataError, load_mask
from .data.registry import resolve_split
from .metrics import METRICS, MetricAccumulator
from .nn import R2AttUNet
from .files import atomic_write_text
from .train.cli import ArgumentParser, add_inference_arguments, load_for_inference, run_cli, run_folder
from .train.config import TrainConfig
from .train.inference import predict_probs, resize_probs
from .train.loaders import build_splits, run_splits
from .train.outputs import check_output_file

PARTS: tuple[str, ...] = ("val", "test", "all")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m r2unet_fast.evaluate",
                            description="Evaluate a trained checkpoint at the images' original resolution.")
    add_inference_arguments(parser)
    parser.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's training dataset")
    parser.add_argument("--data", metavar="PATH", help="dataset folder (default: the checkpoint's, for its dataset)")
    parser.add_argument("--split", choices=PARTS, default="test", help="which part to score (default test)")
    parser.add_argument("--split-scheme", metavar="NAME",
                        help="how the data is cut into parts (default: the checkpoint's for its dataset, else default)")
    parser.add_argument("--out", metavar="FILE.json", help="summary JSON (default <run>/eval/<dataset>-<split>.json)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    return parser


def evaluation_config(trained: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """The trained config pointed at the dataset to score (same image size, seed and split scheme)."""
    dataset = args.dataset or trained.dataset
    same = dataset == trained.dataset
    scheme = args.split_scheme or (trained.split if same else "default")
    data = args.data if args.data is not None else (trained.data if same else None)
    return dataclasses.replace(trained, dataset=dataset, data=data, split="all" if args.split == "all" else scheme)


def uses_stored_split(trained: TrainConfig, config: TrainConfig, part: str) -> bool:
    """Whether scoring ``part`` with ``config`` means the run's own val/test cases: same dataset and scheme.
    "all" means every image the data holds now, and another dataset or scheme is a different cut."""
    return (part != "all" and config.dataset == trained.dataset
            and resolve_split(config.dataset, config.split) == resolve_split(trained.dataset, trained.split))


@torch.no_grad()
def score(model: R2AttUNet, dataset: Dataset, device: torch.device, *, amp: str = "off", tta: bool = False,
          batch_size: int = 8, workers: int = 0) -> MetricAccumulator:
    """Per-image metrics of ``model`` on ``dataset``: at original resolution when the dataset has
    ``.samples`` (files), else at the dataset's size."""
    samples = getattr(dataset, "samples", None)
    accumulator = MetricAccumulator()
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        probs = predict_probs(model, batch["image"], device, amp=amp, tta=tta)
        if samples is None:
            accumulator.update(probs, batch["mask"], list(batch["id"]))
            continue
        for row, index in enumerate(batch["index"].tolist()):
            sample = samples[index]
            if sample.mask_path is None:
                raise DataError(f"image {sample.image_path} has no mask; evaluation needs labelled images")
            mask = torch.from_numpy(load_mask(sample.mask_path)).float()
            full = resize_probs(probs[row], *mask.shape)
            accumulator.update(full[None, None], mask[None, None], [sample.id])
    return accumulator


def write_per_image(path: Path, rows: list[dict[str, Any]]) -> None:
    """CSV with one row per image: id and each metric."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["id", *METRICS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _evaluate(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    model, trained, state, device = load_for_inference(args)
    config = evaluation_config(trained, args)
    default_out = run_folder(Path(state["path"])) / "eval" / f"{config.dataset}-{args.split}.json"
    out = Path(args.out) if args.out else default_out
    for path in (out, out.with_suffix(".csv")):  # before scoring: a bad --out must not cost the evaluation
        check_output_file(path, "--out")  # the default one too: a read-only run folder needs an --out
    data = config.data
    if uses_stored_split(trained, config, args.split):
        run_data = run_splits(config, state.get("split"), checkpoint=state["path"], augment=False)
        for note in run_data.notes:
            print(note)
        datasets = run_data.datasets
        data = run_data.split["data"] if run_data.split is not None else data
    else:
        datasets = build_splits(config, augment=False)
    dataset = datasets[args.split]
    accumulator = score(model, dataset, device, amp=args.amp, tta=args.tta, batch_size=args.batch_size,
                        workers=args.workers)
    resolution = "original" if hasattr(dataset, "samples") else f"generated {config.image_size}x{config.image_size}"
    summary = {"checkpoint": state["path"], "epoch": state["epoch"], "dataset": config.dataset, "data": data,
               "split": args.split, "split_scheme": config.split, "images": accumulator.count,
               "resolution": resolution, "model_input_size": trained.image_size, "tta": args.tta,
               "metrics": accumulator.compute()}
    atomic_write_text(out, json.dumps(summary, indent=2) + "\n")
    write_per_image(out.with_suffix(".csv"), accumulator.per_image())
    metrics = summary["metrics"]
    print(f"{config.dataset} {args.split}: {accumulator.count} images at {resolution} resolution"
          f"{' with flip TTA' if args.tta else ''}: jaccard {metrics['jaccard']:.4f}  dice {metrics['dice']:.4f}  "
          f"accuracy {metrics['accuracy']:.4f}  sensitivity {metrics['sensitivity']:.4f}  "
          f"specificity {metrics['specificity']:.4f}")
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m r2unet_fast.evaluate``; returns the exit code."""
    return run_cli(_evaluate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
