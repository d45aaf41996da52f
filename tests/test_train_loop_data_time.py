"""The training loop's own share of the per-step breakdown: time spent reading batches."""

from __future__ import annotations

import time

from model.tiny import learnable_splits, tiny_config

from ndp.metrics import read_metrics
from ndp.reference import ReferenceEngine
from ndp.train_loop import run_training

READ_DELAY_S = 0.05


class _SlowReads:
    """A split whose every batch takes READ_DELAY_S to read (a slow disk)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.num_samples = inner.num_samples

    def batches(self, batch_size: int, *, start_batch: int = 0):
        for batch in self.inner.batches(batch_size, start_batch=start_batch):
            time.sleep(READ_DELAY_S)
            yield batch


def test_train_lines_count_the_seconds_spent_reading_batches(tmp_path):
    cfg = tiny_config(
        train={"batch_size": 32, "device": "cpu", "steps": 4},
        logging={"progress_bar": False, "interval_steps": 2},
    )
    train, val = learnable_splits(cfg, 128, 32)
    run_training(cfg, ReferenceEngine(cfg), tmp_path, train_data=_SlowReads(train), val_data=val)

    lines = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in lines] == [1, 3]
    for line in lines:  # two reads per line, each at least READ_DELAY_S
        assert 2 * READ_DELAY_S <= line["data_s"] < line["time_s"]
