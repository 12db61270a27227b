"""Tile choice of the Triton kernels: committed tile, else the default tile, autotuning only when asked."""
from __future__ import annotations

import pytest
import torch
from backend_cases import cases

from r2unet_fast.ops.library.attention_gate import attention_gate_triton
from r2unet_fast.ops.library.hybrid_loss import hybrid_loss_triton

def _with(module_name: str, run, param) -> object:
    """One pytest.param of (module name, runner, backend case), keeping the case's id and skip mark."""
    return pytest.param(module_name, run, *param.values, id=f"{module_name}-{param.id}", marks=param.marks)


def _no_autotuner(arch: str):
    raise AssertionError("the autotuner ran")


def _loss_fwd_bwd(device: torch.device) -> None:
    logits = (torch.randn(2, 1, 13, 11) * 3).to(device).requires_grad_()
    hybrid_loss_triton(logits, (torch.rand(2, 1, 13, 11) > 0.5).float().to(device)).backward()


def _gate_fwd_bwd(device: torch.device) -> None:
    x, g = torch.randn(2, 5, 7, 9, device=device, requires_grad=True), torch.randn(2, 4, 7, 9, device=device)
    weights = [torch.randn(3, 5), torch.randn(3, 4), torch.randn(3), torch.randn(3), torch.randn(1)]
    out, psi = attention_gate_triton(x, g, *[w.to(device) for w in weights], return_psi=True)
    (out.sum() + psi.sum()).backward()


@pytest.mark.parametrize("module_name, run, backend",
                         [_with("hybrid_loss", _loss_fwd_bwd, c) for c in cases("hybrid_loss", ("triton",))]
                         + [_with("attention_gate", _gate_fwd_bwd, c) for c in cases("attention_gate", ("triton",))])
def test_default_tiles_run_unless_autotuning_is_asked_for(module_name, run, backend, monkeypatch):
    import importlib

    from r2unet_fast.ops.triton import tuning

    module = importlib.import_module(f"r2unet_fast.ops.triton.{module_name}")
    monkeypatch.setattr(module, "TUNED_TILES", {})
    for name in [n for n in vars(module) if n.endswith("_tuners")]:
        monkeypatch.setattr(module, name, _no_autotuner)
    monkeypatch.setattr(tuning, "AUTOTUNE", False)
    run(backend.device)  # every kernel launches its default tile
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    with pytest.raises(AssertionError, match="the autotuner ran"):
        run(backend.device)


def test_default_tile_takes_the_fixed_reduction_entries_and_autotune_returns_none(monkeypatch):
    from r2unet_fast.ops.triton import tuning

    key = ("sm_90", "fwd", 1024, "float32")
    monkeypatch.setattr(tuning, "AUTOTUNE", False)
    assert tuning.launch_config({}, key, {"BLOCK_M": 64, "num_warps": 4}, fixed={"num_warps": 8}) == \
        {"BLOCK_M": 64, "num_warps": 8}
    assert tuning.launch_config({key: {"num_stages": 2}}, key, {"BLOCK_M": 64}) == {"num_stages": 2}
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    assert tuning.launch_config({}, key, {"BLOCK_M": 64}) is None
    assert tuning.launch_config({key: {"num_stages": 2}}, key, {"BLOCK_M": 64}) == {"num_stages": 2}
