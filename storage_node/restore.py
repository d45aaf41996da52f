"""A storage node's restore directory, built on the node's own machine from streamed rows.

A job checkpoint (`ndp.checkpoint`) stores tables as global-row chunks on the coordinator's
machine; a node restores from a directory in its own checkpoint format (`StorageNodeCore
.restore`). Nodes need not share a file system with the coordinator, so the coordinator
streams each piece's rows to the node (through Ray, in bounded chunks) and the node lays
them out itself, in a private directory under its flash dir::

    coordinator                                   storage node (its own machine)
    -----------                                   ------------------------------
    RestoreHeader(steps, optimizer, shards)  -->  RestoreDirWriter(directory, ...)
    rows of piece 0 [lo, hi), in row order   -->  .write(table, lo, records [n, D + S])
    ...  then piece 1, ...                        (one FlashStore file per piece)
    RowsDigest.hexdigests()                  -->  .finish(digests): every row came, the
                                                  sha256 of each piece's records matches,
                                                  <node_id>.manifest.json written
                                                  then StorageNodeCore.restore(directory)

Every message is checked as it arrives (table, first row, shape) and the whole stream at
`finish`, before the core replaces anything; the core then checks the manifest and the shard
files' sha256 again. A refused stream leaves the node's state as it was.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ndp.config import StorageConfig
from ndp.model.spec import optimizer_state_width
from ndp.plan import ShardSpec
from storage_node.errors import ShardFileError
from storage_node.flash import FlashStore
from storage_node.shard_files import CHECKPOINT_FORMAT, open_shard_file, sha256_of


@dataclass(frozen=True)
class RestoreHeader:
    """What a restore stream starts with: the node's counters and the pieces that follow."""

    applied_step: int
    """Last step whose update the restored rows include."""
    optimizer_step: int
    """The sparse optimizer's step counter (Adam bias correction)."""
    optimizer: str
    """Sparse optimizer name; fixes the optimizer-state width of each record."""
    shards: tuple[ShardSpec, ...]
    """The pieces, in the order their rows are streamed (the coordinator's plan for the node)."""


class RowsDigest:
    """Running sha256 of each piece's records (float32 little-endian, row-major), by table."""

    def __init__(self) -> None:
        self._digests: dict[str, Any] = {}

    def update(self, table_name: str, records: np.ndarray) -> None:
        digest = self._digests.setdefault(table_name, hashlib.sha256())
        digest.update(np.ascontiguousarray(records, dtype="<f4").reshape(-1))

    def hexdigests(self) -> dict[str, str]:
        return {table: digest.hexdigest() for table, digest in self._digests.items()}


@dataclass
class _Piece:
    spec: ShardSpec
    next_row: int
    """Global row the next message must start at."""
    store: FlashStore | None = None
    entry: dict | None = None
    """Its manifest entry, once all its rows are written and the file is closed."""


