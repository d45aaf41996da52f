"""Consistent, atomic checkpoints of a whole ndp job, and the schedule that takes them.

A checkpoint is taken at a step barrier: after step `s`'s update is applied on every storage
node and every GPU worker, before step `s + 1` starts. It holds everything needed to continue
bit for bit: the dense half and its optimizer, every embedding row with its optimizer state,
the position in the data (`next_step`), the RNG states of this process, the plan and the
config. Layout::

    <checkpoint.dir>/
      step-00000011/                   checkpoint after step 11 (next_step = 12)
        manifest.json                  format, next_step, tables, sha256 of every other file,
                                       manifest_sha256 over all of that
        config.yaml                    the run's resolved config
        plan.json                      ShardingPlan.to_dict() of the layout it was taken on
        rng.pt                         torch / numpy / python `random` states
        dense/model.pt                 dense half state_dict (rank 0's; all ranks are equal)
        dense/optimizer.pt             dense optimizer state_dict
        tables/<table>/<start>-<end>.npy   float32 [end - start, D + S]: weights | opt. state
      step-00000005/                   an older one (retention: checkpoint.keep_last)
      step-00000017.tmp-3fa9c1/        a write that never finished: ignored, then removed
      step-00000011.old-5be07d/        step 11 set aside while a rewrite of it is renamed in

Why tables are stored as global-row-range chunks rather than per-node files: restoring onto a
different number of storage nodes (a new plan) only has to slice global rows, so the same
files serve the same plan and any other one. `Checkpoint.table_records(table, a, b)` reads
rows [a, b) from whichever chunks cover them. To restore, the coordinator reads the rows of
each node's pieces (`node_restore_rows`) and streams them, a few MiB per message, to the node,
which lays out its restore directory on its own machine (`storage_node/restore.py`): nodes
need not share a file system with the coordinator.

Why writes are atomic: everything goes into `step-<s>.tmp-<random>/`; files and the directory
are fsynced, then the directory is renamed to `step-<s>/` and the parent fsynced. A crash at
any point leaves the previous checkpoint untouched; `latest_checkpoint` never picks a `.tmp-`
directory and `remove_partial_checkpoints` deletes them. Rewriting a step that exists (a replay
after recovery) first renames the old `step-<s>/` aside to `step-<s>.old-<random>/`, then
renames the new one in, then deletes the old: a crash between the renames leaves the aside
copy, which `list_checkpoints` stands in for the missing step and `remove_partial_checkpoints`
renames back (or deletes, once the new one is in).

Why the manifest carries a digest of itself: every other file is checked against the sha256
the manifest lists, but nothing checked the manifest, so an edited `next_step` resumed at the
wrong step from the right weights. `manifest_sha256` is the sha256 of the manifest's canonical
JSON without that field (`manifest_digest`), so it covers `next_step`, the table layout and
every file's sha256. A manifest that does not parse or fails the check is refused with a
`CheckpointError` naming it; `resolve_checkpoint` on a directory of checkpoints then falls
back to the newest intact one and logs each one it skipped and why. Manifests of format
`ndp-checkpoint/1` predate the digest: they still load (their files are checked), with a
warning that the manifest itself cannot be verified; a current-format manifest without a
valid digest is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ndp.config import Config
from ndp.errors import NDPError

if TYPE_CHECKING:
    from ndp.plan import ShardSpec
    from storage_node.restore import RestoreHeader

FORMAT = "ndp-checkpoint/2"
"""Format written; format 2 manifests carry `manifest_sha256`."""
UNVERIFIED_FORMAT = "ndp-checkpoint/1"
"""Format of manifests written before the digest: loaded with a warning."""
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest_sha256"
_MANIFEST_FIELDS = {
    "next_step": int,
    "sparse_optimizer": str,
    "sparse_optimizer_step": int,
    "tables": dict,
    "sha256": dict,
}
"""Fields every manifest has, with their JSON types (checked so a damaged one is named, not
met later as a KeyError)."""
CHUNK_ROWS = 1 << 20
"""Rows per table chunk file: bounds the memory one read_rows call and one file need."""
RESTORE_CHUNK_BYTES = 4 << 20
"""Bytes of records per message when a node's pieces are streamed to it for a restore."""
RESTORE_CALLS_IN_FLIGHT = 4
"""Restore messages sent to a node before the oldest must be acknowledged (bounds memory)."""
_STEP_DIR = re.compile(r"^step-(\d+)$")
_ASIDE = ".old-"
"""Infix of a finished checkpoint set aside while a rewrite of its step is renamed in."""
_ASIDE_DIR = re.compile(r"^step-(\d+)\.old-[0-9a-f]+$")


