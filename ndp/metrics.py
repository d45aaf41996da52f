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

    AUC and accuracy come from torchmetrics (threshold 0.5 on the sigmoid); logloss is the
    mean binary cross-entropy of the logits over every sample seen.
    """

    def __init__(self) -> None:
        self._auroc = BinaryAUROC()
        self._accuracy = BinaryAccuracy(threshold=0.5)
        self._loss_sum = 0.0
        self._num_samples = 0

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

    def compute(self) -> dict[str, float | int]:
        """{"auc", "logloss", "accuracy", "num_samples"}; all NaN when nothing was seen."""
        if self._num_samples == 0:
            nan = float("nan")
            return {"auc": nan, "logloss": nan, "accuracy": nan, "num_samples": 0}
        return {
            "auc": float(self._auroc.compute()),
            "logloss": self._loss_sum / self._num_samples,
            "accuracy": float(self._accuracy.compute()),
            "num_samples": self._num_samples,
        }


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
