"""A young model's BatchNorm statistics are re-estimated before it is validated (issue #16 item 12)."""
from __future__ import annotations

from pathlib import Path

import torch

from r2unet_fast.train.config import TrainConfig
from r2unet_fast.train.distributed import DistContext
from r2unet_fast.train.norm_calibration import calibration_indices, recalibrate_batchnorm
from r2unet_fast.train.trainer import Trainer


def test_recalibrate_batchnorm_is_the_average_over_the_batches() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    norm = model[1]
    norm.num_batches_tracked.fill_(17)
    batches = [{"image": torch.randn(5, 3, 8, 8) * (i + 1)} for i in range(3)]
    weights = {k: v.clone() for k, v in model[0].state_dict().items()}
    assert recalibrate_batchnorm(model, batches, torch.device("cpu")) == 1
    with torch.no_grad():
        outputs = [model[0](batch["image"]) for batch in batches]
    mean = torch.stack([out.mean(dim=(0, 2, 3)) for out in outputs]).mean(0)
    var = torch.stack([out.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for out in outputs]).mean(0)
    torch.testing.assert_close(norm.running_mean, mean)
    torch.testing.assert_close(norm.running_var, var)
    assert norm.momentum == 0.1 and int(norm.num_batches_tracked) == 17 and not model.training
    assert all(torch.equal(v, model[0].state_dict()[k]) for k, v in weights.items())


def test_calibration_batches_are_whole_equal_per_rank_and_seeded() -> None:
    ranks = [calibration_indices(10, 4, rank, 2, seed=3, epoch=0) for rank in range(2)]
    assert [len(r) for r in ranks] == [8, 8]  # 2 batches of 4 on each rank, wrapping round the 10 images
    assert set(ranks[0] + ranks[1]) == set(range(10))
    assert ranks[0] == calibration_indices(10, 4, 0, 2, seed=3, epoch=0)
    assert ranks[0] != calibration_indices(10, 4, 0, 2, seed=3, epoch=1)


def _stale(model: torch.nn.Module) -> None:
    """Running statistics far from what the weights produce, as after a fast first epoch."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.fill_(-30.0)
            module.running_var.fill_(1e-3)


def test_a_young_model_is_validated_with_statistics_of_its_current_weights(tmp_path: Path) -> None:
    config = TrainConfig(synthetic_sizes=(12, 6, 6), image_size=32, base_channels=4, depth=3, batch_size=4,
                         epochs=3, workers=0, device="cpu", preview=0)
    trainer = Trainer(config, DistContext(), tmp_path / "run")
    _stale(trainer.model)
    stale = trainer.validate(trainer.eval_loaders["val"])["loss"]
    rng = torch.get_rng_state()
    trainer.calibrate_norms(epoch=0)
    assert torch.equal(torch.get_rng_state(), rng), "calibration must not draw from the global RNG (resume)"
    calibrated = trainer.validate(trainer.eval_loaders["val"])["loss"]
    assert calibrated < 2.0 < stale  # an untrained model's hybrid loss is about 1
    _stale(trainer.model)
    trainer.calibrate_norms(epoch=1)  # past the warm-up: the running averages are left alone
    assert all(bool((m.running_mean == -30.0).all()) for m in trainer.model.modules()
               if isinstance(m, torch.nn.BatchNorm2d))
