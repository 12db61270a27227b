"""``python -m r2unet_fast.predict``: lesion masks and overlays for any RGB images, at their own size.

For each input ``<name>.<ext>`` it writes ``<out>/<name>_mask.png`` (0 background, 255 lesion)
and ``<out>/<name>_overlay.png`` (the image with the lesion tinted and outlined). It never writes
over an input, replaces an existing file only with ``--overwrite``, and skips files named like its
outputs when it lists a folder, so predicting into the input folder twice reads the same images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .data import DataError, load_image
from .data.io import is_image_file, resize_image
from .data.transforms import normalize
from .files import atomic_write
from .train.cli import ArgumentParser, add_inference_arguments, load_for_inference, run_cli
from .train.config import UsageError
from .train.inference import predict_probs, resize_probs
from .train.outputs import check_output_folder, check_overwrites

TINT = np.array([255, 40, 40], np.float32)
OUTLINE = np.array([255, 255, 0], np.uint8)
# What predict writes per input, "<stem><suffix>" in --out; such names in an input folder are outputs
# (or ground truth named the same way), never images to predict.
OUTPUT_SUFFIXES: tuple[str, ...] = ("_mask.png", "_overlay.png")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m r2unet_fast.predict",
                            description="Predict lesion masks (and overlays) at each image's original size.")
    add_inference_arguments(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("--out", default="predictions", metavar="DIR", help="output folder (default predictions/)")
    parser.add_argument("--threshold", type=float, default=0.5, help="lesion if probability > threshold")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that already exist (an input is never overwritten)")
    return parser


def is_output_name(path: Path) -> bool:
    """True for a name predict writes (``*_mask.png``, ``*_overlay.png``)."""
    return path.name.endswith(OUTPUT_SUFFIXES)


def output_paths(out: Path, image: Path) -> tuple[Path, Path]:
    """The mask and overlay predict writes for ``image`` into ``out``."""
    mask, tinted = (out / f"{image.stem}{suffix}" for suffix in OUTPUT_SUFFIXES)
    return mask, tinted


def expand_inputs(paths: Sequence[str]) -> list[Path]:
    """Files as given and the image files inside given folders (sorted), skipping in folders the names
    predict writes (:data:`OUTPUT_SUFFIXES`): a rerun into the input folder must not predict its own
    outputs. A file named explicitly is always taken. Names must not collide."""
    files: list[Path] = []
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            images = [p for p in path.iterdir() if is_image_file(p)]
            found = sorted(p for p in images if not is_output_name(p))
            if not found:
                skipped = (f" ({len(images)} named *{' / *'.join(OUTPUT_SUFFIXES)} are skipped as predict's "
                           "outputs; pass such files by name to predict them)" if images else "")
                raise DataError(f"no images (png/bmp/jpg/tif/gif) in folder {path}{skipped}; add some or pass "
                                "files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"image {path} does not exist; check the path")
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen and seen[path.stem] != path:
            raise UsageError(f"{seen[path.stem]} and {path} would both write {path.stem}_mask.png; "
                             "predict them into different --out folders")
        seen[path.stem] = path
    return list(dict.fromkeys(files))


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) image with the {0,1} (H, W) lesion tinted red and its boundary drawn in yellow."""
    lesion = mask.astype(bool)
    out = image.astype(np.float32)
    out[lesion] = 0.65 * out[lesion] + 0.35 * TINT
    padded = np.pad(lesion, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    result = out.round().astype(np.uint8)
    result[lesion & ~interior] = OUTLINE
    return result


def _save_png(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda file: Image.fromarray(array).save(file, format="PNG"))


def _predict(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.threshold < 1.0:
        raise UsageError(f"--threshold must be in [0, 1), got {args.threshold}")
    model, config, state, device = load_for_inference(args)
    files = expand_inputs(args.images)
    out = Path(args.out).expanduser()
    check_output_folder(out, "--out")  # all refusals before the first image is predicted
    check_overwrites([output for path in files for output in output_paths(out, path)], files,
                     overwrite=args.overwrite)
    for path in files:
        image = load_image(path)
        tensor = normalize(resize_image(image, config.image_size))
        probs = predict_probs(model, tensor[None], device, amp=args.amp, tta=args.tta)
        mask = (resize_probs(probs[0], *image.shape[:2]) > args.threshold).numpy().astype(np.uint8)
        mask_path, overlay_path = output_paths(out, path)
        _save_png(mask_path, mask * np.uint8(255))
        _save_png(overlay_path, overlay(image, mask))
        print(f"{path}: lesion {mask.mean():.1%} of {image.shape[1]}x{image.shape[0]} px")
    print(f"wrote {len(files)} masks and overlays to {out}/ (checkpoint {state['path']}, epoch {state['epoch']})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m r2unet_fast.predict``; returns the exit code."""
    return run_cli(_predict, argv)


if __name__ == "__main__":
    raise SystemExit(main())
