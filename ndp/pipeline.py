"""Lookahead: let the storage nodes see the next `k` batches before they are trained on.

The training loop hands an engine one batch at a time. `with_lookahead` sits between the
loop's batch iterator and the engine: it reads `k` batches ahead of the step being trained
and hands each to the engine's `prefetch(step, batch)` as soon as it is read. The ndp engine
answers by sending the batch's unique row indices to the storage nodes (`Prefetch`, without
waiting for the reply); a node stages the missing rows from flash into its DRAM cache and
pins them until that step's update is applied. When step s+k's lookup arrives, its rows are
already in DRAM, so flash latency left the critical path:

    loop reads:      b0 b1 b2 b3 b4 ...        (k = 2)
    prefetch sent:   p0 p1 p2 | p3 | p4 | ...
    trained:                  s0   s1   s2 ...  (p_{s+1}, p_{s+2} in flight while s runs)

Why this keeps exact synchronous semantics: a prefetch only moves rows between tiers of a
write-back cache; every lookup still waits at the node's step barrier for the previous
update, so it reads the same values as without lookahead. `pipeline.mode = "stale"` (pool
batch s+1 early without correcting for update s) would change the math; it is not
implemented and is refused here rather than silently treated as `exact`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

from ndp.config import PipelineConfig
from ndp.data.batch import Batch
from ndp.errors import NotAvailableError


@runtime_checkable
class Prefetcher(Protocol):
    """An engine that can stage a future step's rows (the ndp engine; not the reference)."""

    def prefetch(self, step: int, batch: Batch) -> None:
        """Start staging `batch`'s rows for `step`; must return without waiting for the nodes."""
        ...


def check_pipeline(pipeline: PipelineConfig) -> None:
    """Refuse pipeline settings that would not do what they say.

    Raises:
        NotAvailableError: `mode = "stale"` (early pooling without correction) is not built.
    """
    if pipeline.mode != "exact":
        raise NotAvailableError(
            f"pipeline.mode={pipeline.mode!r} (pool early without correction) is not "
            "available; use pipeline.mode=exact, which keeps synchronous semantics"
        )


def with_lookahead(
    batches: Iterable[tuple[int, Batch]], engine: object, pipeline: PipelineConfig
) -> Iterator[tuple[int, Batch]]:
    """Yield `batches` unchanged, after handing each to `engine.prefetch` `depth` steps early.

    Before (step s, batch) is yielded, steps up to s + depth have been read and prefetched
    (fewer at the end of the iterator). With `depth == 0`, or an engine without `prefetch`
    (the reference trainer), the batches pass straight through and nothing is read ahead.

    Args:
        batches: (step, batch) in training order (`ndp.train_loop.training_batches`).
        engine: the step engine; used only if it is a `Prefetcher`.
        pipeline: `cfg.pipeline`; `lookahead_depth` is k.

    Raises:
        NotAvailableError: see `check_pipeline` (raised when the first batch is asked for).
    """
    check_pipeline(pipeline)
    depth = pipeline.lookahead_depth
    if depth == 0 or not isinstance(engine, Prefetcher):
        yield from batches
        return
    window: deque[tuple[int, Batch]] = deque()
    for step, batch in batches:
        engine.prefetch(step, batch)
        window.append((step, batch))
        if len(window) > depth:
            yield window.popleft()
    while window:
        yield window.popleft()
