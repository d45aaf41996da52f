"""A node's shard files: where each piece's file lives, and copying them with their sha256.

Checkpoints are a directory holding, per node, ``<node_id>.manifest.json`` and one copy of
each shard file (``<node_id>.<table>.<start>-<end>.shard``, sha256 in the manifest), each
written to a temporary name and renamed, manifest last. Nodes may share a directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

from ndp.config import StorageConfig
from ndp.model.spec import optimizer_state_width
from storage_node.errors import ShardFileError
from storage_node.flash import FlashStore
from storage_node.spec import ShardSpec

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
    )


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
