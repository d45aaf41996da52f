"""Seconds per named phase of a training step, for `timings()` of every engine.

One clock serves the GPU worker, the reference trainer, the benchmark baselines and the
`ndp.model.dense_step.DenseStep` they share, so a phase means the same thing in all of them:

* on cuda every phase boundary synchronises the device, so a phase counts the kernels it
  launched, not only their launch;
* a phase entered inside another pauses the outer one: the worker's gradient push, sent from a
  hook inside backward, counts as `gradient_push_s` and not also as `dense_compute_s`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseClock:
    """Wall seconds per phase name, summed until `take()`.

    Args:
        device: where the timed work runs; cuda phases are synchronised at their ends.
    """

    def __init__(self, device: torch.device) -> None:
        self._sync_cuda = device.type == "cuda"
        self._seconds: dict[str, float] = defaultdict(float)
        self._open: list[tuple[str, float]] = []
        """(name, running since) of the phases entered and not left, innermost last."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the time of the `with` block to `name` (less the time of phases inside it)."""
        now = self._now()
        if self._open:
            self._pause_innermost(now)
        self._open.append((name, now))
        try:
            yield
        finally:
            now = self._now()
            self._pause_innermost(now)
            self._open.pop()
            if self._open:
                outer, _ = self._open[-1]
                self._open[-1] = (outer, now)

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last call (and starts counting afresh)."""
        seconds, self._seconds = dict(self._seconds), defaultdict(float)
        return seconds

    def _pause_innermost(self, now: float) -> None:
        name, since = self._open[-1]
        self._seconds[name] += now - since
        self._open[-1] = (name, now)

    def _now(self) -> float:
        if self._sync_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()
