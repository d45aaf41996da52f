"""The training loop: drive a StepEngine over the data, log, validate, summarise.

The same loop runs the single-process reference (`ndp.reference.ReferenceEngine`) and the
distributed ndp engine; it only sees the `StepEngine` protocol. Read top to bottom:

    for step, batch in training batches (wrapping epochs deterministically; time to read
                       each one is counted as `data_s`):
        loss = engine.train_step(step, batch)
        every logging.interval_steps:     {"type": "train", ...} -> metrics.jsonl
                                          (loss of the interval, NE of the last steps)
        every train.eval_interval_steps:  {"type": "eval", ...}  -> metrics.jsonl
        Ctrl-C: finish this step, stop
    final eval (unless interrupted) -> metrics.jsonl; summary.json

Steps are numbered from 0; a record's `step` is the index of the last step it covers.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from ndp.config import Config
from ndp.data.batch import Batch
from ndp.errors import DataError
from ndp.metrics import BinaryEvaluator, MetricsWriter, json_safe, windowed_ne
from ndp.pipeline import with_lookahead

TRAIN_RECORD_KEYS = ("type", "step", "loss", "ne", "samples_per_s", "time_s", "data_s")
"""Keys of a train record the loop owns; the engine's per-phase timings follow them."""


TRAIN_NE_WINDOW_SAMPLES = 4096
"""A train record's `ne` covers the last ceil(4096 / batch_size) steps (64 at batch 64).

Why this many samples: NE divides by the entropy of the window's own click rate, so the window
needs enough clicks for that rate to be stable: at Criteo's ~3% click rate 4096 samples hold
~120 clicks (the rate within about +-10%), while the window stays short enough (0.6 of an
epoch of the shipped sample) to follow training. The loss of a record still covers just its
logging interval; a resumed run starts with an empty window.
"""


def ne_window_steps(batch_size: int) -> int:
    """Steps in the window of a train record's NE (`TRAIN_NE_WINDOW_SAMPLES`)."""
    return max(1, math.ceil(TRAIN_NE_WINDOW_SAMPLES / batch_size))


class StepEngine(Protocol):
    """What the loop drives: `ndp.reference.ReferenceEngine`, `ndp.coordinator.NdpEngine`."""

    def train_step(self, step: int, batch: Batch) -> float:
        """Loss of the batch computed before the update, then the update."""
        ...

    def predict(self, step: int, batch: Batch) -> torch.Tensor:
        """Logits [B], no update."""
        ...

    def timings(self) -> dict[str, float]:
        """Seconds per phase since the last call."""
        ...

    def close(self) -> None: ...


class Dataset(Protocol):
    """What the loop needs from a split (`ndp.data.loader` provides it)."""

    num_samples: int

    def batches(self, batch_size: int, *, start_batch: int = 0) -> Iterator[Batch]: ...


def planned_steps(cfg: Config, train_samples: int) -> int:
    """`train.steps`, else `train.epochs` full passes of `train_samples // batch_size` steps."""
    steps_per_epoch = train_samples // cfg.train.batch_size
    if steps_per_epoch == 0:
        raise DataError(
            f"the training split has {train_samples} samples, fewer than one batch of "
            f"train.batch_size={cfg.train.batch_size}; lower train.batch_size or add data"
        )
    if cfg.train.steps is not None:
        return cfg.train.steps
    assert cfg.train.epochs is not None  # config validation requires steps or epochs
    return cfg.train.epochs * steps_per_epoch


def training_batches(
    data: Dataset, batch_size: int, total_steps: int, *, start_step: int = 0
) -> Iterator[tuple[int, Batch]]:
    """(step, batch) for steps [start_step, total_steps), wrapping around epochs.

    Step s reads batch s % steps_per_epoch of the split, so a run longer than one epoch (or
    one resumed at `start_step`) sees the same batches in the same order every time.
    """
    steps_per_epoch = data.num_samples // batch_size
    step = start_step
    while step < total_steps:
        yielded = 0
        for batch in data.batches(batch_size, start_batch=step % steps_per_epoch):
            yield step, batch
            yielded += 1
            step += 1
            if step >= total_steps or step % steps_per_epoch == 0:
                break
        if yielded == 0:
            raise DataError(
                f"the training split yielded no batch at batch {step % steps_per_epoch} although "
                f"it reports {data.num_samples} samples ({steps_per_epoch} batches of {batch_size})"
            )


def evaluate(
    engine: StepEngine, data: Dataset, batch_size: int, *, step: int, max_batches: int | None
) -> dict[str, Any]:
    """Validation metrics over the first `max_batches` batches (all when None)."""
    evaluator = BinaryEvaluator()
    for index, batch in enumerate(data.batches(batch_size)):
        if max_batches is not None and index >= max_batches:
            break
        evaluator.update(engine.predict(step, batch), batch.labels)
    return {"type": "eval", "step": step, **evaluator.compute()}


