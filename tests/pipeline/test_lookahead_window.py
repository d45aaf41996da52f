"""`with_lookahead` reads k batches ahead and hands each to the engine's `prefetch` first."""

from __future__ import annotations

import pytest

from ndp.config import PipelineConfig
from ndp.errors import NotAvailableError
from ndp.pipeline import with_lookahead


class RecordingEngine:
    """Records the order of prefetches and trained steps (a real engine's call sequence)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def prefetch(self, step: int, batch: object) -> None:
        self.events.append(("prefetch", step))


def _drive(engine: object, num_steps: int, depth: int) -> list[tuple[str, int]]:
    batches = ((step, f"batch{step}") for step in range(num_steps))
    trained = []
    for step, batch in with_lookahead(batches, engine, PipelineConfig(lookahead_depth=depth)):
        assert batch == f"batch{step}"
        trained.append(step)
        if isinstance(engine, RecordingEngine):
            engine.events.append(("train", step))
    assert trained == list(range(num_steps))
    return getattr(engine, "events", [])


@pytest.mark.parametrize("depth", [1, 3])
def test_every_step_is_prefetched_depth_steps_before_it_is_trained(depth):
    events = _drive(RecordingEngine(), 8, depth)
    position = {event: i for i, event in enumerate(events)}
    for step in range(8):
        assert position[("prefetch", step)] < position[("train", step)]
        ahead = [s for kind, s in events[: position[("train", step)]] if kind == "prefetch"]
        assert max(ahead) == min(step + depth, 7)


def test_depth_zero_prefetches_nothing():
    assert [kind for kind, _ in _drive(RecordingEngine(), 5, 0)] == ["train"] * 5


def test_an_engine_without_prefetch_gets_the_batches_unchanged():
    _drive(object(), 4, 3)


def test_stale_mode_is_refused_for_an_engine_that_cannot_pool_early():
    """The reference trainer would silently train the exact model: refused, not run."""
    with pytest.raises(NotAvailableError, match="pipeline.mode=exact"):
        next(with_lookahead(iter([(0, "b")]), object(), PipelineConfig(mode="stale")))


def test_stale_mode_runs_the_window_for_an_engine_that_pools_early():
    config = PipelineConfig(mode="stale", lookahead_depth=1)
    events = RecordingEngine()
    assert [s for s, _ in with_lookahead(iter([(0, "a"), (1, "b")]), events, config)] == [0, 1]
    assert events.events == [("prefetch", 0), ("prefetch", 1)]
