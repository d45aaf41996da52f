"""Components SIGKILLed or SIGSTOPped mid-run: the job restarts, rolls back, and ends with the
same model.

Each run trains the tiny two-node job of `tests/checkpoint/jobs.py` for `STEPS` steps with a
checkpoint every 3 steps and lookahead depth 1 (so workers hold prefetched shares when a
component dies), early pooling off: with it, a step's pooled vectors are "pooled before the
previous update, then corrected" or "pooled after it" depending on which RPC a node serves
first, and after a restart the first step always pools afresh, so runs agree only up to
float rounding (6e-8 measured), which a ReLU input near zero can amplify past 1e-6 (seen
once in a full-suite run). Without it the recovered model is bit-for-bit the uninterrupted
one (measured: 0.0). Early pooling's exactness is checked against the reference in tests/pipeline.
A component's process is killed with SIGKILL (or stopped with SIGSTOP: it hangs without
dying, which only `cluster.step_timeout_s` notices) before step 5; `ResilientEngine` must
notice (the next step fails or times out), restart every actor, roll back to the step-3
checkpoint, replay and finish with every embedding row, optimizer state and dense parameter
within 1e-6 of an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
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
STEP_TIMEOUT_S = 5.0
"""`cluster.step_timeout_s` of the SIGSTOP runs: how long a stopped component goes unnoticed."""


def _job(**checkpoint):
    cfg = tiny_job(interval_steps=3, **checkpoint)
    return replace(cfg, pipeline=replace(cfg.pipeline, lookahead_depth=1, early_pooling=False))


def _train(cfg, root, *, kill: str | None = None, sig: int = signal.SIGKILL):
    """Train `STEPS` steps; send `sig` to component `kill` before step 5. -> (restarts, model)."""
    data = build_datasets(cfg)[0]
    with NdpEngine(cfg) as engine, _released_if_stopped() as signalled:
        job = ResilientEngine(engine, cfg, checkpoint_root=root, train_data=data, total_steps=STEPS)
        batches = training_batches(data, cfg.train.batch_size, STEPS)
        for step, batch in with_lookahead(batches, job, cfg.pipeline):
            if kill is not None and step == KILL_BEFORE_STEP:
                signalled.append(engine.component_pids()[kill])
                os.kill(signalled[-1], sig)
            job.train_step(step, batch)
        return job.restarts, model_of(engine, cfg)


def _is_stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


@contextmanager
def _released_if_stopped(watchdog_s: float = 20 * STEP_TIMEOUT_S):
    """Yields a list for the pids a test signals; none is left stopped behind the test.

    A watchdog continues a still-stopped pid after `watchdog_s` (so a coordinator without a
    timeout fails the test instead of hanging it), and on exit a still-stopped pid (one that
    the restart did not kill) is SIGKILLed.
    """
    pids: list[int] = []

    def release(sig: int) -> None:
        for pid in pids:
            if _is_stopped(pid):
                os.kill(pid, sig)

    watchdog = threading.Timer(watchdog_s, release, args=(signal.SIGCONT,))
    watchdog.daemon = True
    watchdog.start()
    try:
        yield pids
    finally:
        watchdog.cancel()
        release(signal.SIGKILL)


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory):
    return _train(_job(), tmp_path_factory.mktemp("straight"))[1]


@pytest.mark.parametrize("component", ["storage-node-1", "gpu-worker-0"])
def test_killed_component_is_restarted_once_and_the_model_equals_an_uninterrupted_run(
    uninterrupted, tmp_path, component
):
    restarts, recovered = _train(_job(), tmp_path, kill=component)
    # one restart: the fresh workers get the shares the dead ones held (no second failure)
    assert restarts == 1
    assert_same_model(recovered, uninterrupted)


@pytest.mark.parametrize("component", ["gpu-worker-0", "storage-node-1"])
def test_a_stopped_component_times_out_is_restarted_and_the_model_equals_an_uninterrupted_run(
    uninterrupted, tmp_path, component, caplog
):
    cfg = _job()
    cfg = replace(cfg, cluster=replace(cfg.cluster, step_timeout_s=STEP_TIMEOUT_S))
    with caplog.at_level(logging.WARNING, logger="ndp.recovery"):
        restarts, recovered = _train(cfg, tmp_path, kill=component, sig=signal.SIGSTOP)
    assert restarts >= 1
    # the coordinator waits on the GPU workers; a stopped node stalls the worker's lookup
    assert "failed at step 5 (ComponentTimeoutError)" in caplog.text
    assert_same_model(recovered, uninterrupted)


def test_a_component_silent_past_step_timeout_is_named_with_the_timeout(ray_session, tmp_path):
    cfg = _job(max_restarts=0)
    cfg = replace(cfg, cluster=replace(cfg.cluster, step_timeout_s=STEP_TIMEOUT_S))
    with pytest.raises(RecoveryError) as raised:
        _train(cfg, tmp_path, kill="gpu-worker-0", sig=signal.SIGSTOP)
    message = str(raised.value)
    assert "a GPU worker failed at step 5" in message
    assert "gpu-worker-0 did not answer within cluster.step_timeout_s=5s" in message
    assert str(tmp_path / "step-00000002") in message


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
