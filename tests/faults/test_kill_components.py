"""Components SIGKILLed mid-run: the job restarts, rolls back, and ends with the same model.

Each run trains the tiny two-node job of `tests/checkpoint/jobs.py` for `STEPS` steps with a
checkpoint every 3 steps and lookahead depth 1 (so prefetch clients exist when a node dies).
A component's process is killed with SIGKILL before step 5; `ResilientEngine` must notice
(the next step fails), restart every actor, roll back to the step-3 checkpoint, replay and
finish with every embedding row, optimizer state and dense parameter within 1e-6 of an
uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "checkpoint"))
from jobs import STEPS, assert_same_model, model_of, tiny_job  # noqa: E402

from ndp.coordinator import NdpEngine  # noqa: E402
from ndp.data.loader import build_datasets  # noqa: E402
from ndp.pipeline import with_lookahead  # noqa: E402
from ndp.recovery import RecoveryError, ResilientEngine  # noqa: E402
from ndp.train_loop import training_batches  # noqa: E402

pytestmark = [pytest.mark.ray]

KILL_BEFORE_STEP = 5


def _job(**checkpoint):
    cfg = tiny_job(interval_steps=3, **checkpoint)
    return replace(cfg, pipeline=replace(cfg.pipeline, lookahead_depth=1))


def _train(cfg, root, *, kill: str | None = None):
    """Train `STEPS` steps; SIGKILL component `kill` before step 5. -> (restarts, model)."""
    data = build_datasets(cfg)[0]
    with NdpEngine(cfg) as engine:
        job = ResilientEngine(engine, cfg, checkpoint_root=root, train_data=data, total_steps=STEPS)
        batches = training_batches(data, cfg.train.batch_size, STEPS)
        for step, batch in with_lookahead(batches, job, cfg.pipeline):
            if kill is not None and step == KILL_BEFORE_STEP:
                os.kill(engine.component_pids()[kill], signal.SIGKILL)
            job.train_step(step, batch)
        return job.restarts, model_of(engine, cfg)


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory):
    return _train(_job(), tmp_path_factory.mktemp("straight"))[1]


@pytest.mark.parametrize("component", ["storage-node-1", "gpu-worker-0"])
def test_killed_component_is_restarted_once_and_the_model_equals_an_uninterrupted_run(
    uninterrupted, tmp_path, component
):
    restarts, recovered = _train(_job(), tmp_path, kill=component)
    # one restart: the lookahead prefetch clients follow the fresh nodes (no second failure)
    assert restarts == 1
    assert_same_model(recovered, uninterrupted)


def test_without_restarts_left_the_error_names_component_cause_and_last_checkpoint(
    ray_session, tmp_path
):
    with pytest.raises(RecoveryError) as raised:
        _train(_job(max_restarts=0), tmp_path, kill="storage-node-0")
    message = str(raised.value)
    assert "a storage node failed at step 5" in message
    assert "StorageNodeUnavailableError" in message  # the cause
    assert str(tmp_path / "step-00000002") in message  # last good checkpoint (3 steps done)
    assert "checkpoint.max_restarts=0" in message
