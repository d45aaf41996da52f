"""A flash directory that cannot hold the shard files is a user error: one line, nothing left.

`storage.flash_dir` full, read-only or otherwise failing must not reach the user as a Ray
traceback or leave half-written shard files behind: the node checks free space before it
creates anything, and any OSError while shard files are created becomes one `FlashDirError`
line naming the file (or directory) and the errno. The node is the plain `StorageNodeActor`
class, called in-process (no Ray). Full and read-only file systems are real tmpfs mounts
(root ignores permissions, so a read-only directory must be a read-only mount).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tmpfs_mounts import tmpfs_mounts

from ndp.config import Config, config_from_dict
from ndp.errors import NDPError
from ndp.plan import ShardSpec
from storage_node import flash as flash_module
from storage_node.actor import StorageNodeActor
from storage_node.errors import FlashDirError
from storage_node.flash import FlashStore

from .conftest import shard

SMALL = shard("small", num_rows=10)
"""One 512-byte header page and two blocks: fits anywhere."""
LARGE = shard("large", num_rows=4000, dim=16)
"""About 290 KB of rows (rowwise_adagrad, 512-byte pages): more than a 64 KiB file system."""


@pytest.fixture()
def tmpfs(tmp_path) -> Iterator[Callable[..., Path]]:
    """`tmpfs(size, read_only=False)`: a fresh tmpfs of `size` bytes; unmounted at teardown."""
    with tmpfs_mounts(tmp_path) as mount:
        yield mount


def _cfg(flash_dir: Path, **storage) -> Config:
    return config_from_dict(
        {
            "model": {
                "bottom_mlp": [16, 8],
                "top_mlp": [16, 1],
                "tables": [{"name": "t", "num_rows": 40, "embedding_dim": 8, "features": ["f"]}],
            },
            "storage": {"page_bytes": 512, "io_threads": 2, "flash_dir": str(flash_dir), **storage},
        }
    )


def _start(flash_dir: Path, shards: list[ShardSpec], **storage) -> StorageNodeActor:
    """Start node n0 in-process; the caller shuts it down (a failed start already did)."""
    actor = StorageNodeActor("n0", shards, _cfg(flash_dir, **storage), token="t", num_workers=1)
    try:
        actor.start()
    except BaseException:
        actor.shutdown()
        raise
    return actor


def _start_error(flash_dir: Path, shards: list[ShardSpec], **storage) -> FlashDirError:
    """The error that starting node n0 on `flash_dir` raises (fails the test if it starts)."""
    try:
        actor = _start(flash_dir, shards, **storage)
    except FlashDirError as error:
        return error
    actor.shutdown()
    pytest.fail(f"the node started on {flash_dir}")


def _store(path: Path, spec: ShardSpec = LARGE, **kwargs) -> FlashStore:
    return FlashStore(
        path,
        table_name=spec.table_name,
        table_num_rows=spec.table_num_rows,
        row_start=spec.row_start,
        num_rows=spec.row_end - spec.row_start,
        embedding_dim=spec.embedding_dim,
        state_width=1,
        seed=7,
        page_bytes=512,
        io_threads=2,
        **kwargs,
    )


def _assert_one_short_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message
    assert len(message) < 300, message


# ------------------------------------------------------------------ full file system


def test_a_node_on_a_full_file_system_names_the_directory_the_bytes_needed_and_free(tmpfs):
    flash_dir = tmpfs(64 << 10)

    error = _start_error(flash_dir, [SMALL, LARGE])

    message = str(error)
    _assert_one_short_line(message)
    assert isinstance(error, NDPError)  # ndp-train: exit 2 with this line
    assert str(flash_dir) in message
    free = os.statvfs(flash_dir).f_bavail * os.statvfs(flash_dir).f_frsize
    assert f"{free:,} bytes free" in message
    assert "need" in message and "bytes" in message
    assert os.listdir(flash_dir) == []  # checked before anything was written


def test_files_already_there_need_no_new_space(tmpfs):
    flash_dir = tmpfs(96 << 10)
    shards = [SMALL, shard("medium", num_rows=1000, dim=8)]  # about 70 KB of the 96
    _start(flash_dir, shards).shutdown()

    _start(flash_dir, shards).shutdown()  # a restart on its own files: no new bytes needed


def test_a_shard_file_that_hits_a_full_disk_is_one_line_naming_the_file_and_is_removed(tmpfs):
    # the free-space check is the node's: a store on its own finds the disk full mid-write,
    # where a short write used to leave a truncated file marked complete
    path = tmpfs(64 << 10) / "large.shard"

    with pytest.raises(FlashDirError) as caught:
        _store(path)

    message = str(caught.value)
    _assert_one_short_line(message)
    assert str(path) in message
    assert os.strerror(errno.ENOSPC) in message and "ENOSPC" in message
    assert not path.exists()


def test_an_os_error_creating_a_later_piece_removes_the_files_this_start_made(tmp_path):
    flash_dir = tmp_path / "flash"
    flash_dir.mkdir()
    obstacle = flash_dir / "n0.large.0-4000.shard"
    obstacle.mkdir()  # the second piece's file name is taken by a directory: EISDIR

    error = _start_error(flash_dir, [SMALL, LARGE])

    message = str(error)
    _assert_one_short_line(message)
    assert str(obstacle) in message and "EISDIR" in message
    assert os.listdir(flash_dir) == [obstacle.name]  # the first piece's new file is gone


# ------------------------------------------------------------------ read-only file system


def test_a_read_only_flash_dir_is_one_short_line_naming_the_directory_and_erofs(tmpfs):
    flash_dir = tmpfs(64 << 10, read_only=True)

    error = _start_error(flash_dir, [SMALL], use_odirect=True)

    message = str(error)
    _assert_one_short_line(message)
    assert str(flash_dir) in message and "EROFS" in message
    assert "O_DIRECT" not in message  # the error is not O_DIRECT's


def test_a_missing_flash_dir_on_a_read_only_file_system_is_one_line_naming_it(tmpfs):
    flash_dir = tmpfs(64 << 10, read_only=True) / "flash"

    error = _start_error(flash_dir, [SMALL])

    message = str(error)
    _assert_one_short_line(message)
    assert str(flash_dir) in message and "EROFS" in message


def test_a_shard_file_in_a_read_only_directory_names_the_file_without_an_odirect_hint(tmpfs):
    path = tmpfs(64 << 10, read_only=True) / "small.shard"

    with pytest.raises(FlashDirError) as caught:
        _store(path, SMALL, use_odirect=True)

    message = str(caught.value)
    _assert_one_short_line(message)
    assert str(path) in message and "EROFS" in message and "O_DIRECT" not in message


def test_the_odirect_hint_comes_only_with_einval_from_an_odirect_open(tmp_path, monkeypatch):
    real_open = os.open

    def open_refusing_odirect(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(flash_module.os, "open", open_refusing_odirect)

    with pytest.raises(FlashDirError) as caught:
        _store(tmp_path / "small.shard", SMALL, use_odirect=True)

    message = str(caught.value)
    _assert_one_short_line(message)
    assert "EINVAL" in message and "storage.use_odirect" in message and "O_DIRECT" in message
    assert not (tmp_path / "small.shard").exists()
