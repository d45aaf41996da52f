"""Flash tier: one shard (weights + optimizer state) in a paged file on local disk.

A row record is ``fp32 weights [D]`` followed by ``fp32 optimizer state [S]``
(``S = optimizer_state_width``), ``row_bytes = 4 * (D + S)``. The file is a header page
followed by fixed-size *blocks*; a block is the unit of I/O and is page aligned:

- if a row fits in a page, a block is one page holding ``rows_per_block = page // row_bytes``
  rows (no row straddles a page; the tail of each page is padding);
- otherwise a block is ``ceil(row_bytes / page)`` pages holding exactly one row.

::

    offset 0                 page_bytes            page_bytes + block_bytes
    +------------------------+---------------------+---------------------+-----
    | header page            | block 0             | block 1             | ...
    |  magic  "NDPSHRD1"  8B | row 0 | row 1 | pad | row k | ...   | pad |
    |  version         u32   +---------------------+---------------------+-----
    |  complete        u32     row r lives in block r // rows_per_block at
    |  num_rows        u64     byte (r % rows_per_block) * row_bytes of it
    |  embedding_dim   u32
    |  state_width     u32     row record: [ w_0 .. w_{D-1} | s_0 .. s_{S-1} ]  fp32 LE
    |  page_bytes      u32
    |  row_start       u64     (global row of local row 0, for the init check)
    |  table_name  64B utf8
    |  seed            i64     (version 2: the init's seed and table size, so a file
    |  table_num_rows  u64      made for another config is refused, not reused)
    +------------------------+

Reads and writes go in batches: the requested rows are mapped to blocks, the blocks are
sorted, deduplicated and coalesced into runs of consecutive blocks, and the runs are issued
in parallel (`io_threads`) with ``os.preadv``/``os.pwritev`` into one page-aligned
(mmap-allocated) buffer, so ``O_DIRECT`` works when asked for. Gaps of at most
`merge_gap_bytes` between wanted blocks are read (and written back unchanged) with them:

    wanted blocks   3 4 . . 7 . . . . . . . . . 21        merge_gap_bytes = 3 blocks
    I/O requests    [3 ........ 7]              [21]      2 requests, not 3

Why: a request costs far more than the bytes it moves (measured here with O_DIRECT: a
random 4 KiB read 320 us and 74 us of CPU, a 128 KiB read 123 us and 28 us of CPU), so a
few unwanted pages are cheaper than another request. The pages counters include them.
Writes are read-modify-write of whole blocks, as a flash device programs whole pages. The header's ``complete`` flag is
written last when a new file is initialised, so an interrupted init is redone on reopen.

A complete file of the same shape, seed and table is reused as it is (a second run on the
same `storage.flash_dir` skips the init); one made for another config is refused, naming
what differs. Version 1 files (no seed recorded) are reused on shape alone. Initialisation
writes 8 MiB chunks from several threads (`init_rows` releases the GIL in numpy), so a
multi-GB shard is written near the device's sequential rate, and reports progress.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ndp.config import EmulationConfig, StorageConfig
from ndp.model.init import init_rows
from ndp.rows import unique_inverse
from storage_node.errors import FlashDirError, ShardFileError
from storage_node.stats import FlashCounters, transfer_delay_s

MAGIC = b"NDPSHRD1"
VERSION = 2
_HEADER_V1 = struct.Struct("<8sIIQIIIQ64s")
_HEADER = struct.Struct("<8sIIQIIIQ64sqQ")
_HEADER_FIELDS = (
    "num_rows", "embedding_dim", "state_width", "page_bytes", "row_start", "table", "seed",
    "table_num_rows",
)  # fmt: skip
INIT_PROGRESS_INTERVAL_S = 10.0
"""Seconds between progress lines of a long initialisation."""
INIT_CHUNK_BYTES = 8 << 20
"""Bytes of blocks initialised per write when a new shard file is created."""
MAX_RUN_BYTES = 1 << 20
"""Largest single pread/pwrite; longer runs of consecutive blocks are split."""


_HINTS = {
    errno.ENOSPC: "free space there or point storage.flash_dir at a larger file system",
    errno.EDQUOT: "free space there or point storage.flash_dir at a larger file system",
    errno.EROFS: "point storage.flash_dir at a writable directory",
    errno.EACCES: "point storage.flash_dir at a writable directory",
    errno.EPERM: "point storage.flash_dir at a writable directory",
}


def flash_dir_error(what: str, error: OSError, *, odirect: bool = False) -> FlashDirError:
    """`error` as one line: `storage.flash_dir: cannot <what>: <strerror> (<ERRNO>); <fix>`.

    Why: the bare OSError reached the user as a Ray traceback, and the old message blamed
    O_DIRECT for every failed open; the O_DIRECT hint is only given for EINVAL from an open
    with `odirect` (the file system refuses O_DIRECT).
    """
    name = errno.errorcode.get(error.errno or 0, f"errno {error.errno}")
    hint = _HINTS.get(error.errno or 0)
    if odirect and error.errno == errno.EINVAL:
        hint = "storage.use_odirect needs a file system with O_DIRECT; set it to false"
    reason = error.strerror or str(error)
    return FlashDirError(
        f"storage.flash_dir: cannot {what}: {reason} ({name})" + (f"; {hint}" if hint else "")
    )


def transfer_all(
    op: Callable[[int, list, int], int],
    fd: int,
    chunk: memoryview | mmap.mmap | bytes,
    offset: int,
    path: Path,
) -> None:
    """`op` (os.preadv or os.pwritev) of all of `chunk` at `offset` (`transfer_vectors`)."""
    transfer_vectors(op, fd, [chunk], offset, path)


IOV_MAX = 1024
"""Most buffers one preadv/pwritev takes (Linux's UIO_MAXIOV)."""


def transfer_vectors(
    op: Callable[[int, list, int], int],
    fd: int,
    chunks: list,
    offset: int,
    path: Path,
) -> None:
    """`op` (os.preadv or os.pwritev) of all of `chunks`, one after another, at `offset`
    (at most `IOV_MAX` buffers per call).

    Why: both may move fewer bytes than asked; a write short of a full disk returned a count
    that was ignored, leaving a truncated shard marked complete. The rest is retried, so a
    full disk raises ENOSPC; a read that reaches the end of the file is a `ShardFileError`.
    """
    for first in range(0, len(chunks), IOV_MAX):
        group = chunks[first : first + IOV_MAX]
        total = sum(len(chunk) for chunk in group) if len(group) > 1 else len(group[0])
        done = op(fd, group, offset)
        while done < total:
            moved = op(fd, _after(group, done), offset + done)
            if moved == 0:
                raise ShardFileError(
                    f"shard file {path} ends at byte {offset + done}, before its layout does; "
                    "delete it to start fresh"
                )
            done += moved
        offset += total


def _after(chunks: list, skip: int) -> list[memoryview]:
    """`chunks` without their first `skip` bytes."""
    rest = []
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        if skip >= len(view):
            skip -= len(view)
            continue
        rest.append(view[skip:])
        skip = 0
    return rest


def issue_runs(
    op: Callable[[int, list, int], int],
    buf: mmap.mmap,
    block_bytes: int,
    lengths: np.ndarray,
    files: list[tuple[int, Path]],
    offsets: list[int],
    pool: ThreadPoolExecutor,
    io_threads: int,
) -> int:
    """`op` (os.preadv or os.pwritev) of consecutive runs of blocks laid one after another in
    `buf`: run k is `lengths[k]` blocks of file `files[k]` (descriptor, path) at byte
    `offsets[k]`; returns when every run is done.

    Returns:
        The threads that issued them (0 when there are no runs).
    """
    positions = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
    whole = memoryview(buf)
    chunks = [
        whole[pos * block_bytes : (pos + length) * block_bytes]
        for pos, length in zip(positions.tolist(), lengths.tolist(), strict=True)
    ]
    try:
        runs = start_runs(op, [[chunk] for chunk in chunks], files, offsets, pool, io_threads)
        runs.wait()
    finally:
        for view in [*chunks, whole]:
            view.release()
    return runs.shares


def start_runs(
    op: Callable[[int, list, int], int],
    runs: list[list[memoryview]],
    files: list[tuple[int, Path]],
    offsets: list[int],
    pool: ThreadPoolExecutor,
    io_threads: int,
    *,
    inline_single: bool = True,
) -> RunsInFlight:
    """Start `op` of runs from up to `io_threads` threads of `pool`, one task per thread (a
    future costs ~30 us of Python while a 4 KiB pread costs ~5 us of it): run k moves the
    buffers `runs[k]`, one after another, at byte `offsets[k]` of file `files[k]`
    (descriptor, path); runs of several files may share one call (`storage_node.arena`
    does). A single share runs in the caller (no thread hand-off) unless `inline_single` is
    False. The buffers must stay as they are until `RunsInFlight.wait()` returns."""

    def run_share(share: int) -> None:
        for k in range(share, len(runs), io_threads):
            fd, path = files[k]
            transfer_vectors(op, fd, runs[k], offsets[k], path)

    shares = min(io_threads, len(runs))
    started = RunsInFlight(shares)
    if shares == 1 and inline_single:
        run_share(0)
    elif shares:
        started.futures = [pool.submit(run_share, share) for share in range(shares)]
    return started


class RunsInFlight:
    """Runs started by `start_runs`: `wait()` for all of them (raises the first error)."""

    def __init__(self, shares: int) -> None:
        self.shares = shares
        """The threads that issue them (0 when there are no runs)."""
        self.futures: list[Future] = []
        self.views: list[memoryview] = []
        """Views of the buffers the runs use, released once they are done."""

    def done(self) -> bool:
        return all(future.done() for future in self.futures)

    def wait(self) -> None:
        """Return when every run is done and release `views`. Every run is waited for
        before an error is raised, since a run still in flight is using its buffers."""
        futures_wait(self.futures)
        for view in self.views:
            view.release()
        self.views = []
        for future in self.futures:
            future.result()


@dataclass(frozen=True)
class IoGeometry:
    """What batching the I/O of several shard files needs them to share."""

    rows_per_block: int
    block_bytes: int
    page_bytes: int
    max_gap_blocks: int
    max_run_blocks: int
    io_threads: int


@dataclass(frozen=True)
class FlashLayout:
    """Where each row of a shard lives in its file (pure arithmetic, no I/O)."""

    num_rows: int
    embedding_dim: int
    state_width: int
    page_bytes: int

    @property
    def row_floats(self) -> int:
        return self.embedding_dim + self.state_width

    @property
    def row_bytes(self) -> int:
        return 4 * self.row_floats

    @property
    def rows_per_block(self) -> int:
        return max(1, self.page_bytes // self.row_bytes)

    @property
    def block_bytes(self) -> int:
        if self.row_bytes <= self.page_bytes:
            return self.page_bytes
        return -(-self.row_bytes // self.page_bytes) * self.page_bytes

    @property
    def num_blocks(self) -> int:
        return -(-self.num_rows // self.rows_per_block)

    @property
    def file_bytes(self) -> int:
        return self.page_bytes + self.num_blocks * self.block_bytes

    def block_offset(self, block: np.ndarray | int) -> np.ndarray | int:
        """File offset of a block (or blocks)."""
        return self.page_bytes + block * self.block_bytes


def held_sources(
    held: list[tuple[np.ndarray, np.ndarray, mmap.mmap]], blocks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Where the newest held copy of each of sorted unique `blocks` is: (position in `held`,
    -1 where no copy has the block; the block's index in that copy's blocks), int64 [n] each."""
    source = np.full(blocks.size, -1, dtype=np.int64)
    at = np.zeros(blocks.size, dtype=np.int64)
    for position in range(len(held) - 1, -1, -1):
        held_blocks = held[position][0]
        where = np.searchsorted(held_blocks, blocks).clip(max=held_blocks.size - 1)
        found = (source < 0) & (held_blocks[where] == blocks)
        source[found], at[found] = position, where[found]
        if (source >= 0).all():
            break
    return source, at


def current_blocks(
    held: list[tuple[np.ndarray, np.ndarray, mmap.mmap]],
    blocks: np.ndarray,
    block_bytes: int,
    read_blocks: Callable[[np.ndarray], mmap.mmap],
) -> tuple[mmap.mmap, np.ndarray]:
    """An aligned buffer of the current bytes of sorted unique `blocks`: the newest held copy
    of each (`holding_reads`: sorted blocks, their bytes, their buffer; oldest first), the
    others read with `read_blocks`; and the mask of the blocks taken from held copies."""
    nbytes = blocks.size * block_bytes
    buf = IO_BUFFERS.take(nbytes)
    target = np.frombuffer(buf, dtype=np.uint8, count=nbytes).reshape(blocks.size, -1)
    source, at = held_sources(held, blocks)
    positions = np.unique(source[source >= 0]).tolist()
    for position in positions:
        found = source == position
        target[found] = held[position][1][at[found]]
    missing = source < 0
    if missing.any():
        rest = blocks[missing]
        read = read_blocks(rest)
        count = rest.size * block_bytes
        target[missing] = np.frombuffer(read, dtype=np.uint8, count=count).reshape(rest.size, -1)
        IO_BUFFERS.give(read)
    del target
    return buf, ~missing


def block_runs(blocks: np.ndarray, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Coalesce sorted unique block ids into runs: (first block, length) per run."""
    if blocks.size == 0:
        return blocks, blocks
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [blocks.size]])
    # split runs longer than max_blocks
    lengths = ends - starts
    pieces = -(-lengths // max_blocks)
    run_first_idx = (
        np.repeat(starts, pieces)
        + (np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)) * max_blocks
    )
    run_end_idx = np.minimum(run_first_idx + max_blocks, np.repeat(ends, pieces))
    return blocks[run_first_idx], run_end_idx - run_first_idx


def fill_gaps(blocks: np.ndarray, max_gap: int) -> np.ndarray:
    """Sorted unique `blocks` plus every block of each gap of at most `max_gap` between them."""
    if blocks.size < 2 or max_gap <= 0:
        return blocks
    gaps = np.diff(blocks) - 1
    lengths = np.where((gaps > 0) & (gaps <= max_gap), gaps, 0)
    total = int(lengths.sum())
    if total == 0:
        return blocks
    firsts = np.repeat(blocks[:-1] + 1, lengths)
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.sort(np.concatenate([blocks, firsts + within]))


class IoBuffers:
    """Page-aligned I/O buffers, reused: one pool per process, shared by every shard file.

    Why: a fresh anonymous mapping costs a page fault per 4 KiB page on first touch
    (measured here: 20 MB mapped and touched, 14 ms wall and 20 ms of CPU; the same buffer
    reused, 1 ms), and a node moving tens of MB per step paid that on every batch. Sizes are
    rounded up to powers of two so buffers fit later requests; at most `max_cached_bytes` are
    kept, the rest are left to the garbage collector. A reused buffer holds old bytes: every
    caller overwrites the part it uses (reads fill it, writes start from a read or held copy).
    """

    def __init__(self, max_cached_bytes: int) -> None:
        self.max_cached_bytes = max_cached_bytes
        self._free: dict[int, list[mmap.mmap]] = {}
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def take(self, num_bytes: int) -> mmap.mmap:
        size = 1 << max(12, (max(num_bytes, 1) - 1).bit_length())
        with self._lock:
            free = self._free.get(size)
            if free:
                self._cached_bytes -= size
                return free.pop()
        return mmap.mmap(-1, size)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if self._cached_bytes + len(buf) <= self.max_cached_bytes:
                self._free.setdefault(len(buf), []).append(buf)
                self._cached_bytes += len(buf)


class DetachedRead:
    """One `FlashStore.detached_read`: `read(rows)` unlocked, then `finish(rows)` locked."""

    def __init__(self, store: FlashStore, mark: int) -> None:
        self._store = store
        self._mark = mark
        self._read_done = False
        self._finished = False

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Records of unique local `rows`, float32 [n, D + S] (at most once per read)."""
        assert not self._read_done, "a DetachedRead reads once"
        self._read_done = True
        return self._store._read_detached(np.asarray(rows, dtype=np.int64))

    @contextmanager
    def reading_elsewhere(self) -> Iterator[None]:
        """Instead of `read`: this file's rows are read inside the block by another caller
        (`storage_node.arena.ArenaFlash`'s one batch over several files); the file stays
        open until the block ends."""
        assert not self._read_done, "a DetachedRead reads once"
        self._read_done = True
        try:
            if self._store._fd < 0:
                raise ShardFileError(f"shard file {self._store.path} is closed")
            yield
        finally:
            self._store._release_descriptor()

    def finish(self, rows: np.ndarray) -> np.ndarray:
        """bool [n]: which of `rows` were written since the read began (their records may be
        stale). Call exactly once, under the lock, whether or not `read` ran or raised."""
        assert not self._finished, "a DetachedRead finishes once"
        self._finished = True
        if not self._read_done:  # never read: release the descriptor hold taken at start
            self._store._release_descriptor()
        return self._store._finish_detached(self._mark, np.asarray(rows, dtype=np.int64))


IO_BUFFERS = IoBuffers(max_cached_bytes=64 << 20)
"""The process's pool (a storage node serialises its I/O, so it needs about one step's worth)."""


class FlashStore:
    """A shard file with batched, parallel, page-granular row reads and writes.

    Not thread-safe on its own: the node serialises calls (its thread pool is only used to
    issue the runs of one batch in parallel).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        table_name: str,
        table_num_rows: int,
        row_start: int,
        num_rows: int,
        embedding_dim: int,
        state_width: int,
        seed: int,
        page_bytes: int = 4096,
        io_threads: int = 4,
        use_odirect: bool = False,
        merge_gap_bytes: int = StorageConfig.io_merge_gap_bytes,
        emulation: EmulationConfig | None = None,
        report: Callable[[str], None] | None = None,
    ) -> None:
        """
        Args:
            report: receives a progress line every `INIT_PROGRESS_INTERVAL_S` while a new
                file is initialised, and one when a long initialisation ends.
        """
        self.path = Path(path)
        self.seed = seed
        self.table_num_rows = table_num_rows
        self._report = report
        self.layout = FlashLayout(num_rows, embedding_dim, state_width, page_bytes)
        self.table_name = table_name
        self.row_start = row_start
        self.counters = FlashCounters()
        self._emulation = emulation or EmulationConfig()
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="ndp-flash")
        self._io_threads = io_threads
        self._detached_reads = 0
        self._counters_lock = threading.Lock()
        self._device_busy_until = 0.0
        """`time.monotonic()` at which the emulated device finishes its queued transfers."""
        self._detached_done = threading.Condition()
        self._generation = 0
        """Number of `write_rows` calls so far (detached reads compare against it)."""
        self._write_log: list[tuple[int, np.ndarray]] = []
        """(generation, blocks written) while a detached read is open."""
        self._open_marks: dict[int, int] = {}
        self._held: list[tuple[np.ndarray, np.ndarray, mmap.mmap]] | None = None
        """Inside `holding_reads`: (sorted blocks, their bytes [n, block_bytes], the buffer
        holding them) per read or write, oldest first."""
        self._max_run_blocks = max(1, MAX_RUN_BYTES // self.layout.block_bytes)
        self._max_gap_blocks = merge_gap_bytes // self.layout.block_bytes
        flags = os.O_RDWR | os.O_CREAT
        if use_odirect:
            if not hasattr(os, "O_DIRECT"):
                raise ShardFileError(
                    "storage.use_odirect: this platform has no O_DIRECT; set it to false"
                )
            flags |= os.O_DIRECT
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise flash_dir_error(f"create directory {self.path.parent}", exc) from None
        created = not self.path.exists()
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise flash_dir_error(
                f"open shard file {self.path}", exc, odirect=use_odirect
            ) from None
        try:
            if self._header_complete():
                self.counters.files_reused += 1
            else:
                self._initialise(seed=seed, table_num_rows=table_num_rows)
        except BaseException as exc:
            self._abandon(remove=created)
            if isinstance(exc, OSError):
                raise flash_dir_error(f"write shard file {self.path}", exc) from None
            raise

    def _abandon(self, *, remove: bool) -> None:
        """Close the file after a failed open; `remove` it if this open created it (a partial
        file would otherwise hold disk space until someone deletes it)."""
        os.close(self._fd)
        self._fd = -1
        self._pool.shutdown(wait=False)
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()

    # ------------------------------------------------------------------ header / init

    def _header_bytes(self, complete: bool) -> bytes:
        lay = self.layout
        name = self.table_name.encode()[:64]
        return _HEADER.pack(
            MAGIC,
            VERSION,
            int(complete),
            lay.num_rows,
            lay.embedding_dim,
            lay.state_width,
            lay.page_bytes,
            self.row_start,
            name,
            self.seed,
            self.table_num_rows,
        )

    def _header_complete(self) -> bool:
        """True if the file holds a finished shard of this config (shape, seed, table);
        raise if it holds another's.

        Raises:
            ShardFileError: the file was made for another config; the message names each
                field that differs (a different seed or table size means other initial rows).
        """
        if os.fstat(self._fd).st_size < self.layout.page_bytes:
            return False
        page = self._aligned(self.layout.page_bytes)
        os.preadv(self._fd, [page], 0)
        magic, version, complete = struct.unpack_from("<8sII", page, 0)
        if magic != MAGIC or not complete:
            return False
        expected = _HEADER.unpack(self._header_bytes(True))[3:]
        if version == 1:  # written before seeds were recorded: compare the shape only
            found = _HEADER_V1.unpack_from(page, 0)[3:]
            expected = expected[: len(found)]
        elif version == VERSION:
            found = _HEADER.unpack_from(page, 0)[3:]
        else:
            raise ShardFileError(
                f"shard file {self.path} has format version {version}, this ndp reads "
                f"{VERSION} and 1; point storage.flash_dir elsewhere or delete the file"
            )
        if found != expected:
            diffs = ", ".join(
                f"{n}: file {f!r} != expected {e!r}"
                for n, f, e in zip(_HEADER_FIELDS, found, expected, strict=False)
                if f != e
            )
            raise ShardFileError(
                f"shard file {self.path} was made for another config ({diffs}), so it is not "
                "reused; point storage.flash_dir elsewhere or delete the file to start fresh"
            )
        return True

    def _initialise(self, *, seed: int, table_num_rows: int) -> None:
        """Write every block from `init_rows`, chunk by chunk (never the whole shard in RAM).

        Chunks are made and written by `init_threads()` threads at once (at most that many
        chunks in memory); the header is marked complete only after all of them and an fsync.
        """
        lay = self.layout
        started = time.perf_counter()
        os.ftruncate(self._fd, lay.file_bytes)
        header = self._aligned(lay.page_bytes)
        header[: _HEADER.size] = self._header_bytes(False)
        transfer_all(os.pwritev, self._fd, header, 0, self.path)
        blocks_per_chunk = max(1, INIT_CHUNK_BYTES // lay.block_bytes)
        firsts = range(0, lay.num_blocks, blocks_per_chunk)
        progress = _InitProgress(self.path, lay.file_bytes, self._report, started)

        def write_chunk(first_block: int) -> int:
            n_blocks = min(blocks_per_chunk, lay.num_blocks - first_block)
            row_lo = first_block * lay.rows_per_block
            row_hi = min(lay.num_rows, row_lo + n_blocks * lay.rows_per_block)
            buf = IO_BUFFERS.take(n_blocks * lay.block_bytes)
            try:
                self._pack_initial(buf, n_blocks, row_lo, row_hi, seed, table_num_rows)
                with memoryview(buf) as whole, whole[: n_blocks * lay.block_bytes] as chunk:
                    transfer_all(
                        os.pwritev, self._fd, chunk, lay.block_offset(first_block), self.path
                    )
            finally:
                IO_BUFFERS.give(buf)
            progress.add(n_blocks * lay.block_bytes)
            return n_blocks

        threads = min(init_threads(), len(firsts))
        if threads <= 1:
            for first_block in firsts:
                write_chunk(first_block)
        else:  # `threads` chunks in memory at once; buffers are taken inside the tasks
            with ThreadPoolExecutor(threads, thread_name_prefix="ndp-flash-init") as pool:
                list(pool.map(write_chunk, firsts))
        header[: _HEADER.size] = self._header_bytes(True)
        transfer_all(os.pwritev, self._fd, header, 0, self.path)
        os.fsync(self._fd)
        progress.done()
        self.counters.init_bytes_written += lay.file_bytes
        self.counters.init_seconds += time.perf_counter() - started
        self.counters.files_initialised += 1

    def _pack_initial(
        self,
        buf: mmap.mmap,
        n_blocks: int,
        row_lo: int,
        row_hi: int,
        seed: int,
        table_num_rows: int,
    ) -> None:
        """Lay out the initial records of local rows [row_lo, row_hi) (from a block start)
        in `buf`: weights from `init_rows`, optimizer state and padding zero.

        Where rows fill the block and carry no state (SGD, a row size dividing the page) the
        weights are generated straight into `buf`; otherwise through a records array.
        """
        lay = self.layout
        n, dim = row_hi - row_lo, lay.embedding_dim
        view = np.frombuffer(buf, dtype=np.float32, count=n_blocks * lay.block_bytes // 4)
        blocks = view.reshape(n_blocks, lay.block_bytes // 4)
        per_block = lay.rows_per_block * lay.row_floats
        blocks[:, per_block:] = 0.0  # page padding (none when rows fill the page)
        shape = (n_blocks * lay.rows_per_block, lay.row_floats)
        in_place = per_block == blocks.shape[1]  # rows fill each block: write the buffer
        records = view.reshape(shape) if in_place else np.empty(shape, dtype=np.float32)
        rows = dict(
            seed=seed,
            table_name=self.table_name,
            num_rows=table_num_rows,
            embedding_dim=dim,
            row_start=self.row_start + row_lo,
            row_end=self.row_start + row_hi,
        )
        if lay.state_width == 0:
            init_rows(**rows, out=records[:n])
        else:
            records[:n, :dim] = init_rows(**rows)
            records[:n, dim:] = 0.0
        records[n:] = 0.0
        if not in_place:
            blocks[:, :per_block] = records.reshape(n_blocks, per_block)

    # ------------------------------------------------------------------ buffers

    @staticmethod
    def _aligned(num_bytes: int) -> mmap.mmap:
        """Page-aligned zeroed buffer (valid for O_DIRECT)."""
        return mmap.mmap(-1, max(num_bytes, 1))

    def _float_index(self, block_pos: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Float offsets into a buffer of blocks of each row's record: [n, row_floats]."""
        lay = self.layout
        slot = rows % lay.rows_per_block
        start = block_pos * (lay.block_bytes // 4) + slot * lay.row_floats
        return start[:, None] + np.arange(lay.row_floats)[None, :]

    # ------------------------------------------------------------------ batched I/O

    def _throttle(
        self,
        num_bytes: int,
        bandwidth: float | None,
        latency: float | None,
        started: float,
        *,
        sleep: bool = True,
    ) -> float:
        """Hold the caller until the emulated device has moved `num_bytes` (issued at
        `started`, `time.monotonic()`); returns when the device is done (`started` when the
        transfer costs nothing). With `sleep` False the device's clock moves on but the
        caller does not wait (a write left in flight: `storage_node.write_behind`).

        Why a device clock and not a sleep of the whole delay after the I/O: the real I/O
        already took part of the device's time (sleeping on top of it would make the device
        slower than its figures), and transfers that overlap (a detached prefetch read beside
        a lookup) queue behind each other on one device, as `storage_node.link` does for the
        link. `emulated_delay_s` counts the device time, not the part slept.
        """
        delay = transfer_delay_s(num_bytes, bandwidth, latency)
        if delay <= 0:
            return started
        with self._counters_lock:
            self.counters.emulated_delay_s += delay
            begin = max(started, self._device_busy_until)
            self._device_busy_until = end = begin + delay
            wait = end - time.monotonic()
        if wait > 0 and sleep:
            time.sleep(wait)
        return end

    def _issue(self, op, buf: mmap.mmap, blocks: np.ndarray) -> tuple[int, int]:
        """Run `op` (os.preadv or os.pwritev) over the coalesced runs of `blocks`, in parallel.

        Block i of the sorted unique `blocks` sits at byte i * block_bytes of `buf`.

        Returns:
            The number of I/O requests issued, and the threads that issued them.
        """
        lay = self.layout
        firsts, lengths = block_runs(blocks, self._max_run_blocks)
        offsets = [lay.block_offset(first) for first in firsts.tolist()]
        shares = issue_runs(
            op, buf, lay.block_bytes, lengths, [(self._fd, self.path)] * len(offsets), offsets,
            self._pool, self._io_threads,
        )  # fmt: skip
        return len(offsets), shares

    # ------------------------------------------------------------------ batched with others

    def io_geometry(self) -> IoGeometry:
        lay = self.layout
        return IoGeometry(
            rows_per_block=lay.rows_per_block,
            block_bytes=lay.block_bytes,
            page_bytes=lay.page_bytes,
            max_gap_blocks=self._max_gap_blocks,
            max_run_blocks=self._max_run_blocks,
            io_threads=self._io_threads,
        )

    @property
    def fd(self) -> int:
        """The open descriptor (for I/O batched across files, `storage_node.arena`)."""
        if self._fd < 0:
            raise ShardFileError(f"shard file {self.path} is closed")
        return self._fd

    @property
    def io_pool(self) -> ThreadPoolExecutor:
        return self._pool

    def count_read(self, nbytes: int, *, requests: int, threads: int, seconds: float) -> None:
        """Count a read of this file's blocks that another caller issued."""
        with self._counters_lock:  # a detached read may count at the same time
            self.counters.read_seconds += seconds
            self.counters.read_depth_sum += requests * threads
            self.counters.read_requests += requests
            self.counters.bytes_read += nbytes
            self.counters.pages_read += nbytes // self.layout.page_bytes
            self.counters.read_batches += 1

    def note_write(self, blocks: np.ndarray) -> None:
        """Sorted local `blocks` are about to be written by another caller (detached reads
        open now will name their rows stale)."""
        self._generation += 1
        if self._open_marks:
            self._write_log.append((self._generation, blocks))

    def throttle_transfer(
        self, num_bytes: int, started: float, *, write: bool, sleep: bool = True
    ) -> float:
        """`_throttle` at this file's read or write figures; returns when the device is done."""
        emu = self._emulation
        if write:
            bandwidth, latency = emu.flash_write_bandwidth_mbps, emu.flash_write_latency_us
        else:
            bandwidth, latency = emu.flash_read_bandwidth_mbps, emu.flash_read_latency_us
        return self._throttle(num_bytes, bandwidth, latency, started, sleep=sleep)

    def _read_blocks(self, blocks: np.ndarray) -> mmap.mmap:
        """Read sorted unique blocks into one page-aligned buffer."""
        lay = self.layout
        buf = IO_BUFFERS.take(blocks.size * lay.block_bytes)
        started = time.monotonic()
        requests, threads = self._issue(os.preadv, buf, blocks)
        seconds = time.monotonic() - started
        nbytes = blocks.size * lay.block_bytes
        with self._counters_lock:  # a detached read may count at the same time
            self.counters.read_seconds += seconds
            self.counters.read_depth_sum += requests * threads
            self.counters.read_requests += requests
            self.counters.bytes_read += nbytes
            self.counters.pages_read += nbytes // lay.page_bytes
            self.counters.read_batches += 1
        emu = self._emulation
        self._throttle(nbytes, emu.flash_read_bandwidth_mbps, emu.flash_read_latency_us, started)
        return buf

    @contextmanager
    def holding_reads(self) -> Iterator[None]:
        """Keep the blocks read inside this block so that writes to them skip the re-read.

        Why: an update reads the rows it changes (misses come from flash), and rows the cache
        does not admit are written straight back; a lookup reads its misses, and admitting
        them evicts dirty rows that are written back, mostly into the blocks just read.
        Without this, each of those writes' read-modify-write reads the same blocks again.
        The held copies are the I/O buffers of this one operation (released at exit) and
        every write inside the block updates them, so they always equal the file. Nested
        blocks hold into the outermost one, which releases them.
        """
        if self._held is not None:
            yield
            return
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            for _, _, buf in held:
                IO_BUFFERS.give(buf)

    def _hold(self, blocks: np.ndarray, buf: mmap.mmap) -> None:
        """Remember the current bytes of sorted unique `blocks`, held in `buf` (not copied:
        `buf` is not changed after this). Later copies of a block replace earlier ones.

        Outside `holding_reads` the buffer goes straight back to the pool: the caller must be
        done with it."""
        if self._held is None:
            IO_BUFFERS.give(buf)
            return
        data = np.frombuffer(buf, dtype=np.uint8, count=blocks.size * self.layout.block_bytes)
        self._held.append((blocks, data.reshape(blocks.size, self.layout.block_bytes), buf))

    def _current_blocks(self, blocks: np.ndarray) -> mmap.mmap:
        """An aligned buffer of the current bytes of sorted unique `blocks`: those held
        (`holding_reads`) copied, newest copy first, only the others read from the device."""
        if not self._held:
            return self._read_blocks(blocks)
        buf, from_held = current_blocks(
            self._held, blocks, self.layout.block_bytes, self._read_blocks
        )
        self.counters.blocks_from_held += int(from_held.sum())
        return buf

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Records of local `rows` (any order, duplicates allowed): float32 [n, D + S]."""
        rows = np.asarray(rows, dtype=np.int64)
        lay = self.layout
        if rows.size == 0:
            return np.zeros((0, lay.row_floats), dtype=np.float32)
        records, span, buf = self._gather(rows)
        self._hold(span, buf)  # after the copy: outside holding_reads buf is reused
        return records

    def _gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, mmap.mmap]:
        """Records of `rows` (a copy), the blocks read for them (gaps filled) and their buffer."""
        blocks, block_pos, _ = unique_inverse(
            rows // self.layout.rows_per_block, self.layout.num_blocks
        )
        span = fill_gaps(blocks, self._max_gap_blocks)
        buf = self._read_blocks(span)
        view = np.frombuffer(buf, dtype=np.float32)
        return view[self._float_index(self._positions(span, blocks)[block_pos], rows)], span, buf

    @staticmethod
    def _positions(span: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """Where each of sorted `blocks` sits in the sorted superset `span`."""
        return np.arange(blocks.size) if span is blocks else np.searchsorted(span, blocks)

    def write_rows(self, rows: np.ndarray, records: np.ndarray) -> None:
        """Write records of unique local `rows` (read-modify-write of their blocks; the read
        is skipped for blocks held by `holding_reads`).

        Gap blocks merged into a request are written back with the bytes just read (or held),
        i.e. unchanged: calls are serialised, so nothing writes them in between.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        lay = self.layout
        blocks, block_pos, _ = unique_inverse(rows // lay.rows_per_block, self.layout.num_blocks)
        span = fill_gaps(blocks, self._max_gap_blocks)
        buf = self._current_blocks(span)
        view = np.frombuffer(buf, dtype=np.float32)
        view[self._float_index(self._positions(span, blocks)[block_pos], rows)] = records
        del view
        self._generation += 1
        if self._open_marks:
            self._write_log.append((self._generation, span))
        started = time.monotonic()
        self.counters.write_requests += self._issue(os.pwritev, buf, span)[0]
        self._hold(span, buf)
        nbytes = span.size * lay.block_bytes
        self.counters.bytes_written += nbytes
        self.counters.pages_written += nbytes // lay.page_bytes
        self.counters.write_batches += 1
        emu = self._emulation
        self._throttle(nbytes, emu.flash_write_bandwidth_mbps, emu.flash_write_latency_us, started)

    def sync(self) -> None:
        """Make every write durable (before a checkpoint copies the file)."""
        os.fsync(self._fd)

    # ------------------------------------------------------------------ detached reads

    def detached_read(self) -> DetachedRead:
        """A read that may run while the caller's lock is released (prefetch staging).

        Call under the lock that serialises this store's other calls; then `read` without
        it, and `finish` under it again: `finish` names the rows some `write_rows` changed
        in between, whose bytes the read may have missed (or seen half written).
        """
        self._open_marks[self._generation] = self._open_marks.get(self._generation, 0) + 1
        with self._detached_done:
            self._detached_reads += 1
        return DetachedRead(self, self._generation)

    def _read_detached(self, rows: np.ndarray) -> np.ndarray:
        try:
            if self._fd < 0:
                raise ShardFileError(f"shard file {self.path} is closed")
            records, _, buf = self._gather(rows)
            IO_BUFFERS.give(buf)
            return records
        finally:
            self._release_descriptor()

    def _release_descriptor(self) -> None:
        """A detached read no longer needs the file descriptor (`close` may go on)."""
        with self._detached_done:
            self._detached_reads -= 1
            self._detached_done.notify_all()

    def _finish_detached(self, mark: int, rows: np.ndarray) -> np.ndarray:
        written = [blocks for generation, blocks in self._write_log if generation > mark]
        stale = np.zeros(rows.size, dtype=bool)
        if written:
            stale = np.isin(rows // self.layout.rows_per_block, np.concatenate(written))
        self._open_marks[mark] -= 1
        if not self._open_marks[mark]:
            del self._open_marks[mark]
        oldest = min(self._open_marks, default=None)
        self._write_log = [] if oldest is None else [e for e in self._write_log if e[0] > oldest]
        return stale

    def close(self) -> None:
        with self._detached_done:  # a detached read in flight still uses the descriptor
            while self._detached_reads:
                self._detached_done.wait()
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        self._pool.shutdown(wait=True)


def init_threads() -> int:
    """Threads that initialise a new shard file: the cores this process may use (making rows
    is CPU work; more threads than cores only hold more chunks in memory)."""
    return max(1, len(os.sched_getaffinity(0)))


class _InitProgress:
    """Counts bytes initialised (from several threads) and reports a line now and then."""

    def __init__(
        self, path: Path, total_bytes: int, report: Callable[[str], None] | None, started: float
    ) -> None:
        self.path, self.total_bytes, self.report, self.started = path, total_bytes, report, started
        self.done_bytes = 0
        self.next_report = started + INIT_PROGRESS_INTERVAL_S
        self._lock = threading.Lock()

    def add(self, num_bytes: int) -> None:
        with self._lock:
            self.done_bytes += num_bytes
            now = time.perf_counter()
            if self.report is None or now < self.next_report:
                return
            self.next_report = now + INIT_PROGRESS_INTERVAL_S
            line = (
                f"initialising {self.path.name}: {self.done_bytes / 1e9:.2f} / "
                f"{self.total_bytes / 1e9:.2f} GB ({self.done_bytes / self.total_bytes:.0%}) "
                f"at {self.done_bytes / (now - self.started) / 1e6:,.0f} MB/s"
            )
        self.report(line)

    def done(self) -> None:
        seconds = time.perf_counter() - self.started
        if self.report is not None and seconds >= INIT_PROGRESS_INTERVAL_S:
            self.report(
                f"initialised {self.path.name}: {self.total_bytes / 1e9:.2f} GB in "
                f"{seconds:.1f} s ({self.total_bytes / seconds / 1e6:,.0f} MB/s)"
            )
