"""Lookahead: let the storage nodes see the next `k` batches before they are trained on.

The training loop hands an engine one batch at a time. `with_lookahead` sits between the
loop's batch iterator and the engine: it reads `k` batches ahead of the step being trained
and hands each to the engine's `prefetch(step, batch)` as soon as it is read. The ndp engine
hands each GPU worker its share then, once: the worker routes it, sends the nodes its
distinct rows (without waiting for the reply: a `Prefetch` call, or with early pooling on,
inside the next `EarlyLookup` to that node), and keeps the routed share for
that step, which the engine then starts without shipping the batch again. A node stages the
missing rows from flash into its DRAM cache and pins them until that step's update is
applied. When step s+k's lookup arrives, its rows are
already in DRAM, so flash latency left the critical path:

    loop reads:      b0 b1 b2 b3 b4 ...        (k = 2)
    prefetch sent:   p0 p1 p2 | p3 | p4 | ...
    trained:                  s0   s1   s2 ...  (p_{s+1}, p_{s+2} in flight while s runs)

Why this keeps exact synchronous semantics: a prefetch only moves rows between tiers of a
write-back cache; every lookup still waits at the node's step barrier for the previous
update, so it reads the same values as without lookahead.

Stage 2, early pooling (`pipeline.early_pooling`, on by default when k >= 1): at step s each
GPU worker already holds the routed bags of s+1 (its prefetch kept them). Right after the
pooled vectors of s arrive, the worker sends them to the nodes (`EarlyLookup`); the nodes
pool s+1 with the current rows while s is in the dense half:

    worker:   lookup s | dense s ............. | push s (not waited for) | lookup s+1 -> answer
    node:              | early pool s+1 (old)  | apply s, add delta s    |   kept vectors

When update s lands, the node has the old and new values of every row it changed and adds
the exact change to the kept vectors (`pooled[b] += scale_b * sum_{r in b, r updated}
weight_b,r * (w_new[r] - w_old[r])`), so the lookup of s+1 answers them without pooling; they
equal pooling after the update up to float rounding. A lookup whose bags differ from the early
ones pools afresh. The gradient push never waits on the worker: by default
(`pipeline.push: with_next_lookup`) push s rides on the lookup of s+1 (the node applies update
s and adds delta s to the kept pool when that call arrives); with `during_backward` it leaves
from inside backward without waiting for its acknowledgement (the timeline above). Either
way the step barrier orders the next lookup after the update, and the engine's `flush()`
sends a held push and collects acknowledgements before predict, reading rows, checkpoints
and close.

`pipeline.mode = "stale"` changes the math: the node pools s+1 early and does NOT add update
s, so step s+1 trains on rows one update old (bounded staleness of one step; the gradient
still lands on the current rows). It saves the correction, not the barrier wait. Off by
default; it needs an engine that pools early (the ndp engine) and is refused elsewhere rather
than silently run as `exact`.
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


def check_pipeline(pipeline: PipelineConfig, engine: object | None = None) -> None:
    """Refuse pipeline settings that would not do what they say.

    Raises:
        NotAvailableError: `mode = "stale"` with an engine that cannot pool early (the
            reference trainer), which would silently train the exact model instead.
    """
    if pipeline.mode == "stale" and engine is not None and not isinstance(engine, Prefetcher):
        raise NotAvailableError(
            f"pipeline.mode='stale' (pool early without correction) needs the ndp engine; "
            f"{type(engine).__name__} cannot pool early: use pipeline.mode=exact"
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
    check_pipeline(pipeline, engine)
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