def run_training(
    cfg: Config,
    engine: StepEngine,
    output_dir: str | Path,
    *,
    train_data: Dataset,
    val_data: Dataset,
    mode: str | None = None,
    start_step: int = 0,
) -> dict[str, Any]:
    """Train `engine` for the configured steps; write metrics.jsonl and summary.json.

    Returns:
        The summary (also written to `output_dir/summary.json`).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    batch_size = cfg.train.batch_size
    total_steps = planned_steps(cfg, train_data.num_samples)
    log_every = cfg.logging.interval_steps
    eval_every = cfg.train.eval_interval_steps
    can_eval = val_data.num_samples >= batch_size
    if not can_eval:
        print(
            f"ndp: validation skipped: the validation split has {val_data.num_samples} samples, "
            f"fewer than one batch of {batch_size}",
            file=sys.stderr,
        )

    eval_seconds = 0.0

    def validate(step: int) -> dict[str, Any] | None:
        nonlocal eval_seconds
        if not can_eval:
            return None
        start = time.perf_counter()
        record = evaluate(
            engine, val_data, batch_size, step=step, max_batches=cfg.train.eval_batches
        )
        writer.write(record)
        eval_seconds += time.perf_counter() - start
        return record

    steps_done = start_step  # > 0 when resumed from a checkpoint
    last_loss: float | None = None
    last_eval: dict[str, Any] | None = None
    window_losses: list[float] = []
    ne_window = ne_window_steps(batch_size)
    ne_losses: deque[float] = deque(maxlen=ne_window)
    ne_labels: deque[torch.Tensor] = deque(maxlen=ne_window)
    run_start = time.perf_counter()
    window_start = run_start
    interrupted = False
    progress = tqdm(
        total=total_steps, disable=not cfg.logging.progress_bar, unit="step", dynamic_ncols=True
    )
    tensorboard_dir = output_dir / "tensorboard" if cfg.logging.tensorboard else None
    with (
        MetricsWriter(output_dir / "metrics.jsonl", tensorboard_dir=tensorboard_dir) as writer,
        _StopOnCtrlC() as ctrl_c,
    ):
        engine.timings()  # start the engine's phase clock with the loop
        reading = _ReadClock()
        try:
            batches = training_batches(train_data, batch_size, total_steps, start_step=start_step)
            for step, batch in reading.timed(with_lookahead(batches, engine, cfg.pipeline)):
                last_loss = engine.train_step(step, batch)
                steps_done = step + 1
                window_losses.append(last_loss)
                ne_losses.append(last_loss)
                ne_labels.append(batch.labels)
                progress.update(1)

                if steps_done % log_every == 0 or steps_done == total_steps:
                    now = time.perf_counter()
                    window_seconds = now - window_start
                    samples_per_s = len(window_losses) * batch_size / max(window_seconds, 1e-9)
                    breakdown = _without(engine.timings(), TRAIN_RECORD_KEYS)
                    if "link_bytes_in" in breakdown:  # the ndp engine's pooled traffic
                        breakdown["link_bytes_per_sample"] = (
                            breakdown["link_bytes_in"] + breakdown.get("link_bytes_out", 0.0)
                        ) / (len(window_losses) * batch_size)
                    writer.write(
                        {
                            "type": "train",
                            "step": step,
                            "loss": sum(window_losses) / len(window_losses),
                            "ne": windowed_ne(list(ne_losses), list(ne_labels)),
                            "samples_per_s": samples_per_s,
                            "time_s": now - run_start,
                            "data_s": reading.take(),
                            **breakdown,
                        }
                    )
                    progress.set_postfix(
                        loss=f"{last_loss:.4f}", samples_per_s=f"{samples_per_s:.0f}"
                    )
                    window_losses = []
                    window_start = time.perf_counter()

                if ctrl_c.requested:
                    interrupted = True
                    break
                if eval_every and steps_done % eval_every == 0 and steps_done < total_steps:
                    last_eval = validate(step) or last_eval
                    window_start = time.perf_counter()
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread
            interrupted = True
        progress.close()
        train_seconds = time.perf_counter() - run_start - eval_seconds
        if not interrupted and steps_done > 0:
            last_eval = validate(steps_done - 1) or last_eval

    samples = (steps_done - start_step) * batch_size  # trained by this process
    summary = {
        "mode": mode or getattr(engine, "mode", type(engine).__name__),
        "steps": steps_done,
        "planned_steps": total_steps,
        "samples": samples,
        "wall_time_s": time.perf_counter() - run_start,
        "train_time_s": train_seconds,
        "samples_per_s": samples / train_seconds if train_seconds > 0 else 0.0,
        "final_train_loss": last_loss,
        "final_eval": last_eval,
        "interrupted": interrupted,
    }
    summary = json_safe(summary)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


def _without(mapping: dict[str, float], reserved: tuple[str, ...]) -> dict[str, float]:
    return {key: value for key, value in mapping.items() if key not in reserved}


class _ReadClock:
    """Seconds the loop waits for its next batch: reading it and, with lookahead, sending the
    prefetch of the batch read ahead. Reported per train record as `data_s`."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, batches: Iterator[tuple[int, Batch]]) -> Iterator[tuple[int, Batch]]:
        while True:
            start = time.perf_counter()
            try:
                item = next(batches)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - start
            yield item

    def take(self) -> float:
        """The seconds since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class _StopOnCtrlC:
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts.

    Only the main thread can own a signal handler; elsewhere the KeyboardInterrupt itself is
    caught by the loop.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nndp: Ctrl-C: stopping after this step (press again to abort)", file=sys.stderr)

    def __enter__(self) -> _StopOnCtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
