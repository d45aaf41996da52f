"""A node's shard files: where each piece's file lives, creating them, copying them.

A node creates its files inside `creating_shard_files`: free space is checked first (nothing
is written when the pieces cannot fit), and a creation that fails removes the files it made.

Checkpoints are a directory holding, per node, ``<node_id>.manifest.json`` and one copy of
each shard file (``<node_id>.<table>.<start>-<end>.shard``, sha256 in the manifest), each
written to a temporary name and renamed, manifest last. Nodes may share a directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ndp.config import StorageConfig
from ndp.model.spec import optimizer_state_width
from ndp.plan import ShardSpec
from storage_node.errors import FlashDirError, ShardFileError
from storage_node.flash import FlashLayout, FlashStore, flash_dir_error

CHECKPOINT_FORMAT = "ndp-storage-node-checkpoint/1"
_COPY_CHUNK_BYTES = 8 << 20


def file_stem(node_id: str, spec: ShardSpec) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{node_id}.{spec.table_name}")
    return f"{safe}.{spec.row_start}-{spec.row_end}.shard"


def open_shard_file(
    directory: Path,
    node_id: str,
    spec: ShardSpec,
    *,
    optimizer: str,
    seed: int,
    storage: StorageConfig,
    device_like: bool = True,
) -> FlashStore:
    """The flash file of one piece, `<directory>/<node_id>.<table>.<start>-<end>.shard`.

    Args:
        device_like: use the configured O_DIRECT and emulation knobs (a node serving
            traffic); False for files that are only being written once (a restore stream).
    """
    return FlashStore(
        directory / file_stem(node_id, spec),
        table_name=spec.table_name,
        table_num_rows=spec.table_num_rows,
        row_start=spec.row_start,
        num_rows=spec.row_end - spec.row_start,
        embedding_dim=spec.embedding_dim,
        state_width=optimizer_state_width(optimizer, spec.embedding_dim),
        seed=seed,
        page_bytes=storage.page_bytes,
        io_threads=storage.io_threads,
        use_odirect=storage.use_odirect and device_like,
        merge_gap_bytes=storage.io_merge_gap_bytes,
        emulation=storage.emulation if device_like else None,
        report=report_to_stderr,
    )


def report_to_stderr(line: str) -> None:
    """A node's progress line (a long shard initialisation): on stderr, which Ray forwards
    to the driver's console with the actor's name."""
    print(f"ndp storage node: {line}", file=sys.stderr, flush=True)


def shard_file_bytes(spec: ShardSpec, *, optimizer: str, storage: StorageConfig) -> int:
    """Size of the piece's flash file (header page + blocks)."""
    return FlashLayout(
        num_rows=spec.row_end - spec.row_start,
        embedding_dim=spec.embedding_dim,
        state_width=optimizer_state_width(optimizer, spec.embedding_dim),
        page_bytes=storage.page_bytes,
    ).file_bytes


def bytes_to_create(
    directory: Path,
    node_id: str,
    shards: list[ShardSpec],
    *,
    optimizer: str,
    storage: StorageConfig,
) -> int:
    """Disk bytes the node's shard files still need: a file already there (a restart on the
    same flash_dir) counts the blocks it holds, so reopening it needs nothing new."""
    needed = 0
    for spec in shards:
        try:
            held = (directory / file_stem(node_id, spec)).stat().st_blocks * 512
        except FileNotFoundError:
            held = 0
        needed += max(0, shard_file_bytes(spec, optimizer=optimizer, storage=storage) - held)
    return needed


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_flash_dir(
    directory: Path,
    node_id: str,
    shards: list[ShardSpec],
    *,
    optimizer: str,
    storage: StorageConfig,
) -> None:
    """Refuse a flash dir that cannot take the node's files before anything is written.

    Why: a full disk used to surface mid-write as a Ray traceback with partial files left
    behind. `directory` may not exist yet; its nearest existing parent is checked.

    Raises:
        FlashDirError: read-only, fewer bytes free than the files need (both named), or
            the directory cannot be examined.
    """
    try:
        stat = os.statvfs(_nearest_existing(directory))
        needed = bytes_to_create(directory, node_id, shards, optimizer=optimizer, storage=storage)
    except OSError as error:
        raise flash_dir_error(f"examine {directory}", error) from None
    if stat.f_flag & os.ST_RDONLY:
        raise flash_dir_error(
            f"create shard files in {directory}", OSError(errno.EROFS, os.strerror(errno.EROFS))
        )
    free = stat.f_bavail * stat.f_frsize
    if needed > free:
        raise FlashDirError(
            f"storage.flash_dir {directory}: node {node_id}'s {len(shards)} shard files need "
            f"{needed:,} bytes, only {free:,} bytes free; free space there or point "
            "storage.flash_dir at a larger file system"
        )


@contextmanager
def creating_shard_files(
    directory: Path,
    node_id: str,
    shards: list[ShardSpec],
    *,
    optimizer: str,
    storage: StorageConfig,
) -> Iterator[None]:
    """Check `directory` (`check_flash_dir`), create it, and run the block that opens the
    node's shard files; if the block fails, remove the files (and directory) it created.

    Files that were there before are kept: they hold a previous run's rows.

    Raises:
        FlashDirError: the check failed, or `directory` could not be created.
    """
    check_flash_dir(directory, node_id, shards, optimizer=optimizer, storage=storage)
    made_directory = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise flash_dir_error(f"create directory {directory}", error) from None
    paths = [directory / file_stem(node_id, spec) for spec in shards]
    existing = {path for path in paths if path.exists()}
    try:
        yield
    except BaseException:
        for path in paths:
            if path not in existing:
                with suppress(OSError):
                    path.unlink()
        if made_directory:
            with suppress(OSError):
                directory.rmdir()  # only if empty
        raise


def copy_with_sha256(src: Path, dst: Path) -> str:
    """Copy `src` to `dst` via a temporary name + rename; returns the sha256 of the bytes.

    A failed copy removes its temporary file and leaves `dst` as it was."""
    digest = hashlib.sha256()
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(_COPY_CHUNK_BYTES):
                digest.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def stage_file(src: Path, target: Path, sha256: str, *, move: bool) -> None:
    """Put the checkpoint file `src` at `target`, durable and with the expected sha256.

    Raises:
        ShardFileError: a copied file's bytes are no longer those the manifest names.
    """
    if move:
        try:
            os.replace(src, target)
            return
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
    digest = copy_with_sha256(src, target)
    if digest != sha256:
        raise ShardFileError(
            f"checkpoint file {src} changed after it was verified (sha256 mismatch)"
        )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fin:
        while chunk := fin.read(_COPY_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
