"""Write-behind: an arena's batch of block writes left in flight while the node goes on.

`storage_node.arena.ArenaFlash.write_rows` starts its runs of whole blocks on this pool
and returns; the batch finishes beside whatever the node does next, and anything that
could see the files before it is done waits for it first:

- the next write (one batch in flight: a later write of the same blocks must land last, and
  a write refreshes the held copies, one of which may be this batch's buffer);
- a read from the files of any block the batch writes (reads of other blocks, and reads
  served by held copies, go on);
- a detached read (it marks the files' generation now), a checkpoint's `sync` and copy, a
  restore and a close (`ArenaFlash.drain`).

The batch writes straight from the arena's held copies of its blocks (the writer changed
their rows in place) and from a buffer of the blocks no copy had; those buffers stay the
batch's until it is written: a held copy that is dropped, or a buffer the writer would give
back, goes back to `IO_BUFFERS` only then (`give`).

Why: at cache_5pct a node writes back ~7.4 MB of evicted rows per step (O_DIRECT, whole
4 KiB blocks). py-spy of a live run (`ndp-bench train` sizes, lookahead, 2 nodes) had
`ArenaFlash.write_rows` at 36% of the RPC handlers' wall time, most of it waiting for the
pwritev runs, inside the request whose reply the worker waits for (the update that comes
with the next lookup). The device's emulated time (device profiles) still counts: the
device clock moves on when the batch starts, so later transfers queue behind it, and
`wait` holds the caller until that clock has passed as well as the real I/O.

Errors (ENOSPC, EIO, a short file) are raised by the next call that waits, which is the
next write or read of those blocks at the latest, and by `drain` before a checkpoint.
"""

from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from storage_node.flash import IO_BUFFERS, IoGeometry, RunsInFlight, block_runs, start_runs


@dataclass
class _Batch:
    blocks: np.ndarray
    """Sorted arena blocks being written."""
    buffers: list[mmap.mmap]
    """The buffers its runs write from."""
    runs: RunsInFlight
    device_done_at: float
    """`time.monotonic()` when the emulated device is done with it."""
    give_back: list[mmap.mmap] = field(default_factory=list)
    """Buffers that go back to `IO_BUFFERS` once written (no held copy keeps them)."""


class WriteBehind:
    """At most one batch of block writes in flight, issued from `io_threads` threads of a pool
    of its own (reads issue on the files' pool, so they never queue behind a write)."""

    def __init__(self, io_threads: int) -> None:
        self._io_threads = io_threads
        self._pool: ThreadPoolExecutor | None = None
        self._batch: _Batch | None = None
        self.batches = 0
        """Batches started (each returned before its runs were done)."""
        self.waits = 0
        """Calls that found the batch still in flight (its runs or its emulated device time)
        and waited for it."""

    def start(
        self,
        blocks: np.ndarray,
        runs: list[list[memoryview]],
        files: list[tuple[int, Path]],
        offsets: list[int],
        buffers: list[mmap.mmap],
        views: list[memoryview],
        device_done_at: float,
    ) -> None:
        """Start writing sorted arena `blocks`: run k is the views `runs[k]` (of `buffers`),
        one after another, at byte `offsets[k]` of `files[k]`; `views` are released once
        written. Waits for the batch before it first."""
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self._io_threads, thread_name_prefix="ndp-flash-write"
            )
        started = start_runs(
            os.pwritev, runs, files, offsets, self._pool, self._io_threads, inline_single=False
        )
        started.views = views
        self._batch = _Batch(blocks, buffers, started, device_done_at)
        self.batches += 1

    @property
    def in_flight(self) -> bool:
        """Whether a batch was started and not yet waited for (it may be done already)."""
        return self._batch is not None

    def keeps(self, buf: mmap.mmap) -> bool:
        """Whether `buf` is one of the buffers being written."""
        return self._batch is not None and any(buf is mine for mine in self._batch.buffers)

    def give(self, buf: mmap.mmap) -> None:
        """`IO_BUFFERS.give(buf)`, or once written if it is a buffer being written."""
        if self.keeps(buf):
            self._batch.give_back.append(buf)
        else:
            IO_BUFFERS.give(buf)

    def wait(self, blocks: np.ndarray | None = None) -> None:
        """Return once the batch in flight is written, or at once if there is none or it
        writes none of sorted `blocks` (None: wait whatever it writes). Raises the batch's
        error, if any."""
        batch = self._batch
        if batch is None or (blocks is not None and not _overlap(batch.blocks, blocks)):
            return
        self._batch = None
        if not batch.runs.done() or batch.device_done_at > time.monotonic():
            self.waits += 1
        batch.runs.wait()
        left = batch.device_done_at - time.monotonic()
        if left > 0:
            time.sleep(left)
        for buf in batch.give_back:
            IO_BUFFERS.give(buf)

    def close(self) -> None:
        """Wait for the batch in flight and stop the pool's threads."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether sorted unique `a` and `b` share an element."""
    if a.size == 0 or b.size == 0 or a[-1] < b[0] or b[-1] < a[0]:
        return False
    at = np.searchsorted(a, b).clip(max=a.size - 1)
    return bool((a[at] == b).any())


@dataclass
class BlockRuns:
    """A batch of block writes as runs of consecutive file blocks (`block_runs_from`)."""

    firsts: np.ndarray
    """int64 [runs]: each run's first arena block."""
    chunks: list[list[memoryview]]
    """Per run: the views of its blocks' bytes, in block order (one pwritev each)."""
    views: list[memoryview]
    """Every view made (slices first), to release once written."""


def block_runs_from(
    span: np.ndarray,
    source: np.ndarray,
    at: np.ndarray,
    buffers: list[mmap.mmap],
    geometry: IoGeometry,
) -> BlockRuns:
    """Runs of consecutive blocks of sorted arena `span` (at most `max_run_blocks` each), each
    as views of the buffers that hold its blocks: block i of `span` is block `at[i]` of
    `buffers[source[i]]`. Blocks that lie one after another in one buffer share a view, so
    a run read or written in one piece takes one view."""
    firsts, lengths = block_runs(span, geometry.max_run_blocks)
    run_starts = np.cumsum(lengths) - lengths
    cut = np.ones(span.size, dtype=bool)
    cut[1:] = (source[1:] != source[:-1]) | (at[1:] != at[:-1] + 1)
    cut[run_starts] = True
    starts = np.flatnonzero(cut)
    counts = np.diff(np.append(starts, span.size))
    run_of = np.searchsorted(run_starts, starts, side="right") - 1
    wholes = [memoryview(buf) for buf in buffers]
    block_bytes = geometry.block_bytes
    chunks: list[list[memoryview]] = [[] for _ in range(firsts.size)]
    slices = []
    for where, first, count, run in zip(
        source[starts].tolist(), at[starts].tolist(), counts.tolist(), run_of.tolist(),
        strict=True,
    ):  # fmt: skip
        view = wholes[where][first * block_bytes : (first + count) * block_bytes]
        chunks[run].append(view)
        slices.append(view)
    return BlockRuns(firsts, chunks, slices + wholes)
