"""Validation metrics and the JSON-lines writer."""

from __future__ import annotations

import math

import pytest
import torch

from ndp.metrics import (
    BinaryEvaluator,
    MetricsWriter,
    evaluate_logits,
    read_metrics,
    windowed_ne,
)


def test_perfectly_ranked_logits_have_auc_1_and_reversed_ones_auc_0():
    labels = torch.tensor([0.0, 0, 1, 1])
    logits = torch.tensor([-2.0, -1.0, 1.0, 3.0])
    assert evaluate_logits(logits, labels)["auc"] == pytest.approx(1.0)
    assert evaluate_logits(-logits, labels)["auc"] == pytest.approx(0.0)


def test_logloss_is_mean_bce_and_accuracy_thresholds_the_sigmoid_at_half():
    labels = torch.tensor([1.0, 0, 1, 0])
    logits = torch.tensor([2.0, 0.5, -1.0, -3.0])  # right, wrong, wrong, right
    metrics = evaluate_logits(logits, labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert metrics["logloss"] == pytest.approx(float(expected), rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["num_samples"] == 4


def test_streaming_over_batches_equals_one_shot():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, generator=gen)
    labels = (torch.rand(300, generator=gen) < torch.sigmoid(logits)).float()
    evaluator = BinaryEvaluator()
    for start in range(0, 300, 64):
        evaluator.update(logits[start : start + 64], labels[start : start + 64])
    streamed, one_shot = evaluator.compute(), evaluate_logits(logits, labels)
    assert streamed == pytest.approx(one_shot, rel=1e-6)


def test_no_samples_give_nan_metrics():
    metrics = BinaryEvaluator().compute()
    assert metrics["num_samples"] == 0 and math.isnan(metrics["auc"])


def test_writer_appends_one_json_object_per_line_and_nulls_non_finite(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        writer.write({"type": "train", "step": 0, "loss": 0.5})
        writer.write({"type": "eval", "step": 0, "auc": float("nan")})
    with MetricsWriter(path) as writer:
        writer.write({"type": "train", "step": 1, "loss": float("inf")})

    assert read_metrics(path) == [
        {"type": "train", "step": 0, "loss": 0.5},
        {"type": "eval", "step": 0, "auc": None},
        {"type": "train", "step": 1, "loss": None},
    ]


def test_tensorboard_mirror_holds_the_same_scalars_as_the_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb") as writer:
        writer.write({"type": "train", "step": 0, "loss": 0.75, "samples_per_s": 10.0})
        writer.write({"type": "train", "step": 1, "loss": 0.5, "samples_per_s": 12.0})
        writer.write({"type": "eval", "step": 1, "auc": 0.8})

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(0, 0.75), (1, 0.5)]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("eval/auc")] == [(1, 0.8)]
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 3


def _entropy_nats(rate: float) -> float:
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


def test_ne_of_always_predicting_the_base_rate_is_1():
    labels = torch.tensor([1.0, 0, 0, 0] * 25)  # base rate 1/4
    logits = torch.full((100,), math.log(0.25 / 0.75))
    assert evaluate_logits(logits, labels)["ne"] == pytest.approx(1.0, rel=1e-6)


def test_ne_is_logloss_over_the_entropy_of_the_base_rate():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(500, generator=gen) - 2.0
    labels = (torch.rand(500, generator=gen) < torch.sigmoid(logits)).float()
    metrics = evaluate_logits(logits, labels)
    base_rate = float(labels.mean())
    assert metrics["ne"] == pytest.approx(metrics["logloss"] / _entropy_nats(base_rate), rel=1e-5)


def test_informative_predictions_have_ne_below_1_and_misleading_ones_above():
    gen = torch.Generator().manual_seed(2)
    logits = 2.0 * torch.randn(2000, generator=gen) - 2.0
    labels = (torch.rand(2000, generator=gen) < torch.sigmoid(logits)).float()
    assert evaluate_logits(logits, labels)["ne"] < 0.9
    assert evaluate_logits(-logits, labels)["ne"] > 1.5


def test_calibration_of_a_perfectly_calibrated_predictor_is_1():
    # predicted 0.25 where 1 in 4 click, 0.75 where 3 in 4 click
    labels = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0])
    probabilities = torch.tensor([0.25] * 4 + [0.75] * 4)
    metrics = evaluate_logits(torch.logit(probabilities), labels)
    assert metrics["calibration"] == pytest.approx(1.0, rel=1e-6)


def test_calibration_is_predicted_clicks_over_actual_clicks():
    labels = torch.tensor([1.0, 0, 0, 0])
    probabilities = torch.tensor([0.5, 0.5, 0.5, 0.5])  # predicts 2 clicks, 1 happened
    metrics = evaluate_logits(torch.logit(probabilities), labels)
    assert metrics["calibration"] == pytest.approx(2.0, rel=1e-6)


def test_windowed_ne_from_step_losses_equals_the_ne_of_the_window_predictions():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 64, generator=gen) - 1.5
    labels = (torch.rand(4, 64, generator=gen) < torch.sigmoid(logits)).float()
    mean_losses = [
        float(torch.nn.functional.binary_cross_entropy_with_logits(step_logits, step_labels))
        for step_logits, step_labels in zip(logits, labels, strict=True)
    ]
    expected = evaluate_logits(logits.flatten(), labels.flatten())["ne"]
    assert windowed_ne(mean_losses, list(labels)) == pytest.approx(expected, rel=1e-5)


def test_ne_and_calibration_reach_tensorboard_as_eval_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    labels = torch.tensor([1.0, 0, 0, 0])
    record = {"type": "eval", "step": 3, **evaluate_logits(torch.zeros(4), labels)}
    with MetricsWriter(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb") as writer:
        writer.write(record)

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    (calibration,) = events.Scalars("eval/calibration")
    (ne,) = events.Scalars("eval/ne")
    assert (calibration.step, round(calibration.value, 5)) == (3, 2.0)
    assert ne.value == pytest.approx(record["ne"], rel=1e-6)
