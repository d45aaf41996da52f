"""What the storage device under a directory can do: random 4 KiB reads and sequential writes.

The probe reads random page-aligned 4 KiB blocks of existing files (the shard files of the
run, so the same device, file system and extents the nodes read) with ``O_DIRECT`` at
several queue depths, and writes one temporary file sequentially with ``O_DIRECT``. Queue
depth is the number of threads that each keep one ``os.preadv`` in flight, which is how a
storage node issues a batch's runs (`storage_node.flash.FlashStore._issue`: a thread pool of
`storage.io_threads`, one blocking pread per thread at a time), so the probe's figure at the
node's depth is the rate the node's I/O path could reach on this device.

::

    depth 16:   thread 0  |pread|pread|pread| ...      each thread: its own aligned 4 KiB
                thread 1  |pread|pread|pread| ...      buffer (mmap, page aligned), its own
                ...                                    random offsets (seeded), until the
                thread 15 |pread|pread|pread| ...      window's end

Where the file system refuses ``O_DIRECT`` (tmpfs), the probe falls back to buffered I/O
and says so in `ProbeResult.note`: its figures then measure the page cache, not a device.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BLOCK_BYTES = 4096
DEPTHS = (1, 16, 64)
_WRITE_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class DepthResult:
    """Random 4 KiB reads at one queue depth."""

    queue_depth: int
    reads: int
    seconds: float
    iops: float
    mb_per_s: float
    """Decimal megabytes (1e6 bytes) per second."""
    mean_latency_us: float


@dataclass(frozen=True)
class ProbeResult:
    """The device's random-read and sequential-write rates, as measured by `probe_device`."""

    directory: str
    odirect: bool
    """False where the file system refused O_DIRECT (the figures are then the page cache's)."""
    random_read: list[DepthResult]
    seq_write_mb_per_s: float
    seq_write_bytes: int
    read_span_bytes: int
    """Bytes of the files the random reads spread over (larger than RAM: no cache can help)."""
    note: str = ""
    threads_kind: str = "threads (one blocking pread each), as storage_node.flash issues runs"
    extra: dict[str, Any] = field(default_factory=dict)

    def at_depth(self, depth: float) -> DepthResult:
        """The measured depth nearest to `depth` (log scale): the node's matched figure."""
        return min(self.random_read, key=lambda r: abs(np.log(r.queue_depth / max(depth, 1))))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """One line per figure, for the benchmark's summary."""
        mode = "O_DIRECT" if self.odirect else f"buffered ({self.note})"
        out = [
            f"device probe ({self.directory}, {mode}): random 4 KiB reads over "
            f"{self.read_span_bytes / 1e9:.2f} GB"
        ]
        out += [
            f"  qd {r.queue_depth:>3}: {r.iops:,.0f} IOPS, {r.mb_per_s:,.1f} MB/s, "
            f"mean latency {r.mean_latency_us:,.0f} us"
            for r in self.random_read
        ]
        out.append(
            f"  sequential write: {self.seq_write_mb_per_s:,.1f} MB/s "
            f"({self.seq_write_bytes / 1e6:,.0f} MB, 8 MiB O_DIRECT writes)"
        )
        return out


def _open(path: Path, flags: int) -> tuple[int, bool, str]:
    """(fd, O_DIRECT in use, note): O_DIRECT if the file system takes it, else buffered."""
    try:
        return os.open(path, flags | os.O_DIRECT, 0o644), True, ""
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        note = f"{path.parent} refuses O_DIRECT (EINVAL, e.g. tmpfs); buffered I/O measured"
        return os.open(path, flags, 0o644), False, note


def _read_worker(
    fds: list[int], blocks: np.ndarray, file_of: np.ndarray, deadline: float, out: list[int]
) -> None:
    """Read `blocks` (block index within file `file_of`) one pread at a time until done or
    `deadline`; appends the number read to `out`."""
    buf = mmap.mmap(-1, BLOCK_BYTES)  # page aligned: valid for O_DIRECT
    done = 0
    for block, file_index in zip(blocks.tolist(), file_of.tolist(), strict=True):
        os.preadv(fds[file_index], [buf], block * BLOCK_BYTES)
        done += 1
        if done % 64 == 0 and time.perf_counter() >= deadline:
            break
    out.append(done)
    buf.close()


