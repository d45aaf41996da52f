"""A node's checkpoints: copy every shard file with its sha256, restore them all or nothing
(a part of `StorageNodeCore`; the file format and copies are in `storage_node.shard_files`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

from storage_node import shard_files
from storage_node.arena import Piece
from storage_node.errors import ShardFileError
from storage_node.shard_files import CHECKPOINT_FORMAT


class Checkpoints:
    """`StorageNodeCore`'s checkpoint and restore (under the node's `_lock`)."""

    def _manifest_path(self, directory: Path) -> Path:
        return directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.node_id)}.manifest.json"

    def checkpoint(self, directory: str | Path) -> dict:
        """Write a consistent copy of every piece (at the current step barrier).

        Dirty cached rows are flushed first. Gradients of a step not yet applied are not
        part of a checkpoint (take checkpoints between steps).

        Returns:
            The manifest (also written as `<node_id>.manifest.json`).
        """
        directory = Path(directory)
        with self._lock:
            self._check_open()
            directory.mkdir(parents=True, exist_ok=True)
            for arena in self._arenas:
                arena.cache.flush()
                arena.flash.drain()  # every write on the files before they are copied
            shards = []
            for piece in self._pieces.values():
                piece.flash.sync()
                name = shard_files.file_stem(self.node_id, piece.spec)
                digest = shard_files.copy_with_sha256(piece.flash.path, directory / name)
                shards.append(
                    {
                        "spec": {**asdict(piece.spec), "features": list(piece.spec.features)},
                        "file": name,
                        "sha256": digest,
                        "bytes": piece.flash.layout.file_bytes,
                    }
                )
            manifest = {
                "format": CHECKPOINT_FORMAT,
                "node_id": self.node_id,
                "applied_step": self.applied_step,
                "optimizer_step": self.optimizer_step,
                "optimizer": self.optimizer.name,
                "shards": shards,
            }
            path = self._manifest_path(directory)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(manifest, indent=2))
            os.replace(tmp, path)
            return manifest

    def restore(self, directory: str | Path) -> None:
        """Replace every piece and the step counters with a checkpoint of this node.

        Everything is verified (format, optimizer, shard specs, sha256) before anything is
        replaced; pending lookups/pushes and prefetch pins are dropped.
        """
        with self._lock:
            self.restore_verified(directory, self.verify_restore(directory))

    def verify_restore(self, directory: str | Path) -> dict:
        """Check that `directory` holds a checkpoint this node can restore; its manifest.

        Why separate: a job restores all its nodes together, so it verifies every node
        before any of them replaces its state (`restore_verified`).

        Raises:
            ShardFileError: no manifest, another format or optimizer, another plan, or a
                file whose sha256 differs from the manifest's.
        """
        directory = Path(directory)
        with self._lock:
            self._check_open()
            manifest = self._read_manifest(directory)
            by_table = {entry["spec"]["table_name"]: entry for entry in manifest["shards"]}
            for table, piece in self._pieces.items():
                entry = by_table.get(table)
                expected = {**asdict(piece.spec), "features": list(piece.spec.features)}
                if entry is None or entry["spec"] != expected:
                    raise ShardFileError(
                        f"checkpoint {directory} does not hold table {table!r} as this node "
                        f"does ({expected}); restore from a checkpoint of the same plan"
                    )
                if shard_files.sha256_of(directory / entry["file"]) != entry["sha256"]:
                    raise ShardFileError(
                        f"checkpoint file {directory / entry['file']} is corrupt (sha256 mismatch)"
                    )
            return manifest

    def restore_verified(
        self, directory: str | Path, manifest: dict, *, consume: bool = False
    ) -> None:
        """Replace every piece with the files of `directory`, which `verify_restore` passed
        with this `manifest` (and which nothing changed since).

        Two phases, so that an I/O failure (a full disk, a vanished file) changes nothing:
        first every file is staged next to the live shard file it replaces (copied and its
        sha256 checked again, or with `consume` moved: the directory is this node's private
        restore directory on the same file system); only then are the live files replaced,
        by renames, which need no space and do not fail half way through a file. The
        actor's commit consumes its private restore directory, so a job's commit on every
        node is renames only.

        Args:
            consume: move the files out of `directory` instead of copying them (falls back
                to a copy across file systems).
        """
        directory = Path(directory)
        by_table = {entry["spec"]["table_name"]: entry for entry in manifest["shards"]}
        with self._lock:
            self._check_open()
            staged: list[tuple[Piece, Path]] = []
            try:
                for table, piece in self._pieces.items():
                    entry = by_table[table]
                    target = piece.flash.path.with_name(piece.flash.path.name + ".restoring")
                    staged.append((piece, target))
                    shard_files.stage_file(
                        directory / entry["file"], target, entry["sha256"], move=consume
                    )
            except BaseException:
                for _, target in staged:
                    target.unlink(missing_ok=True)
                raise
            for arena in self._arenas:
                arena.cache.invalidate()
                arena.flash.release_held()  # the files are replaced under it
            for piece, target in staged:
                counters = piece.flash.counters
                piece.flash.close()
                os.replace(target, piece.flash.path)
                store = self._open_flash(piece.spec)
                store.counters = counters
                piece.arena.flash.stores[piece.index] = store
            for arena in self._arenas:
                arena.cache.preload()
            self.applied_step = int(manifest["applied_step"])
            self.optimizer_step = int(manifest["optimizer_step"])
            self._pending.clear()
            self._pins.clear()
            self._early.clear()
            self._step_applied.notify_all()

    def _read_manifest(self, directory: Path) -> dict:
        path = self._manifest_path(directory)
        if not path.is_file():
            raise ShardFileError(
                f"no checkpoint of node {self.node_id!r} in {directory} ({path.name})"
            )
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ShardFileError(
                f"{path} is not JSON ({error}); the checkpoint is damaged: restore from another one"
            ) from None
        if not isinstance(manifest, dict):
            raise ShardFileError(f"{path} holds no manifest (a JSON object); restore another")
        if manifest.get("format") != CHECKPOINT_FORMAT:
            raise ShardFileError(
                f"{path}: format {manifest.get('format')!r} is not {CHECKPOINT_FORMAT}"
            )
        if manifest.get("optimizer") != self.optimizer.name:
            raise ShardFileError(
                f"{path} was written with sparse optimizer {manifest.get('optimizer')!r}; this "
                f"node uses {self.optimizer.name!r} (set optimizer.sparse.name to match)"
            )
        return manifest
