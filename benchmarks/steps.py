"""What one timed call of a loss-like op is, shared by the pytest-benchmark suite and gpu_report.py."""
from __future__ import annotations

from typing import Callable

import torch

PASSES: tuple[str, ...] = ("fwd", "fwd+bwd")


def loss_step(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor,
              target: torch.Tensor, pass_: str) -> Callable[[], None]:
    """A no-argument callable running ``fn(logits, target)`` forward only (under no_grad) or
    forward and backward (``logits`` must require grad), per ``pass_`` in :data:`PASSES`."""
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; choose one of {', '.join(PASSES)}")
    if pass_ == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                fn(logits, target)
        return fwd

    def fwd_bwd() -> None:
        logits.grad = None
        fn(logits, target).backward()
    return fwd_bwd
