"""Periodic checkpoints and failure recovery around a StepEngine.

`ResilientEngine` wraps an engine that can checkpoint (`export_state`, `import_state`,
`restart`: `ndp.coordinator.NdpEngine`) and is itself a StepEngine, so the training loop does
not change. Per training step:

    loss = engine.train_step(step, batch)
    on a component failure (`ndp.failure_policy`, by exception type: an actor died, a
    storage node stopped answering, an actor stayed silent past cluster.step_timeout_s):
        restarts += 1; past checkpoint.max_restarts -> RecoveryError (component, cause, last ckpt)
        engine.restart()                         fresh actors
        roll back to the newest checkpoint       (or to the initial model when there is none)
        replay steps [checkpoint.next_step, step) from the data, then retry `step`
    checkpoint when the schedule says so, and after the last step

Why replaying gives the same model as an uninterrupted run: a checkpoint holds every bit of
state the steps depend on, the data order is a pure function of the step
(`ndp.train_loop.training_batches`), and a step is deterministic given both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ndp.checkpoint import Checkpoint, CheckpointSchedule, latest_checkpoint, restore_rng_state
from ndp.config import Config
from ndp.data.batch import Batch
from ndp.errors import NDPError, NotAvailableError
from ndp.failure_policy import ComponentFailure, classify_failure

log = logging.getLogger(__name__)


class RecoveryError(NDPError):
    """A run lost a component more often than `checkpoint.max_restarts` allows."""


def resume(engine: Any, checkpoint: Checkpoint) -> int:
    """Load `checkpoint` into `engine` and this process's RNGs; returns the next step."""
    if not hasattr(engine, "import_state"):
        raise NotAvailableError(
            f"{type(engine).__name__} cannot load checkpoints; resume with --mode ndp"
        )
    engine.import_state(checkpoint)
    restore_rng_state(checkpoint.rng_state())
    return checkpoint.next_step


class ResilientEngine:
    """A StepEngine that checkpoints on schedule and recovers from dead components.

    Args:
        engine: an `NdpEngine` (or anything with `train_step`, `export_state`,
            `import_state`, `restart`).
        cfg: the run's config (`checkpoint` section).
        checkpoint_root: where checkpoints are written and looked for.
        train_data: the training split (replayed after a roll-back).
        total_steps: the run's planned steps (a final checkpoint follows the last one).
        schedule: injectable for tests; default `CheckpointSchedule(cfg, checkpoint_root)`.
        failure_policy: which exceptions are component failures (restart, roll back,
            replay); default `ndp.failure_policy.classify_failure`. Others are raised.
    """

    def __init__(
        self,
        engine: Any,
        cfg: Config,
        *,
        checkpoint_root: str | Path,
        train_data: Any,
        total_steps: int,
        schedule: CheckpointSchedule | None = None,
        failure_policy: Callable[[BaseException], ComponentFailure | None] = classify_failure,
    ) -> None:
        self.engine = engine
        self.cfg = cfg
        self.root = Path(checkpoint_root)
        self.train_data = train_data
        self.total_steps = total_steps
        self.schedule = schedule or CheckpointSchedule(cfg, self.root)
        self.failure_policy = failure_policy
        self.restarts = 0
        if cfg.checkpoint.enabled and not hasattr(engine, "export_state"):
            raise NotAvailableError(
                f"checkpoint.enabled: {type(engine).__name__} cannot write checkpoints; "
                "use --mode ndp or set checkpoint.enabled=false"
            )

    def __getattr__(self, name: str) -> Any:  # predict, timings, close, prefetch, mode, ...
        return getattr(self.engine, name)

    def train_step(self, step: int, batch: Batch) -> float:
        steps_done = step + 1
        checkpoint_due = self.schedule.due(steps_done) or (
            self.cfg.checkpoint.enabled and steps_done == self.total_steps
        )
        while True:
            try:
                loss = self.engine.train_step(step, batch)
                # Inside the try: pushes are acknowledged late (flushed by the checkpoint), so
                # a component that dies after the step but before its checkpoint is recovered
                # like one that dies during the step (writes are atomic: no partial checkpoint).
                if checkpoint_due:
                    self.schedule.save(self.engine, steps_done)
                break
            except Exception as exc:
                failure = self.failure_policy(exc)
                if failure is None:
                    raise
                self._recover(step, failure)
        return loss

    def _recover(self, failed_step: int, failure: ComponentFailure) -> None:
        """Restart, roll back and replay up to `failed_step` (retried on further failures)."""
        from ndp.train_loop import training_batches

        while True:
            last = latest_checkpoint(self.root)
            self.restarts += 1
            cause = failure.cause
            if self.restarts > self.cfg.checkpoint.max_restarts:
                raise RecoveryError(
                    f"{failure.describe()} failed at step {failed_step} "
                    f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}) "
                    f"and the run already restarted {self.restarts - 1} time(s) "
                    f"(checkpoint.max_restarts={self.cfg.checkpoint.max_restarts}); last good "
                    f"checkpoint: {last or 'none'} (resume with ndp-train --resume {last or ''})"
                ) from cause
            log.warning(
                "%s failed at step %d (%s); restart %d/%d from %s",
                failure.describe(),
                failed_step,
                type(cause).__name__,
                self.restarts,
                self.cfg.checkpoint.max_restarts,
                last or "the initial model",
            )
            try:
                self.engine.restart()
                start = resume(self.engine, Checkpoint(last)) if last is not None else 0
                batches = training_batches(
                    self.train_data, self.cfg.train.batch_size, failed_step, start_step=start
                )
                for step, batch in batches:
                    self.engine.train_step(step, batch)
                return
            except Exception as exc:
                further = self.failure_policy(exc)
                if further is None:
                    raise
                failure = further
