"""`make train`'s config (configs/dlrm.yaml) learns on the shipped sample, and a run reports NE
and calibration wherever it reports validation quality.

Every test reads one full run of the default config in reference mode: the same model, data,
seed and numbers as ndp mode (which only moves the embedding half onto storage nodes), in
about 10 s on 2 cores instead of a minute or two.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ndp.config import load_config
from ndp.data.loader import build_datasets
from ndp.metrics import read_metrics, windowed_ne
from ndp.train_loop import ne_window_steps, training_batches

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "dlrm.yaml"
NDP_TRAIN = Path(sys.executable).parent / "ndp-train"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, str]:
    """(run dir, stdout) of `ndp-train --config configs/dlrm.yaml` (reference mode).

    Only logging differs from `make train`: a train record per step and TensorBoard on.
    """
    run_dir = tmp_path_factory.mktemp("default") / "run"
    result = subprocess.run(
        [
            str(NDP_TRAIN),
            "--config",
            str(DEFAULT_CONFIG),
            "--mode",
            "reference",
            "--output-dir",
            str(run_dir),
            "--set",
            "logging.interval_steps=1",
            "--set",
            "logging.tensorboard=true",
            "--set",
            "logging.progress_bar=false",
        ],  # fmt: skip
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout


def test_the_default_config_predicts_better_than_the_base_rate_on_the_shipped_sample(
    default_run,
):
    run_dir, _ = default_run
    final_eval = json.loads((run_dir / "summary.json").read_text())["final_eval"]
    assert final_eval["ne"] < 1.0, final_eval


def test_summary_and_final_line_name_ne_and_calibration(default_run):
    run_dir, stdout = default_run
    final_eval = json.loads((run_dir / "summary.json").read_text())["final_eval"]
    assert {"auc", "logloss", "ne", "calibration"} <= final_eval.keys()
    last_line = [line for line in stdout.splitlines() if "validation" in line][-1]
    match = re.search(
        r"validation AUC ([\d.]+), logloss ([\d.]+), NE ([\d.]+), calibration ([\d.]+)", last_line
    )
    assert match, last_line
    for printed, key in zip(match.groups(), ("auc", "logloss", "ne", "calibration"), strict=True):
        assert printed == f"{final_eval[key]:.4f}"


def test_each_train_record_carries_the_ne_of_its_last_window_of_steps(default_run):
    run_dir, _ = default_run
    cfg = load_config(DEFAULT_CONFIG)
    train_data, _ = build_datasets(cfg)
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]
    batch_size = cfg.train.batch_size
    labels = [b.labels for _, b in training_batches(train_data, batch_size, len(records))]
    losses = [r["loss"] for r in records]  # one record per step here
    window = ne_window_steps(batch_size)

    for step in (0, window - 1, window, len(records) - 1):
        first = max(0, step - window + 1)
        expected = windowed_ne(losses[first : step + 1], labels[first : step + 1])
        assert records[step]["ne"] == pytest.approx(expected, rel=1e-9)
    assert window > 1  # the window spans several steps, so the checks above differ


def test_tensorboard_gets_train_ne_and_eval_ne_and_calibration(default_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = default_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    records = read_metrics(run_dir / "metrics.jsonl")
    for kind, key in (("train", "ne"), ("eval", "ne"), ("eval", "calibration")):
        expected = [(r["step"], r[key]) for r in records if r["type"] == kind]
        scalars = [(e.step, e.value) for e in events.Scalars(f"{kind}/{key}")]
        assert [step for step, _ in scalars] == [step for step, _ in expected]
        assert torch.allclose(
            torch.tensor([value for _, value in scalars]),
            torch.tensor([value for _, value in expected], dtype=torch.float32),
        )
