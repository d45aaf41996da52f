"""The single-process reference trainer and the training loop that drives it."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch
from model.tiny import (
    InMemoryDataset,
    learnable_splits,
    random_sparse,
    tiny_config,
    torchrec_dlrm_with_same_weights,
)

from ndp.data.batch import Batch
from ndp.data.loader import build_datasets
from ndp.errors import ConfigError, DataError
from ndp.metrics import read_metrics
from ndp.reference import ReferenceEngine
from ndp.train_loop import run_training, training_batches

PHASES = {
    "data_to_device_s",
    "embedding_forward_s",
    "dense_compute_s",
    "embedding_backward_update_s",
    "dense_optimizer_s",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**train):
    return tiny_config(
        train={"batch_size": 32, "device": "cpu", **train},
        optimizer={
            "dense": {"name": "adagrad", "lr": 0.05},
            "sparse": {"name": "rowwise_adagrad", "lr": 0.1},
        },
        logging={"progress_bar": False, "interval_steps": 1},
    )


def test_train_step_returns_the_loss_before_the_update():
    cfg = _cfg()
    engine = ReferenceEngine(cfg)
    train, _ = learnable_splits(cfg, 64, 32)
    batch = next(train.batches(32))
    before = torch.nn.functional.binary_cross_entropy_with_logits(
        engine.predict(0, batch), batch.labels
    )

    loss = engine.train_step(0, batch)
    after = torch.nn.functional.binary_cross_entropy_with_logits(
        engine.predict(1, batch), batch.labels
    )

    assert loss == pytest.approx(float(before), rel=1e-5)
    assert float(after) < loss


def test_train_step_updates_both_halves_and_predict_updates_neither():
    cfg = _cfg()
    engine = ReferenceEngine(cfg)
    train, _ = learnable_splits(cfg, 64, 32)
    batch = next(train.batches(32))
    rows = engine.embeddings.table_weights("t0").clone()
    dense = [p.detach().clone() for p in engine.dense_half.parameters()]

    engine.predict(0, batch)
    assert torch.equal(engine.embeddings.table_weights("t0"), rows)
    assert all(
        torch.equal(p, q) for p, q in zip(engine.dense_half.parameters(), dense, strict=True)
    )

    engine.train_step(0, batch)
    assert not torch.equal(engine.embeddings.table_weights("t0"), rows)
    assert any(
        not torch.equal(p, q) for p, q in zip(engine.dense_half.parameters(), dense, strict=True)
    )


def test_timings_report_every_phase_once_then_reset():
    cfg = _cfg()
    engine = ReferenceEngine(cfg)
    train, _ = learnable_splits(cfg, 64, 32)
    engine.train_step(0, next(train.batches(32)))
    timings = engine.timings()
    assert set(timings) == PHASES
    assert all(seconds >= 0 for seconds in timings.values())
    assert engine.timings() == {}


def test_cuda_device_without_cuda_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has cuda")
    with pytest.raises(ConfigError, match="train.device"):
        ReferenceEngine(_cfg(device="cuda"))


def test_auc_beats_070_on_the_synthetic_generators_learnable_task(tmp_path):
    cfg = tiny_config(
        train={"batch_size": 64, "device": "cpu", "epochs": 2},
        data={"synthetic": {"num_samples": 4096, "num_val_samples": 1024}},
        optimizer={"dense": {"name": "adagrad", "lr": 0.05}, "sparse": {"lr": 0.1}},
        logging={"progress_bar": False},
    )
    train, val = build_datasets(cfg)
    summary = run_training(cfg, ReferenceEngine(cfg), tmp_path, train_data=train, val_data=val)

    assert summary["steps"] == 2 * 4096 // 64
    assert summary["final_eval"]["num_samples"] == 1024
    assert summary["final_eval"]["auc"] > 0.70


def test_loss_decreases_and_auc_beats_070_when_only_an_embedding_can_learn(tmp_path):
    cfg = _cfg(epochs=2, eval_batches=None)
    train, val = learnable_splits(cfg, 1024, 512)
    summary = run_training(cfg, ReferenceEngine(cfg), tmp_path, train_data=train, val_data=val)

    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["type"] == "train"]
    assert len(losses) == 2 * 1024 // 32
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.05
    assert summary["final_eval"]["auc"] > 0.70


def test_tiny_run_writes_one_train_line_per_step_and_a_final_eval(tmp_path):
    cfg = _cfg(steps=5)
    train, val = learnable_splits(cfg, 96, 64)
    summary = run_training(
        cfg, ReferenceEngine(cfg), tmp_path, train_data=train, val_data=val, mode="reference"
    )

    records = read_metrics(tmp_path / "metrics.jsonl")
    train_lines = [r for r in records if r["type"] == "train"]
    eval_lines = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train_lines] == [0, 1, 2, 3, 4]
    for line in train_lines:
        assert {"loss", "samples_per_s", "time_s"} | PHASES <= set(line)
        assert line["samples_per_s"] > 0
    assert len(eval_lines) == 1
    assert eval_lines[0]["step"] == 4
    assert eval_lines[0]["num_samples"] == 64
    assert 0 <= eval_lines[0]["auc"] <= 1 and 0 <= eval_lines[0]["accuracy"] <= 1
    assert eval_lines[0]["logloss"] > 0

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert summary["mode"] == "reference"
    assert summary["steps"] == 5 and summary["samples"] == 5 * 32
    assert summary["interrupted"] is False
    assert summary["final_train_loss"] == train_lines[-1]["loss"]
    assert summary["final_eval"] == eval_lines[0]
    assert summary["samples_per_s"] > 0


def test_periodic_eval_every_interval_and_at_the_end_capped_by_eval_batches(tmp_path):
    cfg = _cfg(steps=5, eval_interval_steps=2, eval_batches=1)
    train, val = learnable_splits(cfg, 96, 96)
    run_training(cfg, ReferenceEngine(cfg), tmp_path, train_data=train, val_data=val)

    eval_lines = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["type"] == "eval"]
    assert [r["step"] for r in eval_lines] == [1, 3, 4]
    assert all(r["num_samples"] == 32 for r in eval_lines)


def test_interval_steps_thins_the_train_lines(tmp_path):
    cfg = tiny_config(
        train={"batch_size": 32, "device": "cpu", "steps": 6},
        logging={"progress_bar": False, "interval_steps": 4},
    )
    train, val = learnable_splits(cfg, 96, 32)
    run_training(cfg, ReferenceEngine(cfg), tmp_path, train_data=train, val_data=val)
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["type"] == "train"]
    assert steps == [3, 5]


def test_steps_beyond_one_epoch_wrap_around_in_the_same_order():
    cfg = _cfg()
    train, _ = learnable_splits(cfg, 3 * 32 + 5, 32)  # 3 full batches, 5 samples dropped
    first_dense = [b.dense[0, 0].item() for b in train.batches(32)]

    seen = [(step, batch.dense[0, 0].item()) for step, batch in training_batches(train, 32, 7)]

    assert [step for step, _ in seen] == list(range(7))
    assert [value for _, value in seen] == [first_dense[i % 3] for i in range(7)]


def test_epochs_set_the_number_of_steps(tmp_path):
    cfg = _cfg(epochs=2, steps=None)
    train, val = learnable_splits(cfg, 100, 32)
    summary = run_training(cfg, ReferenceEngine(cfg), tmp_path, train_data=train, val_data=val)
    assert summary["steps"] == 2 * (100 // 32)


def test_training_split_smaller_than_a_batch_is_a_data_error(tmp_path):
    cfg = _cfg(steps=1)
    train, val = learnable_splits(cfg, 10, 32)
    with pytest.raises(DataError, match="train.batch_size"):
        run_training(cfg, ReferenceEngine(cfg), tmp_path, train_data=train, val_data=val)


class _InterruptingEngine(ReferenceEngine):
    """A real reference engine whose user presses Ctrl-C during step `interrupt_at`."""

    interrupt_at = 2

    def train_step(self, step, batch):
        loss = super().train_step(step, batch)
        if step == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return loss


def test_ctrl_c_stops_after_the_current_step_and_still_writes_the_summary(tmp_path):
    cfg = _cfg(steps=10)
    train, val = learnable_splits(cfg, 96, 32)
    previous_handler = signal.getsignal(signal.SIGINT)

    summary = run_training(cfg, _InterruptingEngine(cfg), tmp_path, train_data=train, val_data=val)

    assert summary["interrupted"] is True
    assert summary["steps"] == 3
    assert json.loads((tmp_path / "summary.json").read_text())["interrupted"] is True
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["type"] == "train"]
    assert steps == [0, 1, 2]
    assert signal.getsignal(signal.SIGINT) is previous_handler


def test_in_memory_dataset_yields_full_batches_only():
    cfg = _cfg()
    train, _ = learnable_splits(cfg, 70, 32)
    assert isinstance(train, InMemoryDataset)
    assert [b.batch_size for b in train.batches(32)] == [32, 32]


def test_one_sgd_step_equals_plain_autograd_through_a_torchrec_dlrm():
    """Cutting the graph at the pooled vectors and the fused sparse update change nothing."""
    cfg = tiny_config(
        train={"batch_size": 8, "device": "cpu"},
        optimizer={"dense": {"name": "sgd", "lr": 0.3}, "sparse": {"name": "sgd", "lr": 0.7}},
    )
    engine = ReferenceEngine(cfg)
    dlrm = torchrec_dlrm_with_same_weights(cfg, engine.embeddings, engine.dense_half)
    batch = Batch(
        dense=torch.randn(8, 13, generator=torch.Generator().manual_seed(4)),
        sparse=random_sparse(cfg, batch_size=8, seed=9),
        labels=torch.tensor([1.0, 0, 0, 1, 1, 0, 1, 0]),
    )

    loss = engine.train_step(0, batch)
    expected_loss = torch.nn.functional.binary_cross_entropy_with_logits(
        dlrm(batch.dense, batch.sparse).squeeze(-1), batch.labels
    )
    expected_loss.backward()
    with torch.no_grad():
        for name, param in dlrm.named_parameters():
            param -= (0.7 if name.startswith("sparse_arch.") else 0.3) * param.grad

    assert loss == pytest.approx(float(expected_loss.detach()), rel=1e-6)
    for name, param in engine.dense_half.state_dict().items():
        torch.testing.assert_close(param, dlrm.state_dict()[name], rtol=1e-5, atol=1e-6)
    bags = dlrm.sparse_arch.embedding_bag_collection.embedding_bags
    for table in cfg.model.tables:
        torch.testing.assert_close(
            engine.embeddings.table_weights(table.name),
            bags[table.name].weight,
            rtol=1e-5,
            atol=1e-6,
        )


def test_progress_bar_shows_samples_per_s_and_loss(tmp_path, capsys):
    cfg = tiny_config(
        train={"batch_size": 32, "device": "cpu", "steps": 3},
        logging={"progress_bar": True, "interval_steps": 1},
    )
    train, val = learnable_splits(cfg, 96, 32)
    run_training(cfg, ReferenceEngine(cfg), tmp_path, train_data=train, val_data=val)

    bar = capsys.readouterr().err
    assert "3/3" in bar
    assert re.search(r"loss=\d+\.\d{4}", bar) and re.search(r"samples_per_s=\d+", bar)
