"""Output buffers handed out full of NaN, so any element a kernel skips shows (imported by the op tests)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch


@contextlib.contextmanager
def poisoned_allocations(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torch.empty / torch.empty_like return floating-point tensors filled with NaN while active."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
        m.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))
        yield
