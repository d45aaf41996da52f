"""Seconds per named phase of a training step, for `timings()` of every engine.

One clock serves the GPU worker, the reference trainer, the benchmark baselines and the
`ndp.model.dense_step.DenseStep` they share, so a phase means the same thing in all of them:

* on cuda every phase boundary synchronises the device, so a phase counts the kernels it
  launched, not only their launch;
* a phase entered inside another pauses the outer one: the worker's gradient push, sent from a
  hook inside backward, counts as `gradient_push_s` and not also as `dense_compute_s`.
"""

from __future__ import annotations

import statistics
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
        self._blocks: dict[str, list[float]] = defaultdict(list)
        """Seconds of every `with phase(name)` block since the last `take()`, per name."""
        self._open: list[tuple[str, float, float]] = []
        """(name, running since, seconds before that) of the phases entered and not left,
        innermost last."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the time of the `with` block to `name` (less the time of phases inside it)."""
        now = self._now()
        if self._open:
            self._pause_innermost(now)
        self._open.append((name, now, 0.0))
        try:
            yield
        finally:
            now = self._now()
            self._pause_innermost(now)
            _, _, block = self._open.pop()
            self._blocks[name].append(block)
            if self._open:
                outer, _, before = self._open[-1]
                self._open[-1] = (outer, now, before)

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last call (and starts counting afresh)."""
        seconds, self._seconds = dict(self._seconds), defaultdict(float)
        self._blocks = defaultdict(list)
        return seconds

    def medians(self) -> dict[str, float]:
        """Median seconds of one block per phase since the last `take()` (not reset).

        Why beside the sums: a phase of a few milliseconds summed over a short window moves
        with every pause of the process (a page fault burst, a daemon's wake-up); its median
        block is the phase's typical cost, which a ratio against another system can quote
        without that noise.
        """
        return {name: statistics.median(blocks) for name, blocks in self._blocks.items() if blocks}

    def _pause_innermost(self, now: float) -> None:
        name, since, before = self._open[-1]
        self._seconds[name] += now - since
        self._open[-1] = (name, now, before + now - since)

    def _now(self) -> float:
        if self._sync_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()