def random_reads(
    paths: Sequence[Path], depth: int, *, seconds: float, max_reads: int, seed: int = 0
) -> tuple[DepthResult, bool, str]:
    """Random aligned 4 KiB reads spread over `paths` by `depth` threads for about
    `seconds` (at most `max_reads` in all); (result, O_DIRECT used, note)."""
    sizes = np.array([Path(p).stat().st_size // BLOCK_BYTES for p in paths], dtype=np.int64)
    if sizes.sum() == 0:
        raise ValueError(f"nothing to read: {len(paths)} files of under {BLOCK_BYTES} bytes")
    opened = [_open(Path(p), os.O_RDONLY) for p in paths]
    fds = [fd for fd, _, _ in opened]
    odirect = all(direct for _, direct, _ in opened)
    note = next((n for _, _, n in opened if n), "")
    rng = np.random.default_rng(seed)
    per_thread = max(1, max_reads // depth)
    # a block chosen uniformly over all files' blocks (files weighted by size)
    flat = rng.integers(0, int(sizes.sum()), size=(depth, per_thread))
    bounds = np.cumsum(sizes)
    file_of = np.searchsorted(bounds, flat, side="right")
    blocks = flat - np.concatenate([[0], bounds[:-1]])[file_of]
    counts: list[int] = []
    try:
        started = time.perf_counter()
        threads = [
            threading.Thread(
                target=_read_worker,
                args=(fds, blocks[t], file_of[t], started + seconds, counts),
            )
            for t in range(depth)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
    finally:
        for fd in fds:
            os.close(fd)
    reads = sum(counts)
    result = DepthResult(
        queue_depth=depth,
        reads=reads,
        seconds=elapsed,
        iops=reads / elapsed,
        mb_per_s=reads * BLOCK_BYTES / elapsed / 1e6,
        mean_latency_us=elapsed * depth / max(reads, 1) * 1e6,
    )
    return result, odirect, note


def sequential_write(directory: Path, num_bytes: int) -> tuple[float, bool, str]:
    """(MB/s, O_DIRECT used, note) of writing `num_bytes` to a new file in `directory` in
    8 MiB writes, fsync included; the file is removed after."""
    path = Path(directory) / f".ndp-device-probe-{os.getpid()}.tmp"
    fd, odirect, note = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    chunk_bytes = min(_WRITE_CHUNK_BYTES, -(-num_bytes // BLOCK_BYTES) * BLOCK_BYTES)
    buf = mmap.mmap(-1, chunk_bytes)
    buf.write(np.random.default_rng(1).bytes(chunk_bytes))  # not zeros: no device shortcut
    written = 0
    try:
        started = time.perf_counter()
        while written < num_bytes:
            written += os.pwritev(fd, [buf], written)
        os.fsync(fd)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        buf.close()
        path.unlink(missing_ok=True)
    return written / elapsed / 1e6, odirect, note


def probe_device(
    read_paths: Sequence[Path],
    write_directory: Path,
    *,
    depths: Sequence[int] = DEPTHS,
    seconds_per_depth: float = 5.0,
    max_reads_per_depth: int = 2_000_000,
    write_bytes: int = 1 << 30,
) -> ProbeResult:
    """Random 4 KiB reads of `read_paths` at each of `depths`, and a sequential write of
    `write_bytes` into `write_directory` (at most a quarter of its free space: the probe
    must not be what fills the disk the shard files are on)."""
    stat = os.statvfs(write_directory)
    write_bytes = min(write_bytes, max(1 << 20, stat.f_bavail * stat.f_frsize // 4))
    results = []
    odirect, notes = True, []
    for depth in depths:
        result, direct, note = random_reads(
            read_paths, depth, seconds=seconds_per_depth, max_reads=max_reads_per_depth
        )
        results.append(result)
        odirect &= direct
        notes.append(note)
    mb_per_s, direct, note = sequential_write(write_directory, write_bytes)
    odirect &= direct
    notes.append(note)
    return ProbeResult(
        directory=str(write_directory),
        odirect=odirect,
        random_read=results,
        seq_write_mb_per_s=mb_per_s,
        seq_write_bytes=write_bytes,
        read_span_bytes=sum(Path(p).stat().st_size for p in read_paths),
        note="; ".join(sorted({n for n in notes if n})),
    )
