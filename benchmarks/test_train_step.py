"""The training step users feel: forward, hybrid loss, backward and Adam step of R2AttUNet.

Reference eager (channels_last, the fair baseline), ``torch.compile`` of the reference, the fast
model (fused loss, gates and recurrent units) and ``torch.compile`` of the fast model, on the same
weights and batch. On CUDA: base 64, depth 5, t=2, batch 16 at 256x256, fp32 and bf16 autocast,
for the paper's untied layout and the popular tied one; on CPU: base 16, depth 4, t=2, batch 4 at
96x96, fp32. ``extra_info`` carries images/s and the peak memory one step adds (the trainer's
``log.csv`` reports the same two per epoch).
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import pytest
import torch

from r2unet_fast import HybridLoss, R2AttUNet

from .steps import TrainStep

IMPLS = ("reference", "compile-reference", "fast", "compile-fast")


class StepShape(NamedTuple):
    """The model and batch one benchmark case trains."""
    name: str
    base: int
    depth: int
    batch: int
    size: int
    tied: bool

    def model(self, backend: str) -> R2AttUNet:
        torch.manual_seed(0)
        # tied=True with shared norms and normed gates is the popular PyTorch layout; untied the paper's
        return R2AttUNet(base_channels=self.base, depth=self.depth, t=2, tied=self.tied, shared_norm=self.tied,
                         attention_norm=self.tied, backend=backend)


GPU_SHAPES = [StepShape("untied", 64, 5, 16, 256, False), StepShape("tied", 64, 5, 16, 256, True)]
CPU_SHAPES = [StepShape("untied", 16, 4, 4, 96, False)]


def shapes() -> list[StepShape]:
    return GPU_SHAPES if torch.cuda.is_available() else CPU_SHAPES


def dtypes() -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]


def batch(shape: StepShape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A channels_last image batch and a lesion-like binary mask, seeded."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape.batch, 3, shape.size, shape.size, generator=gen)
    y = (torch.nn.functional.avg_pool2d(x[:, :1], 9, 1, 4) > 0.1).float()
    return x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)


def train_step(shape: StepShape, impl: str, dtype: torch.dtype, device: torch.device,
               fast_backend: str) -> TrainStep:
    """The step of ``impl`` in :data:`IMPLS` (uncompiled; see :func:`compiled_step`)."""
    backend = fast_backend if impl.endswith("fast") else "reference"
    module = shape.model(backend).to(device).to(memory_format=torch.channels_last)
    x, y = batch(shape, device)
    return TrainStep(module, module, HybridLoss(backend=backend), x, y, dtype)


@pytest.mark.parametrize("shape", shapes(), ids=lambda s: f"{s.name}-b{s.base}d{s.depth}-{s.batch}x{s.size}")
@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(benchmark, bench, device, impl, dtype, shape):
    benchmark.group = f"train_step {shape.name} {str(dtype).replace('torch.', '')} " \
                      f"base {shape.base} depth {shape.depth} {shape.batch}x{shape.size}x{shape.size}"
    fast = bench.fast_backend("recurrent_conv") if impl.endswith("fast") else "reference"
    step = train_step(shape, impl, dtype, device, fast)
    if impl.startswith("compile"):
        module = step.model
        step.model = bench.compiled(module, lambda m: _with_model(step, m))
    report = step.model.backend_report() if hasattr(step.model, "backend_report") else {}
    bench.run(step, op="train_step", impl=impl, backend=fast, dtype=str(dtype), shape=shape._asdict(),
              images_per_step=shape.batch, fused_layers=sum(not v.startswith("reference") for v in report.values()),
              layers=len(report))


def _with_model(step: TrainStep, model) -> TrainStep:
    trial = copy.copy(step)
    trial.model = model
    return trial
