"""The one metrics writer (JSON lines) and the validation metrics of a click model.

Why JSON lines: one self-describing record per line can be appended while a run is live,
tailed, and read by `ndp-bench` and plotting scripts without a schema. Every record carries
`type` (`train`, `eval`, ...) and `step`; both the reference and the distributed path write
through `MetricsWriter`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC
from torchrec.metrics.calibration import (
    CALIBRATION_DENOM,
    CALIBRATION_NUM,
    compute_calibration,
    get_calibration_states,
)
from torchrec.metrics.ne import compute_ne, get_ne_states

NE_ETA = 1e-12
"""Clamp of probabilities and the base rate away from 0 and 1, as torchrec's NE metric."""


class MetricsWriter:
    """Appends one JSON object per line to `path` and flushes it, so a crash loses nothing.

    With `tensorboard_dir`, every numeric field of a record with a `step` is also written as
    a TensorBoard scalar named `<type>/<field>` (e.g. `train/loss`, `eval/auc`), so the
    JSONL file stays the one source and TensorBoard a view of it.
    """

    def __init__(self, path: str | Path, *, tensorboard_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._tensorboard = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        """Write `record` (JSON-serialisable; non-finite floats become null)."""
        self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._file.flush()
        if self._tensorboard is not None and isinstance(record.get("step"), int):
            kind = record.get("type", "metrics")
            for key, value in record.items():
                if key not in ("step", "type") and isinstance(value, int | float):
                    self._tensorboard.add_scalar(f"{kind}/{key}", value, record["step"])
            self._tensorboard.flush()

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file, in order."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


class BinaryEvaluator:
    """Streams logits and labels over validation batches; `compute` gives the click metrics.

    - AUC and accuracy: torchmetrics (accuracy at threshold 0.5 on the sigmoid).
    - logloss: mean binary cross-entropy (natural log) over every sample seen.
    - NE (normalized entropy): torchrec's `compute_ne`, the cross-entropy of the predictions
      divided by the entropy of the base click rate of the labels seen. 1.0 is what always
      predicting the base rate scores; below 1 the model knows more than the click rate.
    - calibration: torchrec's `compute_calibration`, sum of predicted click probabilities
      over sum of clicks; 1 means as many clicks predicted as happened.

    NE and calibration keep torchrec RecMetrics' states (sums over the samples, in float64),
    built by torchrec's `get_ne_states` and `get_calibration_states`.
    """

    def __init__(self) -> None:
        self._auroc = BinaryAUROC()
        self._accuracy = BinaryAccuracy(threshold=0.5)
        self._loss_sum = 0.0
        self._num_samples = 0
        self._states: dict[str, torch.Tensor] = {}

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: logits [B] (any device), labels [B] in {0, 1}."""
        logits = logits.detach().float().cpu()
        labels = labels.detach().float().cpu()
        probabilities = torch.sigmoid(logits)
        targets = labels.long()
        self._auroc.update(probabilities, targets)
        self._accuracy.update(probabilities, targets)
        self._loss_sum += float(
            torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        )
        self._num_samples += int(labels.numel())
        for name, value in rec_metric_states(torch.sigmoid(logits.double()), labels).items():
            self._states[name] = self._states.get(name, 0.0) + value

    def compute(self) -> dict[str, float | int]:
        """{"auc", "logloss", "ne", "calibration", "accuracy", "num_samples"}; NaN when empty."""
        if self._num_samples == 0:
            nan = float("nan")
            return {
                "auc": nan,
                "logloss": nan,
                "ne": nan,
                "calibration": nan,
                "accuracy": nan,
                "num_samples": 0,
            }
        return {
            "auc": float(self._auroc.compute()),
            "logloss": self._loss_sum / self._num_samples,
            "ne": ne_of_states(self._states),
            "calibration": float(
                compute_calibration(self._states[CALIBRATION_NUM], self._states[CALIBRATION_DENOM])
            ),
            "accuracy": float(self._accuracy.compute()),
            "num_samples": self._num_samples,
        }


def rec_metric_states(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchrec RecMetrics' NE and calibration states of one batch (unit weights).

    Args:
        probabilities: [B] predicted click probabilities.
        labels: [B] in {0, 1}.

    Returns:
        0-d float64 sums: `cross_entropy_sum` (bits), `weighted_num_samples`, `pos_labels`,
        `neg_labels`, `calibration_num`, `calibration_denom`; add two batches' states to get
        the states of both.
    """
    probabilities = probabilities.double().clone()  # torchrec clamps its predictions in place
    labels = labels.double()
    weights = torch.ones_like(labels)
    return {
        **get_ne_states(labels, probabilities, weights, NE_ETA),
        **get_calibration_states(labels, probabilities, weights),
    }


def ne_of_states(states: dict[str, torch.Tensor]) -> float:
    """NE from torchrec's states (`rec_metric_states`, or summed over batches)."""
    return float(
        compute_ne(
            states["cross_entropy_sum"],
            states["weighted_num_samples"],
            states["pos_labels"],
            states["neg_labels"],
            NE_ETA,
        )
    )


def windowed_ne(mean_losses: list[float], labels: list[torch.Tensor]) -> float:
    """NE over a window of training steps, from each step's mean loss and its labels.

    A training step reports the mean binary cross-entropy (natural log) of its batch's
    predictions before the update, so the window's cross-entropy sum in bits, the state
    torchrec's `compute_ne` needs, is sum(loss * batch size) / ln 2; the other states come
    from the labels. The predictions themselves need not leave the engine.

    Args:
        mean_losses: per step, the batch's mean BCE-with-logits loss.
        labels: per step, the batch's labels [B] in {0, 1}.
    """
    assert len(mean_losses) == len(labels) and labels, "one loss per batch of labels"
    num_samples = sum(step_labels.numel() for step_labels in labels)
    num_clicks = sum(float(step_labels.double().sum()) for step_labels in labels)
    cross_entropy_nats = sum(
        loss * step_labels.numel() for loss, step_labels in zip(mean_losses, labels, strict=True)
    )
    # the states `get_ne_states` would build from the predictions, with unit weights
    states = {
        "cross_entropy_sum": cross_entropy_nats / math.log(2),
        "weighted_num_samples": float(num_samples),
        "pos_labels": num_clicks,
        "neg_labels": num_samples - num_clicks,
    }
    states = {name: torch.tensor(value, dtype=torch.float64) for name, value in states.items()}
    return ne_of_states(states)


def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float | int]:
    """Click metrics of one set of predictions (see `BinaryEvaluator`)."""
    evaluator = BinaryEvaluator()
    evaluator.update(logits, labels)
    return evaluator.compute()


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats replaced by None (strict JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
