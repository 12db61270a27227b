"""hybrid_loss at 16x1x256x256: forward and forward+backward, reference vs fast vs torch.compile."""
from __future__ import annotations

import pytest
import torch

from r2unet_fast import ops
from r2unet_fast.ops import reference

from .steps import PASSES, loss_step

SHAPE = (16, 1, 256, 256)
IMPLS = ("reference", "fast", "compile")


def _inputs(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (torch.randn(SHAPE, device=device) * 3).to(dtype).requires_grad_()
    target = (torch.rand(SHAPE, device=device) > 0.7).to(dtype)
    return logits, target


def _dtypes() -> list:
    if torch.cuda.is_available():
        return [torch.float32, torch.bfloat16]
    return [torch.float32]


@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
def test_hybrid_loss(benchmark, bench, device, pass_, impl, dtype):
    benchmark.group = f"hybrid_loss {pass_} {str(dtype).replace('torch.', '')}"
    logits, target = _inputs(device, dtype)
    backend = "reference"
    if impl == "reference":
        loss_fn = reference.hybrid_loss
    elif impl == "fast":
        backend = bench.fast_backend("hybrid_loss")

        def loss_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return ops.hybrid_loss(x, t, backend=backend)
    else:
        loss_fn = bench.compiled(reference.hybrid_loss, lambda f: loss_step(f, logits, target, pass_))
    bench.run(loss_step(loss_fn, logits, target, pass_), op="hybrid_loss", pass_=pass_, impl=impl, backend=backend,
              shape=list(SHAPE), dtype=str(dtype))
