"""Metrics: per image then mean; against torchmetrics, hand-counted edge cases, streaming equality."""
import pytest
import torch
from torchmetrics.functional.classification import (binary_accuracy, binary_f1_score, binary_jaccard_index,
                                                    binary_recall, binary_specificity)

from r2unet_fast.metrics import (METRICS, MetricAccumulator, confusion_counts, metrics_from_counts,
                                 segmentation_metrics)

TM = {"accuracy": binary_accuracy, "sensitivity": binary_recall, "specificity": binary_specificity,
      "dice": binary_f1_score, "jaccard": binary_jaccard_index}


def _batch(n=5, h=13, w=11):
    probs = torch.rand(n, 1, h, w)
    target = (torch.rand(n, 1, h, w) > 0.6).float()
    return probs, target


def test_matches_torchmetrics_per_image_mean():
    probs, target = _batch()
    got = segmentation_metrics(probs, target)
    for name, fn in TM.items():
        expected = torch.stack([fn(p, t.long(), threshold=0.5) for p, t in zip(probs, target)]).mean()
        assert got[name] == pytest.approx(float(expected), abs=1e-6), name


def test_hand_counted_image():
    target = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float32).reshape(1, 1, 2, 4)
    probs = torch.tensor([[0.9, 0.2, 0.7, 0.1], [0.6, 0.4, 0.3, 0.5]]).reshape(1, 1, 2, 4)
    # pred > 0.5: [1,0,1,0],[1,0,0,0]; tp=2 fp=1 fn=1 tn=4 (0.5 itself is not foreground)
    assert confusion_counts(probs, target).tolist() == [[2, 1, 4, 1]]
    m = segmentation_metrics(probs, target)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["dice"] == pytest.approx(4 / 6)
    assert m["jaccard"] == pytest.approx(2 / 4)
    assert m["thresholded_jaccard"] == 0.0  # 0.5 < 0.65


def test_empty_mask_and_empty_prediction_score_one():
    zeros = torch.zeros(1, 1, 4, 4)
    assert segmentation_metrics(zeros, zeros) == {k: 1.0 for k in METRICS}


def test_empty_mask_with_a_false_positive():
    target = torch.zeros(1, 1, 2, 2)
    probs = torch.tensor([0.9, 0.1, 0.1, 0.1]).reshape(1, 1, 2, 2)
    m = segmentation_metrics(probs, target)
    assert m["sensitivity"] == 1.0  # no lesion to miss
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0


def test_missed_lesion_with_empty_prediction():
    target = torch.ones(1, 1, 2, 2)
    m = segmentation_metrics(torch.zeros(1, 1, 2, 2), target)
    assert m["sensitivity"] == 0.0 and m["specificity"] == 1.0 and m["dice"] == 0.0 and m["accuracy"] == 0.0


def test_thresholded_jaccard_keeps_scores_at_or_above_065():
    counts = torch.tensor([[65, 35, 0, 0], [64, 36, 0, 0], [90, 5, 0, 5]])
    per_image = metrics_from_counts(counts)
    torch.testing.assert_close(per_image["thresholded_jaccard"], torch.tensor([0.65, 0.0, 0.9], dtype=torch.float64))


def test_means_are_over_images_not_pixels():
    target = torch.zeros(2, 1, 10, 10)
    target[0, :, :1, :1] = 1  # tiny lesion, missed
    target[1] = 1  # huge lesion, found
    probs = target.clone()
    probs[0] = 0
    assert segmentation_metrics(probs, target)["jaccard"] == pytest.approx(0.5)


def test_accumulator_streams_to_the_same_answer():
    probs, target = _batch(n=7)
    acc = MetricAccumulator()
    for i in range(0, 7, 3):
        acc.update(probs[i:i + 3], target[i:i + 3], ids=[f"img{j}" for j in range(i, min(i + 3, 7))])
    assert acc.count == 7
    full = segmentation_metrics(probs, target)
    assert acc.compute() == pytest.approx(full, abs=1e-12)
    rows = acc.per_image()
    assert [r["id"] for r in rows] == [f"img{j}" for j in range(7)]
    assert sum(r["dice"] for r in rows) / 7 == pytest.approx(full["dice"])


def test_accumulator_errors_and_reset():
    acc = MetricAccumulator()
    with pytest.raises(ValueError, match="before any update"):
        acc.compute()
    acc.update(*_batch(n=2))
    acc.reset()
    assert acc.count == 0 and acc.per_image() == []


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="one shape"):
        segmentation_metrics(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5))
