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


def gate_call(fn: Callable[..., torch.Tensor], x: torch.Tensor, g: torch.Tensor,
              weights: list[torch.Tensor]) -> torch.Tensor:
    """``fn(x, g, *weights)``; half-precision x under autocast, which is how a model runs half
    activations with float32 weights (the reference needs it; the fused op casts the weights itself)."""
    with torch.autocast(x.device.type, dtype=x.dtype, enabled=x.dtype in (torch.float16, torch.bfloat16)):
        return fn(x, g, *weights)


def gate_step(fn: Callable[..., torch.Tensor], x: torch.Tensor, g: torch.Tensor, weights: list[torch.Tensor],
              pass_: str) -> Callable[[], None]:
    """A no-argument callable running the attention gate ``fn(x, g, *weights)`` forward only (under
    no_grad) or forward and backward of a fixed upstream gradient (x, g and the weights must
    require grad), per ``pass_`` in :data:`PASSES`."""
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; choose one of {', '.join(PASSES)}")
    leaves = [x, g, *weights]

    def call() -> torch.Tensor:
        return gate_call(fn, x, g, weights)

    if pass_ == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                call()
        return fwd
    grad_out = torch.randn_like(x)

    def fwd_bwd() -> None:
        for t in leaves:
            t.grad = None
        call().backward(grad_out)
    return fwd_bwd


def saved_for_backward_bytes(fn: Callable[[], object], inputs: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs its forward,
    leaving out those of ``inputs``: what the op keeps alive between the passes beyond tensors
    the model holds anyway."""
    kept = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in kept:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def module_step(model: torch.nn.Module, x: torch.Tensor, pass_: str) -> Callable[[], None]:
    """A no-argument callable running ``model(x)`` in training mode forward only (under no_grad; the
    BatchNorm statistics still update) or forward and backward of a fixed upstream gradient, under
    autocast when ``x`` is half precision (float32 weights, as a model trains)."""
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; choose one of {', '.join(PASSES)}")
    half = x.dtype in (torch.float16, torch.bfloat16)
    model.train()

    def call() -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=x.dtype, enabled=half):
            return model(x)

    if pass_ == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                call()
        return fwd
    with torch.no_grad():
        grad_out = torch.randn_like(call())

    def fwd_bwd() -> None:
        x.grad = None
        for p in model.parameters():
            p.grad = None
        call().backward(grad_out)
    return fwd_bwd


class TrainStep:
    """One training step of a segmentation model as the trainer runs it: forward under autocast when
    ``dtype`` is half, the hybrid loss in float32, backward, Adam step. Calling it runs one step;
    ``model`` may be ``torch.compile`` of ``module`` (the optimizer holds ``module``'s parameters)."""

    def __init__(self, module: torch.nn.Module, model: Callable[[torch.Tensor], torch.Tensor],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 dtype: torch.dtype) -> None:
        self.model, self.loss_fn, self.x, self.y, self.dtype = model, loss_fn, x, y, dtype
        module.train()
        # fused where supported, as the trainer's (r2unet_fast.train.optim.fused_step_supported; not
        # imported: r2unet_fast.train pulls in the image libraries, which a GPU image may lack)
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in module.parameters())
        self.optimizer = torch.optim.Adam(module.parameters(), lr=1e-4, fused=fused or None)

    def loss(self) -> torch.Tensor:
        """Forward and loss of the batch (no backward)."""
        half = self.dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(self.x.device.type, dtype=self.dtype, enabled=half):
            logits = self.model(self.x)
        return self.loss_fn(logits.float(), self.y)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()