log = logging.getLogger(__name__)


class CheckpointError(NDPError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the run."""


@dataclass(frozen=True)
class TableChunk:
    """Rows [row_start, row_end) of a table: `records` float32 [n, D + S] (weights | state)."""

    table_name: str
    row_start: int
    row_end: int
    records: np.ndarray


@dataclass
class EngineState:
    """What an engine hands over at a step barrier (see `write_checkpoint`).

    `tables` is consumed lazily, chunk by chunk, so a large table is never held whole.
    """

    dense_model: dict[str, torch.Tensor]
    dense_optimizer: dict[str, Any]
    tables: Iterable[TableChunk]
    sparse_optimizer_step: int
    """The storage nodes' optimizer step counter (Adam bias correction)."""
    plan: dict | None = None


# --------------------------------------------------------------------------- writing


def write_checkpoint(root: str | Path, state: EngineState, *, next_step: int, cfg: Config) -> Path:
    """Write `state` as checkpoint `root/step-<next_step - 1>/`, atomically.

    Returns:
        The final checkpoint directory.
    """
    if next_step < 1:
        raise CheckpointError(f"a checkpoint needs at least one finished step (got {next_step})")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(next_step - 1)
    tmp = root / f"{final.name}.tmp-{secrets.token_hex(4)}"
    aside: Path | None = None
    tmp.mkdir()
    try:
        files: dict[str, str] = {}
        (tmp / "dense").mkdir()
        files["config.yaml"] = _write_bytes(tmp / "config.yaml", cfg.to_yaml().encode())
        files["plan.json"] = _write_bytes(
            tmp / "plan.json", json.dumps(state.plan, indent=1).encode()
        )
        files["rng.pt"] = _torch_save(tmp / "rng.pt", capture_rng_state())
        files["dense/model.pt"] = _torch_save(tmp / "dense" / "model.pt", state.dense_model)
        files["dense/optimizer.pt"] = _torch_save(
            tmp / "dense" / "optimizer.pt", state.dense_optimizer
        )
        tables: dict[str, list[dict]] = {}
        for chunk in state.tables:
            rel = f"tables/{_safe(chunk.table_name)}/{chunk.row_start}-{chunk.row_end}.npy"
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            records = np.ascontiguousarray(chunk.records, dtype=np.float32)
            assert records.shape[0] == chunk.row_end - chunk.row_start
            files[rel] = _write_npy(path, records)
            tables.setdefault(chunk.table_name, []).append(
                {"row_start": chunk.row_start, "row_end": chunk.row_end, "file": rel}
            )
        manifest = {
            "format": FORMAT,
            "next_step": next_step,
            "created_unix_s": time.time(),
            "sparse_optimizer": cfg.optimizer.sparse.name,
            "sparse_optimizer_step": state.sparse_optimizer_step,
            "tables": tables,
            "sha256": files,
        }
        manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
        _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        # every directory of the tree, deepest first (tables/ too, not only tables/<table>/)
        dirs = {d for rel in files for d in (tmp / rel).parents if d.is_relative_to(tmp)}
        for sub in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
            _fsync_dir(sub)
        if final.exists():  # the same step again (a replay after recovery): replace it,
            # never leaving a moment without a loadable copy of the step
            aside = root / f"{final.name}{_ASIDE}{secrets.token_hex(4)}"
            os.rename(final, aside)
            _fsync_dir(root)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        if aside is not None and aside.is_dir() and not final.exists():
            os.rename(aside, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def manifest_digest(manifest: dict) -> str:
    """sha256 of `manifest` as canonical JSON (sorted keys, no spaces), its digest left out.

    Canonical rather than the file's bytes because the digest is a field of the file it covers.
    """
    body = {key: value for key, value in manifest.items() if key != MANIFEST_DIGEST}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def read_manifest(checkpoint_dir: Path) -> dict:
    """The verified manifest of `checkpoint_dir` (the digest checked, not yet its files).

    Raises:
        CheckpointError: missing, not JSON, of another format, failing its digest, or lacking
            a field; the message names the manifest file.
    """
    path = checkpoint_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint_dir} is not an ndp checkpoint (no {MANIFEST}); pass a step-<n> "
            "directory or the checkpoint dir that holds them"
        )
    try:
        manifest = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"checkpoint manifest {path} does not parse ({exc.msg} at line {exc.lineno} column "
            f"{exc.colno}): it is truncated or damaged; resume from another checkpoint"
        ) from None
    except UnicodeDecodeError:
        raise CheckpointError(
            f"checkpoint manifest {path} is not text: it is damaged; resume from another checkpoint"
        ) from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint manifest {path} is not a JSON object: it is damaged")
    found_format = manifest.get("format")
    if found_format == UNVERIFIED_FORMAT:
        log.warning(
            "checkpoint manifest %s predates manifest digests (%s): its files are checked, "
            "the manifest itself (next_step, tables) cannot be",
            path,
            UNVERIFIED_FORMAT,
        )
    elif found_format != FORMAT:
        raise CheckpointError(
            f"checkpoint manifest {path}: format {found_format!r} is not {FORMAT}"
        )
    elif manifest.get(MANIFEST_DIGEST) != manifest_digest(manifest):
        raise CheckpointError(
            f"checkpoint manifest {path} fails its digest check ({MANIFEST_DIGEST}): it was "
            "edited or damaged after it was written; resume from another checkpoint"
        )
    for field, kind in _MANIFEST_FIELDS.items():
        value = manifest.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(
                f"checkpoint manifest {path}: {field!r} is missing or not a JSON "
                f"{'integer' if kind is int else kind.__name__}; the manifest is damaged"
            )
    return manifest


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _write_bytes(path: Path, payload: bytes) -> str:
    with open(path, "wb") as out:
        out.write(payload)
        out.flush()
        os.fsync(out.fileno())
    return hashlib.sha256(payload).hexdigest()


