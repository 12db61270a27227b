"""Backend report and resolution: reasons, auto per device, explicit requests that cannot run."""
import pytest
import torch

import r2unet_fast
from r2unet_fast import HybridLoss, ops
from r2unet_fast.ops import dispatch


def test_report_has_every_backend_and_reference_is_available():
    report = r2unet_fast.available_backends()
    assert set(report) == {"reference", "triton", "cpu"}
    assert report["reference"] is None
    assert all(v is None or (isinstance(v, str) and v) for v in report.values())


def test_auto_on_cpu_picks_the_cpu_kernel_when_built_else_reference():
    expected = "cpu" if dispatch.available_backends("hybrid_loss", "cpu")["cpu"] is None else "reference"
    assert dispatch.resolve("hybrid_loss", "auto", torch.device("cpu")) == expected


def test_missing_extension_is_reported_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(dispatch, "_cpu_import_reason", lambda: "the C++ extension is not built (test)")
    assert "not built (test)" in r2unet_fast.available_backends()["cpu"]
    assert dispatch.resolve("hybrid_loss", "auto", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="not built \\(test\\)"):
        ops.hybrid_loss(torch.randn(1, 1, 2, 2), torch.rand(1, 1, 2, 2), backend="cpu")
    with pytest.raises(ValueError, match="not built \\(test\\)"):
        HybridLoss(backend="cpu")


def test_op_without_a_kernel_names_it():
    report = dispatch.available_backends("attention_gate")
    if "cpu" not in dispatch._KERNELS["attention_gate"] and dispatch._cpu_import_reason() is None:
        assert report["cpu"] == "attention_gate has no cpu kernel"
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.available_backends("conv9x9")


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_import_reason", lambda: None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = dispatch._triton_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch._triton_reason(torch.device("cpu")) is None


def test_cpu_backend_rejects_other_devices(monkeypatch):
    monkeypatch.setattr(dispatch, "_cpu_import_reason", lambda: None)
    assert "needs CPU tensors" in dispatch._cpu_reason(torch.device("cuda"))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'gpu'; choose one of auto, reference, triton, cpu"):
        ops.hybrid_loss(torch.randn(1, 1, 2, 2), torch.rand(1, 1, 2, 2), backend="gpu")


def test_hybrid_loss_module_and_named_variants():
    logits, target = torch.randn(2, 1, 6, 6), (torch.rand(2, 1, 6, 6) > 0.5).float()
    loss = HybridLoss(pos_weight=2.0, backend="reference")
    torch.testing.assert_close(loss(logits, target),
                               ops.hybrid_loss(logits, target, pos_weight=2.0, backend="reference"))
    bce = HybridLoss.named("bce", backend="reference")
    torch.testing.assert_close(bce(logits, target), torch.nn.functional.binary_cross_entropy_with_logits(logits, target))
    dice = HybridLoss.named("dice", backend="reference")
    assert (dice.dice_weight, dice.bce_weight) == (1.0, 0.0)
    weighted = HybridLoss.named("hybrid", dice_weight=0.8)
    assert (weighted.dice_weight, weighted.bce_weight) == (0.8, pytest.approx(0.2))
    with pytest.raises(ValueError, match="unknown loss"):
        HybridLoss.named("focal")
