"""A storage node SIGKILLed mid-run: the job restarts, rolls back, and ends with the same model."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "checkpoint"))
from jobs import STEPS, assert_same_model, model_of, tiny_job  # noqa: E402

from ndp.coordinator import NdpEngine  # noqa: E402
from ndp.data.loader import build_datasets  # noqa: E402
from ndp.recovery import RecoveryError, ResilientEngine  # noqa: E402
from ndp.train_loop import training_batches  # noqa: E402

pytestmark = [pytest.mark.ray]


def _train(cfg, root, *, kill: str | None = None):
    data = build_datasets(cfg)[0]
    with NdpEngine(cfg) as engine:
        job = ResilientEngine(engine, cfg, checkpoint_root=root, train_data=data, total_steps=STEPS)
        for step, batch in training_batches(data, cfg.train.batch_size, STEPS):
            if kill is not None and step == 5:
                os.kill(engine.component_pids()[kill], signal.SIGKILL)
            job.train_step(step, batch)
        return job.restarts, model_of(engine, cfg)


def test_killed_storage_node_is_restarted_and_the_model_equals_an_uninterrupted_run(
    ray_session, tmp_path
):
    cfg = tiny_job(interval_steps=3)
    _, straight = _train(cfg, tmp_path / "straight")
    restarts, recovered = _train(cfg, tmp_path / "killed", kill="storage-node-1")
    assert restarts == 1
    assert_same_model(recovered, straight)


def test_without_restarts_left_the_error_names_component_and_last_checkpoint(ray_session, tmp_path):
    cfg = tiny_job(interval_steps=3, max_restarts=0)
    with pytest.raises(RecoveryError, match=r"storage node.*step-00000002"):
        _train(cfg, tmp_path, kill="storage-node-0")
