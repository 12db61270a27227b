"""Training: ``python -m r2unet_fast.train`` or, from Python, ``Trainer(config, dist, out).fit()``.

See docs/training.md for the flags, outputs, presets and recipes.
"""
from .checkpoint import load_checkpoint, save_checkpoint
from .cli import main
from .config import PRESETS, TrainConfig, UsageError
from .distributed import DistContext, setup_distributed
from .inference import build_model, load_model, predict_probs
from .trainer import Trainer, TrainingDiverged

__all__ = ["PRESETS", "TrainConfig", "UsageError", "Trainer", "TrainingDiverged", "DistContext",
           "setup_distributed", "build_model", "load_model", "predict_probs", "load_checkpoint",
           "save_checkpoint", "main"]
