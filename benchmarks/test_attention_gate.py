"""attention_gate at R2AttUNet(base 64)'s decoder levels (batch 16, 256x256 input; on CPU one
4x64x128x128 case): forward and forward+backward, reference vs fast vs torch.compile, with the
bytes autograd saves for backward beyond the inputs in extra_info."""
from __future__ import annotations

import pytest
import torch

from r2unet_fast import ops
from r2unet_fast.ops import reference

from .steps import PASSES, gate_call, gate_step, saved_for_backward_bytes

IMPLS = ("reference", "fast", "compile")
# (N, channels of x and g, H = W); F = channels / 2 as in R2AttUNet
GPU_LEVELS = [(16, 64, 256), (16, 128, 128), (16, 256, 64), (16, 512, 32)]
CPU_LEVELS = [(4, 64, 128)]


def _levels() -> list:
    return GPU_LEVELS if torch.cuda.is_available() else CPU_LEVELS


def _dtypes() -> list:
    return [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]


def gate_inputs(n: int, c: int, size: int, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """x, g (channels_last, ``dtype``) and float32 weights of a gate with F = c // 2, all requiring grad."""
    f = max(1, c // 2)
    x, g = (torch.randn(n, c, size, size, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
            .requires_grad_() for _ in range(2))
    weights = [torch.randn(f, c, device=device) / c ** 0.5, torch.randn(f, c, device=device) / c ** 0.5,
               torch.randn(f, device=device) * 0.1, torch.randn(f, device=device) / f ** 0.5,
               torch.zeros(1, device=device)]
    return x, g, [w.requires_grad_() for w in weights]


@pytest.mark.parametrize("level", _levels(), ids=lambda lv: f"{lv[0]}x{lv[1]}x{lv[2]}x{lv[2]}")
@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
def test_attention_gate(benchmark, bench, device, pass_, impl, dtype, level):
    n, c, size = level
    benchmark.group = f"attention_gate {pass_} {str(dtype).replace('torch.', '')} {n}x{c}x{size}x{size}"
    x, g, weights = gate_inputs(n, c, size, device, dtype)
    backend = "reference"
    if impl == "reference":
        gate = reference.attention_gate
    elif impl == "fast":
        backend = bench.fast_backend("attention_gate")

        def gate(*args: torch.Tensor) -> torch.Tensor:
            return ops.attention_gate(*args, backend=backend)
    else:
        gate = bench.compiled(reference.attention_gate, lambda f: gate_step(f, x, g, weights, pass_))
    step = gate_step(gate, x, g, weights, pass_)
    saved = None
    if pass_ == "fwd+bwd":
        saved = saved_for_backward_bytes(lambda: gate_call(gate, x, g, weights), (x, g, *weights))
    bench.run(step, op="attention_gate", pass_=pass_, impl=impl, backend=backend, dtype=str(dtype),
              shape=[n, c, size, size], inter_channels=max(1, c // 2), saved_beyond_inputs_bytes=saved)
