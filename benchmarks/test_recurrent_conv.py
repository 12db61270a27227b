"""The RRCU block (``RRCUBlock``, t=2, untied, per-step norms) at each level of R2AttUNet(base 64,
t=2), batch 16 at 256x256 on a GPU (64..1024 channels at 256..16 px), and ``RRCUBlock(32, 32, t=2)``
at 4x32x96x96 on CPU: forward and forward+backward in training mode, reference eager
(channels_last) vs fast vs ``torch.compile`` of the reference, with the bytes autograd saves for
backward in extra_info."""
from __future__ import annotations

import copy

import pytest
import torch

from r2unet_fast.nn.blocks import RRCUBlock

from .steps import PASSES, module_step, saved_for_backward_bytes

IMPLS = ("reference", "fast", "compile")
# (N, channels, H = W)
GPU_LEVELS = [(16, 64, 256), (16, 128, 128), (16, 256, 64), (16, 512, 32), (16, 1024, 16)]
CPU_LEVELS = [(4, 32, 96)]


def _levels() -> list:
    return GPU_LEVELS if torch.cuda.is_available() else CPU_LEVELS


def _dtypes() -> list:
    return [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]


def block_and_input(n: int, c: int, size: int, device: torch.device, dtype: torch.dtype,
                    backend: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A channels_last ``RRCUBlock(c, c, t=2)`` (same weights for every backend: seeded) and its input."""
    torch.manual_seed(0)
    block = RRCUBlock(c, c, 2, backend=backend).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(n, c, size, size, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    return block, x.requires_grad_()


@pytest.mark.parametrize("level", _levels(), ids=lambda lv: f"{lv[0]}x{lv[1]}x{lv[2]}x{lv[2]}")
@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
def test_recurrent_conv(benchmark, bench, device, pass_, impl, dtype, level):
    n, c, size = level
    benchmark.group = f"recurrent_conv {pass_} {str(dtype).replace('torch.', '')} {n}x{c}x{size}x{size}"
    backend = bench.fast_backend("recurrent_conv") if impl == "fast" else "reference"
    block, x = block_and_input(n, c, size, device, dtype, backend)
    model = block
    if impl == "compile":
        model = bench.compiled(copy.deepcopy(block), lambda m: module_step(m, x, pass_))
    step = module_step(model, x, pass_)
    saved = None
    if pass_ == "fwd+bwd":
        def forward() -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return model(x)

        saved = saved_for_backward_bytes(forward, (x, *block.parameters()))
    bench.run(step, op="recurrent_conv", pass_=pass_, impl=impl, backend=backend, dtype=str(dtype),
              shape=[n, c, size, size], t=2, saved_beyond_inputs_bytes=saved)