class RestoreDirWriter:
    """Writes streamed rows into `directory` in the storage node's checkpoint format.

    Rows must come piece by piece in the header's order, each piece's rows in order without
    gaps or overlaps. Not thread-safe (the actor serialises calls).

    Args:
        directory: an empty, private directory (the caller creates and removes it).
        node_id: the node's id; names the manifest and the shard files.
        header: the counters and the pieces to expect.
        storage: the node's storage section (page size, I/O threads of the shard files).
        seed: init seed of the shard files (every row is overwritten by the stream).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        node_id: str,
        header: RestoreHeader,
        storage: StorageConfig,
        seed: int,
    ) -> None:
        self.directory = Path(directory)
        self.node_id = node_id
        self.header = header
        self._storage = storage
        self._seed = seed
        self._pieces = [_Piece(spec, spec.row_start) for spec in header.shards]
        self._index = 0  # the piece being written
        self._digest = RowsDigest()

    def write(self, table_name: str, row_start: int, records: np.ndarray) -> None:
        """Rows [row_start, row_start + n) of `table_name`: records float32 [n, D + S]."""
        piece = self._current()
        if piece is None:
            raise ShardFileError(
                f"restore of node {self.node_id!r}: rows of {table_name!r} from {row_start} "
                "arrived after every piece was complete"
            )
        spec = piece.spec
        if table_name != spec.table_name or row_start != piece.next_row:
            raise ShardFileError(
                f"restore of node {self.node_id!r}: expected rows of {spec.table_name!r} from "
                f"{piece.next_row}, got {table_name!r} from {row_start} (rows must be streamed "
                "piece by piece, in order)"
            )
        width = spec.embedding_dim + optimizer_state_width(
            self.header.optimizer, spec.embedding_dim
        )
        records = np.asarray(records)
        row_end = row_start + (records.shape[0] if records.ndim == 2 else 0)
        if records.ndim != 2 or records.shape[1] != width or row_end > spec.row_end:
            raise ShardFileError(
                f"restore of node {self.node_id!r}: records {tuple(records.shape)} for rows of "
                f"{table_name!r} from {row_start} do not fit the piece [{spec.row_start}, "
                f"{spec.row_end}) x {width} floats"
            )
        assert piece.store is not None
        piece.store.write_rows(
            np.arange(row_start - spec.row_start, row_end - spec.row_start),
            records.astype(np.float32, copy=False),
        )
        self._digest.update(table_name, records)
        piece.next_row = row_end

    def finish(self, records_sha256: dict[str, str]) -> Path:
        """Check the stream is whole and unaltered, write the manifest; returns the directory.

        Args:
            records_sha256: {table: sha256 of the records the sender streamed}
                (`RowsDigest.hexdigests()`).
        """
        piece = self._current()
        if piece is not None:
            raise ShardFileError(
                f"restore of node {self.node_id!r} is incomplete: rows of "
                f"{piece.spec.table_name!r} [{piece.next_row}, {piece.spec.row_end}) never came"
            )
        received = self._digest.hexdigests()
        for table in sorted(set(received) | set(records_sha256)):
            if received.get(table) != records_sha256.get(table):
                raise ShardFileError(
                    f"restore of node {self.node_id!r}: the rows of {table!r} that arrived "
                    "differ from the rows sent (sha256 mismatch); nothing was restored"
                )
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "node_id": self.node_id,
            "applied_step": self.header.applied_step,
            "optimizer_step": self.header.optimizer_step,
            "optimizer": self.header.optimizer,
            "shards": [p.entry for p in self._pieces],
        }
        manifest_name = re.sub(r"[^A-Za-z0-9_.-]", "_", self.node_id) + ".manifest.json"
        (self.directory / manifest_name).write_text(json.dumps(manifest, indent=1))
        return self.directory

    def close(self) -> None:
        """Close any shard file still open (after a refused or abandoned stream)."""
        for piece in self._pieces:
            if piece.store is not None:
                piece.store.close()
                piece.store = None

    def _current(self) -> _Piece | None:
        """The first piece still missing rows (its file opened), sealing complete ones."""
        while self._index < len(self._pieces):
            piece = self._pieces[self._index]
            if piece.store is None and piece.entry is None:
                piece.store = self._open(piece.spec)
            if piece.next_row < piece.spec.row_end:
                return piece
            self._seal(piece)
            self._index += 1
        return None

    def _open(self, spec: ShardSpec) -> FlashStore:
        return open_shard_file(
            self.directory,
            self.node_id,
            spec,
            optimizer=self.header.optimizer,
            seed=self._seed,
            storage=self._storage,
            device_like=False,
        )

    def _seal(self, piece: _Piece) -> None:
        assert piece.store is not None
        piece.store.close()
        path, file_bytes = piece.store.path, piece.store.layout.file_bytes
        piece.store = None
        piece.entry = {
            "spec": {**asdict(piece.spec), "features": list(piece.spec.features)},
            "file": path.name,
            "sha256": sha256_of(path),
            "bytes": file_bytes,
        }
