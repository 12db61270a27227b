"""``python -m r2unet_fast.train``: flags, run folder, and one-line errors (shared with evaluate/predict)."""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence

import torch

from ..data import DATASETS, DataError
from ..losses import LOSSES
from ..nn import BLOCKS, R2AttUNet
from ..ops.dispatch import BACKEND_CHOICES
from .checkpoint import CHECKPOINT_DIR, config_of, load_checkpoint
from .config import AMP_MODES, OPTIMIZERS, PRESETS, TrainConfig, UsageError, check_resume_overrides, \
    parse_pos_weight, read_config_file, resolve_config
from .distributed import DistContext, setup_distributed
from .inference import load_model
from .outputs import RunLock, claim_run_folder
from .runtime import check_amp, resolve_device
from .trainer import Trainer, TrainingDiverged, check_sync_bn

USAGE_EXIT, FAILURE_EXIT, INTERRUPT_EXIT = 2, 1, 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as the single line ``error: ...`` (exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        _print_error(f"{message} (see {self.prog} --help)")
        raise SystemExit(USAGE_EXIT)


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _print_error(message: str) -> None:
    if _is_rank_zero():
        print("error: " + " ".join(message.split()), file=sys.stderr, flush=True)


def _message(error: Exception) -> str:
    """The error's own text; a DataLoader worker wraps it in the worker's traceback, which is dropped."""
    text = str(error)
    marker = f"{type(error).__name__}: "
    return text.rsplit(marker, 1)[1] if "Original Traceback" in text and marker in text else text


def run_cli(body: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    """Run a command's ``body``; bad input -> ``error: <one line>`` and exit 2, no traceback;
    a diverged run -> exit 1; Ctrl-C -> exit 130."""
    try:
        return body(argv)
    except (UsageError, DataError) as error:
        _print_error(_message(error))
        return USAGE_EXIT
    except TrainingDiverged as error:
        _print_error(str(error))
        return FAILURE_EXIT
    except KeyboardInterrupt:
        _print_error("interrupted")
        return INTERRUPT_EXIT


def _pos_weight(text: str) -> float | str:
    try:
        return parse_pos_weight(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> ArgumentParser:
    """Flags map one-to-one onto :class:`TrainConfig` fields; absent flags keep the preset/config value."""
    parser = ArgumentParser(
        prog="python -m r2unet_fast.train", argument_default=argparse.SUPPRESS,
        description="Train R2U-Net with attention gates. With no arguments: a CPU demo on the embedded synthetic "
                    "lesions (a few minutes on 2 cores).",
        epilog="Precedence: preset < --config file < flags. Under torchrun every process runs this command.")
    add_train_arguments(parser)
    return parser


def add_train_arguments(parser: argparse.ArgumentParser, *, presets: Sequence[str] = PRESETS,
                        preset_help: str = "base settings (default cpu-demo)", run_flags: bool = True) -> None:
    """Add the trainer's flags to ``parser``, which should have ``argument_default=argparse.SUPPRESS`` so
    that absent flags leave the preset/config values alone. ``run_flags=False`` leaves out the flags that
    name one run (``--resume``, ``--out``, ``--block``, ``--no-attention``, ``--loss``), for a command that
    sets those per run (``python -m r2unet_fast.ablate``)."""
    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=tuple(presets), help=preset_help)
    run.add_argument("--config", dest="config_file", metavar="FILE", help="JSON or TOML file of settings")
    if run_flags:
        run.add_argument("--resume", metavar="RUN", help="continue a run: its folder or a checkpoint .pt")
        run.add_argument("--out", metavar="DIR", help="run folder (default runs/<timestamp>)")
    run.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    run.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    run.add_argument("--seed", type=int, metavar="N")
    run.add_argument("--workers", type=int, metavar="N", help="DataLoader workers (default: 0 on CPU, up to 8 per GPU)")
    run.add_argument("--preview", type=int, metavar="N", help="test cases drawn in predictions.png")
    run.add_argument("--sync-bn", action="store_true",
                     help="under torchrun: BatchNorm statistics over all processes' batches (SyncBatchNorm)")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction,
                     help="train through torch.compile of the model (default off: compiling takes minutes on a CPU; "
                          "the first epoch includes it)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS)
    data.add_argument("--data", metavar="PATH", help="dataset folder (not for synthetic)")
    data.add_argument("--split", help="default | official | alom (isic2017) | seeded (ph2, folder)")
    data.add_argument("--image-size", type=int, metavar="S", help="train at S x S (divisible by 2^(depth-1))")
    data.add_argument("--no-augment", dest="augment", action="store_false")
    data.add_argument("--cache-dir", metavar="DIR", help="decode cache (default $R2UNET_FAST_CACHE or ~/.cache)")
    data.add_argument("--synthetic-sizes", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"))
    model = parser.add_argument_group("model")
    model.add_argument("--base-channels", type=int, metavar="C", help="width of the first level (doubles per level)")
    model.add_argument("--depth", type=int, metavar="D", help="encoder levels")
    model.add_argument("--t", type=int, metavar="T", help="recurrent steps per recurrent conv")
    if run_flags:
        model.add_argument("--block", choices=BLOCKS)
        model.add_argument("--no-attention", dest="attention", action="store_false")
    model.add_argument("--tied", action="store_true", help="share conv_f/conv_r weights (popular PyTorch variant)")
    model.add_argument("--shared-norm", action="store_true")
    model.add_argument("--attention-norm", action="store_true")
    model.add_argument("--backend", choices=BACKEND_CHOICES)
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, metavar="N")
    opt.add_argument("--batch-size", type=int, metavar="N", help="per process")
    opt.add_argument("--optimizer", choices=OPTIMIZERS)
    opt.add_argument("--lr", type=float, help="peak learning rate")
    opt.add_argument("--weight-decay", type=float, metavar="WD")
    opt.add_argument("--warmup-epochs", type=float, metavar="E", help="linear LR warm-up length")
    opt.add_argument("--min-lr-ratio", type=float, metavar="R", help="final LR of the cosine as a fraction of --lr")
    opt.add_argument("--grad-clip", type=float, metavar="NORM", help="max gradient norm (0: off)")
    if run_flags:
        opt.add_argument("--loss", choices=tuple(LOSSES))
    opt.add_argument("--dice-weight", type=float, metavar="W",
                     help="hybrid loss: weight of (1 - Dice); BCE gets the rest")
    opt.add_argument("--pos-weight", type=_pos_weight, metavar="{auto,W}",
                     help="BCE weight of lesion pixels; auto = background/lesion ratio of the training masks")
    opt.add_argument("--amp", nargs="?", const="bf16", choices=AMP_MODES,
                     help="autocast: bf16 (default when given; CUDA or CPU), fp16 (CUDA, with loss scaling), off")
    opt.add_argument("--patience", type=int, metavar="N",
                     help="early stop after N epochs without a better val Jaccard (0: off)")


def run_folder(checkpoint: Path) -> Path:
    """The run folder that holds ``checkpoint`` (``<run>/checkpoints/x.pt`` -> ``<run>``)."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == CHECKPOINT_DIR else parent


def new_run_folder(requested: str | None, dist: DistContext) -> Path:
    """``requested`` or a fresh ``runs/<timestamp>``, agreed by all ranks. :func:`claim_run_folder` then
    checks that it can be written and holds no run yet, and locks it."""
    if requested is not None:
        return Path(requested).expanduser()
    if dist.is_main:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out, suffix = Path("runs") / stamp, 1
        while True:
            try:  # mkdir, not exists(): two runs started in the same second must not pick the same folder
                out.mkdir(parents=True)
                break
            except FileExistsError:
                out, suffix = Path("runs") / f"{stamp}-{suffix}", suffix + 1
            except OSError:
                break  # unwritable: claim_run_folder reports it on every rank
    else:
        out = None
    return Path(dist.broadcast(out))


def _configure(args: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any] | None]:
    config_file, resume = args.pop("config_file", None), args.pop("resume", None)
    if resume is None:
        file_values = read_config_file(config_file) if config_file else None
        return resolve_config(file_values, args, f"config file {config_file}"), None
    if config_file:
        raise UsageError("--config cannot be combined with --resume: a resumed run keeps the config saved in "
                         "its checkpoint")
    state = load_checkpoint(resume)
    config = check_resume_overrides(config_of(state), args)
    if "out" not in args:
        config.out = str(run_folder(Path(state["path"])))
    return config, state


def _train(argv: Sequence[str] | None) -> int:
    args = vars(build_parser().parse_args(argv))
    print_only = args.pop("print_config", False)
    config, state = _configure(args)
    if print_only:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    return train(config, state)


def train(config: TrainConfig, state: dict[str, Any] | None = None) -> int:
    """What ``python -m r2unet_fast.train`` does once its flags are resolved, for callers in Python (the
    ablation runs its cells with it): train ``config`` into ``config.out`` (a fresh ``runs/<timestamp>``
    when None), or, given ``state`` (a :func:`load_checkpoint` dict), continue that run in ``config.out``.

    Returns the exit code: 0, or 130 when interrupted (the run folder then resumes). Bad input raises
    :class:`UsageError` or :class:`DataError` and a diverged run :class:`TrainingDiverged`; :func:`run_cli`
    turns each into one ``error:`` line."""
    dist = setup_distributed(config.device)
    lock: RunLock | None = None
    try:
        check_sync_bn(config, dist)  # before a run folder exists
        out = Path(config.out) if state is not None else new_run_folder(config.out, dist)
        lock = claim_run_folder(out, dist, new=state is None)  # held until this run ends
        config.out = str(out)
        code = _fit(config, state, dist, out)
        gc.collect()  # a trainer kept alive by a reference cycle would keep its Reducer (see _fit)
        if code == 0:
            dist.barrier()  # every rank's collectives are done before the group goes
        return code
    finally:
        if lock is not None:
            lock.release()
        dist.shutdown()


def _fit(config: TrainConfig, state: dict[str, Any] | None, dist: DistContext, out: Path) -> int:
    """Train and report; the trainer lives only in this frame. Under DDP its Reducer holds the gloo
    process group, and were the Reducer the group's last owner, the group would be destroyed with
    the GIL held while a gloo worker thread waits for the GIL to free a tensor: a deadlock, seen on
    loaded machines after the run had finished. Freed here, the Reducer leaves the group to
    ``destroy_process_group``, which releases the GIL while the group's threads stop."""
    started = time.perf_counter()
    trainer = Trainer(config, dist, out, resume=state)
    say = trainer.log.say
    parts = ", ".join(f"{part} {len(data)}" for part, data in trainer.datasets.items())
    params = sum(p.numel() for p in trainer.model.parameters())
    model = f"{config.block} U-Net{' + attention' if config.attention else ''}, {params / 1e6:.2f}M params"
    ddp = f" (DDP, {dist.backend})" if dist.enabled else ""
    say(f"run folder {out} | {config.dataset} ({parts} images at {config.image_size}px) | {model} | "
        f"{dist.device} x{dist.world_size}{ddp} | amp {config.amp}"
        + (" | torch.compile" if config.compile else "") + (" | SyncBatchNorm" if config.sync_bn else "")
        + (f" | resuming after epoch {trainer.epoch}" if state is not None else ""))
    try:
        results = trainer.fit()
    except KeyboardInterrupt:
        say(f"interrupted; continue with: python -m r2unet_fast.train --resume {out}")
        return INTERRUPT_EXIT
    minutes, seconds = divmod(int(time.perf_counter() - started), 60)
    test = results.get("test", results["val"])
    say(f"done in {minutes}m{seconds:02d}s: best epoch {results['best_epoch']} "
        f"(val jaccard {results['val']['jaccard']:.4f}); test jaccard {test['jaccard']:.4f}, "
        f"dice {test['dice']:.4f}")
    say(f"outputs in {out}/: checkpoints/best.pt, checkpoints/last.pt, metrics.json, log.csv, curves.png, "
        "predictions.png, config.json")
    return 0


def _interrupt_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's time limit) behaves like Ctrl-C while the block runs: the trainer
    stops where it is, says how to resume, and exits 130. Only in the main thread (signal's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m r2unet_fast.train``; returns the exit code."""
    with sigterm_as_interrupt():
        return run_cli(_train, argv)


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --device, --amp, --tta: the flags evaluate and predict share."""
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="a .pt written by the trainer, or a run folder (its checkpoints/best.pt)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--amp", nargs="?", const="bf16", default="off", choices=AMP_MODES,
                        help="autocast for inference (bf16 when given without a value)")
    parser.add_argument("--tta", action="store_true", help="average with horizontal and vertical flips")


def load_for_inference(args: argparse.Namespace) -> tuple[R2AttUNet, TrainConfig, dict[str, Any], torch.device]:
    """(model in eval mode, its TrainConfig, the checkpoint dict, device) from the shared flags."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every process would score everything and write the same files
        raise UsageError("evaluate and predict run in one process; run them without torchrun (one GPU or the CPU)")
    device = resolve_device(args.device)
    check_amp(args.amp, device)
    model, config, state = load_model(args.checkpoint, device)
    return model, config, state, device
