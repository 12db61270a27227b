"""r2unet_fast: R2U-Net with attention gates and a hybrid Dice + BCE loss, with fused kernels.

Public API: the model classes, the loss module, metrics and the backend report.
"""
from ._openmp import prefer_passive_wait

prefer_passive_wait()  # before torch loads OpenMP; only for python -m r2unet_fast.<command>

from .losses import HybridLoss
from .metrics import MetricAccumulator, segmentation_metrics
from .nn import AttentionGate, R2AttUNet, R2UNet, RecurrentConv, RRCUBlock
from .ops import available_backends

__version__ = "0.1.0"

__all__ = ["R2AttUNet", "R2UNet", "RecurrentConv", "RRCUBlock", "AttentionGate", "HybridLoss",
           "segmentation_metrics", "MetricAccumulator", "available_backends", "__version__"]