def _torch_save(path: Path, obj: Any) -> str:
    with open(path, "wb") as out:
        torch.save(obj, out)
        out.flush()
        os.fsync(out.fileno())
    return sha256_file(path)


def _write_npy(path: Path, records: np.ndarray) -> str:
    with open(path, "wb") as out:
        np.save(out, records)
        out.flush()
        os.fsync(out.fileno())
    return sha256_file(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fin:
        while block := fin.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """torch, numpy and python `random` states of this process."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# --------------------------------------------------------------------------- finding, retention


def list_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoints under `root`, oldest first (temporary directories excluded).

    A step whose `step-<s>/` is missing but whose set-aside copy `step-<s>.old-*/` is whole (a
    rewrite crashed between its two renames) is listed as that copy.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    finished: dict[int, Path] = {}
    set_aside: dict[int, Path] = {}
    for path in sorted(root.iterdir()):
        if not (path.is_dir() and (path / MANIFEST).is_file()):
            continue
        if match := _STEP_DIR.match(path.name):
            finished[int(match.group(1))] = path
        elif match := _ASIDE_DIR.match(path.name):
            set_aside.setdefault(int(match.group(1)), path)
    found = {**set_aside, **finished}
    return [found[step] for step in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_partial_checkpoints(root: str | Path) -> list[Path]:
    """Clean up after an interrupted write; returns the directories deleted.

    Deletes `step-*.tmp-*` directories; renames a set-aside `step-<s>.old-*/` back to
    `step-<s>/` when that is missing (the rewrite died between its renames), else deletes it.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    partial = [p for p in root.iterdir() if p.is_dir() and ".tmp-" in p.name]
    for path in sorted(p for p in root.iterdir() if p.is_dir() and _ASIDE_DIR.match(p.name)):
        final = root / step_dir_name(int(_ASIDE_DIR.match(path.name).group(1)))
        if not final.exists() and (path / MANIFEST).is_file():
            os.rename(path, final)
            _fsync_dir(root)
        else:
            partial.append(path)
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints; returns the deleted ones."""
    old = list_checkpoints(root)[:-keep_last]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


# --------------------------------------------------------------------------- reading


class Checkpoint:
    """A verified checkpoint directory (the manifest's digest and every file's sha256 checked
    on open)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        for rel, digest in self.manifest["sha256"].items():
            file = self.path / rel
            if not file.is_file():
                raise CheckpointError(f"checkpoint {self.path} lacks {rel}; it is incomplete")
            if sha256_file(file) != digest:
                raise CheckpointError(f"checkpoint file {file} is corrupt (sha256 mismatch)")

    @property
    def next_step(self) -> int:
        return int(self.manifest["next_step"])

    @property
    def sparse_optimizer_step(self) -> int:
        return int(self.manifest["sparse_optimizer_step"])

    def dense_model(self) -> dict[str, torch.Tensor]:
        return torch.load(self.path / "dense" / "model.pt", weights_only=True)

    def dense_optimizer(self) -> dict[str, Any]:
        return torch.load(self.path / "dense" / "optimizer.pt", weights_only=True)

    def rng_state(self) -> dict[str, Any]:
        # numpy's and python's states are tuples of plain types; the file's sha256 is checked.
        return torch.load(self.path / "rng.pt", weights_only=False)

    def plan(self) -> dict | None:
        return json.loads((self.path / "plan.json").read_text())

    def config_yaml(self) -> str:
        return (self.path / "config.yaml").read_text()

    def check_fits(self, cfg: Config) -> None:
        """Fail if the run's tables or sparse optimizer differ from the checkpoint's."""
        if self.manifest["sparse_optimizer"] != cfg.optimizer.sparse.name:
            raise CheckpointError(
                f"checkpoint {self.path} was written with optimizer.sparse.name="
                f"{self.manifest['sparse_optimizer']!r}; this run uses "
                f"{cfg.optimizer.sparse.name!r} (set it to match)"
            )
        for table in cfg.model.effective_tables():
            covered = sum(c["row_end"] - c["row_start"] for c in self._chunks(table.name))
            if covered != table.num_rows:
                raise CheckpointError(
                    f"checkpoint {self.path} holds {covered} rows of table {table.name!r}; the "
                    f"run's config has {table.num_rows} (model.tables / max_rows_per_table "
                    "must match the checkpoint's)"
                )

    def _chunks(self, table_name: str) -> list[dict]:
        return sorted(self.manifest["tables"].get(table_name, []), key=lambda c: c["row_start"])

    def table_records(self, table_name: str, row_start: int, row_end: int) -> np.ndarray:
        """Records float32 [row_end - row_start, D + S] of global rows, from the chunks."""
        parts = []
        for chunk in self._chunks(table_name):
            lo, hi = max(row_start, chunk["row_start"]), min(row_end, chunk["row_end"])
            if lo >= hi:
                continue
            records = np.load(self.path / chunk["file"], mmap_mode="r")
            parts.append(np.asarray(records[lo - chunk["row_start"] : hi - chunk["row_start"]]))
        out = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        if out.shape[0] != row_end - row_start:
            raise CheckpointError(
                f"checkpoint {self.path} does not cover rows [{row_start}, {row_end}) of "
                f"table {table_name!r}"
            )
        return out


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """`path` is a checkpoint (`step-<n>/`) or a directory of them.

    A checkpoint that fails verification is refused. In a directory of them the newest intact
    one is taken: each newer one that fails is skipped with a warning naming it and why, so
    a damaged last checkpoint costs the steps since the one before, never a wrong resume.

    Raises:
        CheckpointError: no checkpoint there, `path` is a broken one, or every one is broken.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        return Checkpoint(path)
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"no checkpoint in {path}: it holds no finished step-<n>/ directory (train with "
            "checkpoint.enabled=true, or pass --resume PATH to a checkpoint)"
        )
    refusals: list[str] = []
    for candidate in reversed(found):
        try:
            checkpoint = Checkpoint(candidate)
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", candidate.name, exc)
            refusals.append(str(exc))
            continue
        if refusals:
            log.warning(
                "resuming from %s, the newest intact checkpoint in %s (%d newer one(s) skipped)",
                candidate.name,
                path,
                len(refusals),
            )
        return checkpoint
    raise CheckpointError(
        f"no intact checkpoint in {path}: all {len(found)} fail verification; the newest: "
        f"{refusals[0]}"
    )


# --------------------------------------------------------------------------- schedule


class CheckpointSchedule:
    """When to checkpoint: every `interval_steps`, every `interval_minutes`, and at the end.

    Args:
        cfg: the run's config (`checkpoint` section).
        root: where checkpoints go.
        clock: seconds (monotonic); injectable so tests control minutes without waiting.
    """

    def __init__(self, cfg: Config, root: str | Path, *, clock: Any = time.monotonic) -> None:
        self.cfg = cfg
        self.section = cfg.checkpoint
        self.root = Path(root)
        self._clock = clock
        self._last_time = clock()
        self.last_saved_step: int | None = None
        remove_partial_checkpoints(self.root)

    def due(self, steps_done: int) -> bool:
        if not self.section.enabled or steps_done == self.last_saved_step:
            return False
        every = self.section.interval_steps
        if every is not None and steps_done % every == 0:
            return True
        minutes = self.section.interval_minutes
        return minutes is not None and self._clock() - self._last_time >= 60.0 * minutes

    def save(self, engine: Any, steps_done: int) -> Path:
        """Write a checkpoint of `engine` after `steps_done` steps, then apply retention."""
        path = write_checkpoint(
            self.root, engine.export_state(), next_step=steps_done, cfg=self.cfg
        )
        self.last_saved_step = steps_done
        self._last_time = self._clock()
        prune_checkpoints(self.root, self.section.keep_last)
        return path

    def maybe_save(self, engine: Any, steps_done: int) -> Path | None:
        return self.save(engine, steps_done) if self.due(steps_done) else None


def checkpoint_root(cfg: Config, run_dir: str | Path) -> Path:
    """`checkpoint.dir`, else `<run_dir>/checkpoints`."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(run_dir) / "checkpoints"


def chunk_ranges(
    row_start: int, row_end: int, chunk_rows: int = CHUNK_ROWS
) -> Iterator[tuple[int, int]]:
    """[row_start, row_end) cut into consecutive ranges of at most `chunk_rows` rows."""
    for lo in range(row_start, row_end, chunk_rows):
        yield lo, min(lo + chunk_rows, row_end)


# --------------------------------------------------------------------------- storage nodes


def node_restore_header(
    checkpoint: Checkpoint, shards: list[ShardSpec], cfg: Config
) -> RestoreHeader:
    """The `RestoreHeader` that opens the stream of a node's pieces (any plan's pieces)."""
    from storage_node.restore import RestoreHeader

    return RestoreHeader(
        applied_step=checkpoint.next_step - 1,
        optimizer_step=checkpoint.sparse_optimizer_step,
        optimizer=cfg.optimizer.sparse.name,
        shards=tuple(shards),
    )


def node_restore_rows(
    checkpoint: Checkpoint, header: RestoreHeader, *, chunk_bytes: int = RESTORE_CHUNK_BYTES
) -> Iterator[TableChunk]:
    """The rows of `header.shards`, piece by piece in order, in chunks of at most
    `chunk_bytes` of records (at least one row each).

    The rows are sliced from the checkpoint's global-row chunks, so the node count may differ
    from the one saved; one chunk is read at a time, so memory stays bounded.
    """
    from ndp.model.spec import row_bytes

    for spec in header.shards:
        rows_per_chunk = max(1, chunk_bytes // row_bytes(header.optimizer, spec.embedding_dim))
        for lo, hi in chunk_ranges(spec.row_start, spec.row_end, rows_per_chunk):
            records = checkpoint.table_records(spec.table_name, lo, hi)
            yield TableChunk(spec.table_name, lo, hi, records)
