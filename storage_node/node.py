"""`StorageNodeCore`: the pure core of one emulated computational storage device.

A node holds one piece (`ShardSpec`) of each of several tables. Each piece is a flash file
(`flash.FlashStore`) behind a DRAM row cache (`cache.RowCache`); the node's cache budget is
split between pieces by their expected lookups, none getting more than holds all its rows
(`cache.split_budget`). The node answers pooled lookups and applies the sparse optimizer
near the data, in step order:

1. ``lookup(step, worker, bags)`` (training) waits until ``applied_step == step - 1``, pools
   the rows and records the bags of (step, worker) so the gradient can be scattered later.
2. ``push_gradients(step, worker, grads)`` turns d(loss)/d(pooled) into per-occurrence row
   gradients (mean pooling divides by the bag length, per-sample weights multiply).
3. When all `num_workers` workers pushed, the gradients of the step are concatenated,
   duplicates merged (``unique`` + ``index_add``), the optimizer applied to each unique row
   once, ``applied_step = step``, rows pinned by ``prefetch(step)`` are released, and waiters
   are woken.

Early pooling (the lookahead's second stage, see `ndp.pipeline`): ``early_lookup(step,
worker, bags)`` pools a future step's bags with the current rows and keeps the pooled vectors.
Every update applied before that step's lookup adds its exact change to them (for the rows the
update touched: ``pooled[b] += scale_b * sum_r weight_b,r * (w_new[r] - w_old[r])``), so the
training ``lookup`` of the step answers the kept vectors without pooling, equal to pooling
then up to float rounding. With ``correct=False`` (``pipeline.mode = "stale"``) the kept
vectors are not corrected: the step sees rows one update old.

Every request is validated completely before anything changes, so a rejected request
(unknown feature, index out of range, bad tensor, wrong step) leaves no trace. One lock
serialises all state changes; ``wait_for_step`` waits on a condition of that lock, so several
gRPC threads can call in at once.

Checkpoints are a directory holding, per node, ``<node_id>.manifest.json`` and one copy of
each shard file (``<node_id>.<table>.<start>-<end>.shard``, sha256 in the manifest), each
written to a temporary name and renamed, manifest last. Nodes may share a directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import threading
import time
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ndp.config import SparseOptimizerConfig, StorageConfig
from ndp.errors import StorageNodeError
from ndp.model.spec import optimizer_state_width
from storage_node.cache import SLOT_METADATA_BYTES, RowCache, distinct_below, split_budget
from storage_node.errors import (
    BadTensorError,
    EarlyPoolMissingError,
    IndexOutOfRangeError,
    ShardFileError,
    StepOrderError,
    UnknownFeatureError,
)
from storage_node.flash import DetachedRead, FlashStore
from storage_node.optimizers import apply_update
from storage_node.spec import Bags, ShardSpec
from storage_node.stats import CacheCounters, add_counters, summarize

CHECKPOINT_FORMAT = "ndp-storage-node-checkpoint/1"
_COPY_CHUNK_BYTES = 8 << 20


@dataclass
class _Piece:
    """One table piece on this node: flash file + cache."""

    spec: ShardSpec
    flash: FlashStore
    cache: RowCache

    @property
    def num_rows(self) -> int:
        return self.spec.row_end - self.spec.row_start


@dataclass
class _RecordedBags:
    """What a push needs from the lookup of one feature: which row each value hit, how scaled.

    Why lazy: the per-value bag ids and scales are only needed when the gradient arrives, so
    the lookup (on the critical path of the forward pass) stores the bags as they came and
    `bag_of_value` / `scale` are derived at push time.
    """

    rows: torch.Tensor
    """int64 [nnz] local rows."""
    offsets: torch.Tensor
    """int64 [B + 1] bag boundaries."""
    weights: torch.Tensor | None
    """float32 [nnz] per-sample weights, None = 1."""
    inv_divisor: torch.Tensor | None
    """float32 [B] 1 / bag divisor for mean pooling, None for sum pooling."""
    batch_size: int
    _bag_of_value: torch.Tensor | None = field(default=None, repr=False)

    def bag_of_value(self) -> torch.Tensor:
        """int64 [nnz] bag (sample) of each value (computed once: every correction of an early
        pool and the push of its step need it)."""
        if self._bag_of_value is None:
            lengths = self.offsets[1:] - self.offsets[:-1]
            self._bag_of_value = torch.repeat_interleave(torch.arange(self.batch_size), lengths)
        return self._bag_of_value

    def scale(self, bag_of_value: torch.Tensor) -> torch.Tensor | None:
        """float32 [nnz] per-value gradient factor (weights, 1/length), None = 1."""
        if self.inv_divisor is None:
            return self.weights
        inv = self.inv_divisor[bag_of_value]
        return inv if self.weights is None else self.weights * inv


@dataclass
class _UpdatedRows:
    """The distinct rows one table's update changes, and where any row sits among them.

    Why a dense map when the piece is small next to the update (a multi-hot update is ~20k
    values per table): `torch.unique` with inverse and a binary search per correction took
    ~1.2 ms per table per step there; an array over the piece's rows answers both with one
    gather. Large pieces keep the sort (an array per row would cost more than it saves).
    """

    rows: torch.Tensor
    """int64 [u] sorted distinct local rows."""
    inverse: torch.Tensor
    """int64 [n]: the position in `rows` of each input row."""
    _position_of_row: np.ndarray | None
    """int64 [piece rows]: position in `rows`, -1 if not updated (dense case only)."""

    @classmethod
    def of(cls, rows: torch.Tensor, num_rows: int) -> _UpdatedRows:
        """`rows`: int64 [n] local rows in [0, num_rows), repeats allowed."""
        if num_rows > 8 * rows.numel():
            unique, inverse = torch.unique(rows, return_inverse=True)
            return cls(unique, inverse, None)
        values = rows.numpy()
        unique = distinct_below(values, num_rows)
        position_of_row = np.full(num_rows, -1, dtype=np.int64)
        position_of_row[unique] = np.arange(unique.size)
        return cls(
            torch.from_numpy(unique), torch.from_numpy(position_of_row[values]), position_of_row
        )

    def find(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bool [n]: which of `values` were updated, int64 [hits]: their positions in `rows`)."""
        if self._position_of_row is not None:
            position = torch.from_numpy(self._position_of_row[values.numpy()])
            hit = position >= 0
            return hit, position[hit]
        # one binary search finds both whether each value was updated and where
        position = torch.searchsorted(self.rows, values).clamp_(max=self.rows.numel() - 1)
        hit = self.rows[position] == values
        return hit, position[hit]


@dataclass
class _StagingPlan:
    """One piece's share of a prefetch: rows to pin, and those read from flash unlocked."""

    piece: _Piece
    flash: FlashStore
    rows: np.ndarray
    missing: np.ndarray
    reader: DetachedRead | None
    records: np.ndarray | None = None


@dataclass
class _PendingStep:
    """Lookups and pushes collected for the step that is applied next."""

    lookups: dict[int, dict[str, _RecordedBags]] = field(default_factory=dict)
    pushed: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


@dataclass
class _EarlyPool:
    """One (step, worker)'s bags pooled before their step's turn, kept until its lookup."""

    bags: dict[str, tuple[_Piece, Bags]]
    """The validated bags as they came (the lookup must send the same ones to use them)."""
    pooled: dict[str, torch.Tensor]
    """float32 [B, D] per feature, corrected for every update applied since pooling."""
    recorded: dict[str, _RecordedBags]
    correct: bool
    """False (stale mode): updates applied after pooling are not added."""


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat`, without its copy when there is one part (one feature per table, one
    worker: the common case, megabytes per step with multi-hot bags)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _expected_lookups(shards: list[ShardSpec]) -> list[float]:
    """Each piece's expected lookups per step: the planner's figures when every piece has
    one, else one lookup per feature and sample spread evenly over the table's rows."""
    if all(s.expected_lookups > 0 for s in shards):
        return [s.expected_lookups for s in shards]
    return [len(s.features) * (s.row_end - s.row_start) / s.table_num_rows for s in shards]


def _file_stem(node_id: str, spec: ShardSpec) -> str:
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
        directory / _file_stem(node_id, spec),
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


def _copy_with_sha256(src: Path, dst: Path) -> str:
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


def _stage_file(src: Path, target: Path, sha256: str, *, move: bool) -> None:
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
    digest = _copy_with_sha256(src, target)
    if digest != sha256:
        raise ShardFileError(
            f"checkpoint file {src} changed after it was verified (sha256 mismatch)"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fin:
        while chunk := fin.read(_COPY_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class StorageNodeCore:
    """Sharded embedding tables with tiered storage and near-data optimizers (thread-safe)."""

    def __init__(
        self,
        *,
        node_id: str,
        shards: list[ShardSpec],
        storage: StorageConfig,
        optimizer: SparseOptimizerConfig,
        seed: int,
        num_workers: int = 1,
        flash_dir: str | Path,
    ) -> None:
        if num_workers < 1:
            raise StorageNodeError(f"num_workers={num_workers} must be >= 1")
        self.node_id = node_id
        self.storage = storage
        self.optimizer = optimizer
        self.seed = seed
        self.num_workers = num_workers
        self.flash_dir = Path(flash_dir)
        self.applied_step = -1
        self.optimizer_step = 0
        """Updates applied so far: FBGEMM's iteration counter (Adam bias correction)."""
        self.update_seconds = 0.0
        """Wall seconds spent applying updates (merge, optimizer, write-back, corrections)."""
        self.lookup_seconds = 0.0
        """Wall seconds spent answering lookups once their step was ready (checks, pooling)."""
        self.lookup_calls = 0
        self._lock = threading.RLock()
        self._step_applied = threading.Condition(self._lock)
        self._pending: dict[int, _PendingStep] = {}
        self._pins: dict[int, list[tuple[_Piece, np.ndarray]]] = {}
        self._early: dict[tuple[int, int], _EarlyPool] = {}
        self.early_counters = {
            "early_pools": 0,
            "early_hits": 0,
            "early_hits_without_bags": 0,
            "early_mismatches": 0,
        }
        """Early pools kept; answered by a lookup (of them: by a `lookup_early` that sent no
        bags); dropped because the lookup's bags differed."""
        self._closed = False
        self._pieces: dict[str, _Piece] = {}
        self._piece_of_feature: dict[str, _Piece] = {}
        self._validate_shards(shards)
        budgets = split_budget(
            storage.cache_bytes,
            [
                (s.row_end - s.row_start) * (self._row_bytes(s.embedding_dim) + SLOT_METADATA_BYTES)
                for s in shards
            ],
            _expected_lookups(shards),
        )
        threads = min(storage.update_threads, len(shards))
        self._update_threads = (
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ndp-update")
            if threads > 1
            else None
        )
        for spec, cache_bytes in zip(shards, budgets, strict=True):
            piece = self._open_piece(spec, cache_bytes=cache_bytes)
            self._pieces[spec.table_name] = piece
            for feature in spec.features:
                self._piece_of_feature[feature] = piece

    # ------------------------------------------------------------------ construction

    def _row_bytes(self, dim: int) -> int:
        return 4 * (dim + optimizer_state_width(self.optimizer.name, dim))

    @staticmethod
    def _validate_shards(shards: list[ShardSpec]) -> None:
        if not shards:
            raise StorageNodeError("a storage node needs at least one shard")
        tables: set[str] = set()
        features: set[str] = set()
        for spec in shards:
            if spec.table_name in tables:
                raise StorageNodeError(
                    f"table {spec.table_name!r} has two pieces on one node; a node holds at "
                    "most one piece per table (merge the row ranges in the plan)"
                )
            tables.add(spec.table_name)
            if not 0 <= spec.row_start < spec.row_end <= spec.table_num_rows:
                raise StorageNodeError(
                    f"table {spec.table_name!r}: rows [{spec.row_start}, {spec.row_end}) are not "
                    f"a non-empty range inside [0, {spec.table_num_rows})"
                )
            if spec.embedding_dim <= 0:
                raise StorageNodeError(f"table {spec.table_name!r}: embedding_dim must be > 0")
            for feature in spec.features:
                if feature in features:
                    raise StorageNodeError(
                        f"feature {feature!r} is mapped to two tables on this node"
                    )
                features.add(feature)

    def _open_flash(self, spec: ShardSpec) -> FlashStore:
        return open_shard_file(
            self.flash_dir,
            self.node_id,
            spec,
            optimizer=self.optimizer.name,
            seed=self.seed,
            storage=self.storage,
        )

    def _open_piece(self, spec: ShardSpec, *, cache_bytes: int) -> _Piece:
        flash = self._open_flash(spec)
        cache = RowCache(
            flash,
            capacity_bytes=cache_bytes,
            policy=self.storage.cache_policy,
            hot_fraction=self.storage.hot_fraction,
            counters=CacheCounters(),
        )
        return _Piece(spec=spec, flash=flash, cache=cache)

    # ------------------------------------------------------------------ validation

    def _piece_for(self, feature: str) -> _Piece:
        piece = self._piece_of_feature.get(feature)
        if piece is None:
            served = ", ".join(sorted(self._piece_of_feature)) or "none"
            raise UnknownFeatureError(
                f"node {self.node_id!r} does not serve feature {feature!r}; it serves: {served}"
            )
        return piece

    @staticmethod
    def _int_vector(tensor: object, what: str) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1:
            raise BadTensorError(f"{what} must be a 1-D integer tensor")
        if tensor.dtype not in (torch.int64, torch.int32):
            raise BadTensorError(f"{what} has dtype {tensor.dtype}; use int64 (or int32)")
        return tensor.to(torch.int64)

    def _check_range(self, piece: _Piece, feature: str, indices: torch.Tensor) -> None:
        if indices.numel() == 0:
            return
        bad = (indices < 0) | (indices >= piece.num_rows)
        if bool(bad.any()):
            value = int(indices[bad][0])
            spec = piece.spec
            raise IndexOutOfRangeError(
                f"table {spec.table_name!r}, feature {feature!r}: index {value} is outside "
                f"[0, {piece.num_rows}), the local rows of this piece (global rows "
                f"[{spec.row_start}, {spec.row_end}) of {spec.table_num_rows}); the value "
                f"as a global row would be {value + spec.row_start}"
            )

    def _validated_bags(self, feature: str, bags: Bags) -> tuple[_Piece, Bags]:
        """Checked and normalised (int64 indices/offsets, float32 weights) copy of `bags`."""
        piece = self._piece_for(feature)
        indices = self._int_vector(bags.indices, f"feature {feature!r}: indices")
        offsets = self._int_vector(bags.offsets, f"feature {feature!r}: offsets")
        nnz = indices.numel()
        if offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != nnz:
            raise BadTensorError(
                f"feature {feature!r}: offsets must have B + 1 entries from 0 to len(indices)={nnz}"
            )
        if bool((offsets[1:] < offsets[:-1]).any()):
            raise BadTensorError(f"feature {feature!r}: offsets must be non-decreasing")
        batch = offsets.numel() - 1
        weights = bags.per_sample_weights
        if weights is not None:
            if not isinstance(weights, torch.Tensor) or weights.shape != (nnz,):
                raise BadTensorError(
                    f"feature {feature!r}: per_sample_weights must be a float tensor [{nnz}]"
                )
            weights = weights.to(torch.float32)
        divisor = bags.mean_divisor
        if divisor is not None:
            if not isinstance(divisor, torch.Tensor) or divisor.shape != (batch,):
                raise BadTensorError(
                    f"feature {feature!r}: mean_divisor must be a float tensor [{batch}]"
                )
            divisor = divisor.to(torch.float32)
        self._check_range(piece, feature, indices)
        return piece, Bags(indices, offsets, weights, divisor)

    def _check_worker(self, worker: int) -> None:
        if not 0 <= worker < self.num_workers:
            raise BadTensorError(
                f"worker {worker} is outside 0..{self.num_workers - 1} "
                f"(this node was started for {self.num_workers} workers)"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise StorageNodeError(f"storage node {self.node_id!r} is closed")

    # ------------------------------------------------------------------ steps

    def wait_for_step(self, step: int, timeout_s: float, *, training: bool = True) -> None:
        """Block until the update of `step - 1` is applied (so step's inputs are final).

        Args:
            training: a training lookup, which must come before `step`'s own update; an
                evaluation lookup (False) only needs rows no older than `step - 1`, so later
                updates landing while it waited are fine.

        Raises:
            StepOrderError: (training) `step` was already applied, or the wait timed out.
        """
        with self._step_applied:
            if not self._step_applied.wait_for(
                lambda: self.applied_step >= step - 1, timeout=timeout_s
            ):
                raise StepOrderError(
                    f"timed out after {timeout_s}s waiting for step {step - 1} to be applied "
                    f"(node {self.node_id!r} has applied step {self.applied_step}; are all "
                    f"{self.num_workers} workers pushing gradients?)"
                )
            if training and self.applied_step >= step:
                raise StepOrderError(
                    f"step {step} is already applied on node {self.node_id!r} "
                    f"(applied_step={self.applied_step}); a training lookup must be for step "
                    f"{self.applied_step + 1} or later"
                )

    # ------------------------------------------------------------------ lookup

    def lookup(
        self, step: int, worker: int, bags: dict[str, Bags], *, train: bool = True
    ) -> dict[str, torch.Tensor]:
        """Pooled vectors per feature: float32 [B, D].

        With `train`, waits for `applied_step == step - 1` (up to
        `storage.step_wait_timeout_s`) and records the bags for the push of (step, worker);
        `train=False` pools the current rows and records nothing.
        """
        with self._lock:
            self._check_open()
            self._check_worker(worker)
            started = time.perf_counter()
            checked = {f: self._validated_bags(f, b) for f, b in bags.items()}
            busy = time.perf_counter() - started  # the wait for the step is not lookup work
            if train:
                self.wait_for_step(step, self.storage.step_wait_timeout_s)
            started = time.perf_counter()
            early = self._take_early(step, worker, checked) if train else None
            if early is not None:
                pooled, recorded = early.pooled, early.recorded
            else:
                pooled, recorded = {}, {}
                for feature, (piece, fbags) in checked.items():
                    pooled[feature], recorded[feature] = self._pool(piece, fbags)
            if train:
                pending = self._pending.setdefault(step, _PendingStep())
                pending.lookups.setdefault(worker, {}).update(recorded)
            self.lookup_seconds += busy + time.perf_counter() - started
            self.lookup_calls += 1
            return pooled

    def lookup_early(self, step: int, worker: int) -> dict[str, torch.Tensor]:
        """The training lookup of (step, worker) answered from its kept early pool.

        Why without bags: the worker sent exactly these bags in its `early_lookup` of this
        step (and checked that they are the step's), so sending, decoding, validating and
        comparing them again is pure overhead on the critical path.

        Raises:
            EarlyPoolMissingError: no early pool of (step, worker) is kept (never pooled, or
                dropped by `write_rows`/`restore`); send the bags with `lookup` instead.
        """
        with self._lock:
            self._check_open()
            self._check_worker(worker)
            self.wait_for_step(step, self.storage.step_wait_timeout_s)
            early = self._early.pop((step, worker), None)
            if early is None:
                raise EarlyPoolMissingError(
                    f"node {self.node_id!r} keeps no early pool of step {step} for worker "
                    f"{worker}; send the lookup with its bags"
                )
            self.early_counters["early_hits"] += 1
            self.early_counters["early_hits_without_bags"] += 1
            pending = self._pending.setdefault(step, _PendingStep())
            pending.lookups.setdefault(worker, {}).update(early.recorded)
            return early.pooled

    def early_lookup(
        self, step: int, worker: int, bags: dict[str, Bags], *, correct: bool = True
    ) -> bool:
        """Pool the training bags of a future `step` now, to answer its lookup without pooling.

        Does not wait for the step barrier: the rows are read as they are now, and each update
        applied before `step`'s lookup adds its change to the kept vectors (unless `correct`
        is False: stale mode). A later early lookup of the same (step, worker) replaces it.

        Returns:
            True when kept; False when `step` is already applied (nothing to do).
        """
        with self._lock:
            self._check_open()
            self._check_worker(worker)
            checked = {f: self._validated_bags(f, b) for f, b in bags.items()}
            if step <= self.applied_step:
                return False
            pooled: dict[str, torch.Tensor] = {}
            recorded: dict[str, _RecordedBags] = {}
            for feature, (piece, fbags) in checked.items():
                pooled[feature], recorded[feature] = self._pool(piece, fbags)
            self._early[(step, worker)] = _EarlyPool(checked, pooled, recorded, correct)
            self.early_counters["early_pools"] += 1
            return True

    def _take_early(
        self, step: int, worker: int, checked: dict[str, tuple[_Piece, Bags]]
    ) -> _EarlyPool | None:
        """The early pool of (step, worker) if its bags are the lookup's; dropped either way."""
        early = self._early.pop((step, worker), None)
        if early is None:
            return None
        same = early.bags.keys() == checked.keys() and all(
            early.bags[f][1].same_as(checked[f][1]) for f in checked
        )
        self.early_counters["early_hits" if same else "early_mismatches"] += 1
        return early if same else None

    def _correct_early_pools(self, table: str, updated: _UpdatedRows, delta: torch.Tensor) -> None:
        """Add one table's update to every kept early pool (exact mode) that reads its rows.

        Args:
            updated: the local rows the update changed.
            delta: float32 [u, D] new minus old weights of those rows (in `updated.rows` order).
        """
        for early in self._early.values():
            if not early.correct:
                continue
            for feature, (piece, bags) in early.bags.items():
                if piece.spec.table_name != table or bags.indices.numel() == 0:
                    continue
                hit, position = updated.find(bags.indices)
                if position.numel() == 0:
                    continue
                rec = early.recorded[feature]
                bag_of_value = rec.bag_of_value()
                change = delta[position]
                scale = rec.scale(bag_of_value)  # weights x 1/divisor, as the pooling used
                if scale is not None:
                    change = change * scale[hit][:, None]
                early.pooled[feature].index_add_(0, bag_of_value[hit], change)

    def _pool(self, piece: _Piece, bags: Bags) -> tuple[torch.Tensor, _RecordedBags]:
        """Pool one feature's bags.

        Fast path (every requested row cache-resident): `embedding_bag` straight over the
        cache's slot records with slot ids, so no unique rows are copied out. Otherwise the
        unique rows are fetched (misses read from flash, admitted per policy) and pooled.
        """
        dim = piece.spec.embedding_dim
        batch = bags.offsets.numel() - 1
        cache = piece.cache
        pooled: torch.Tensor | None = None
        if bags.indices.numel() == 0:
            pooled = torch.zeros(batch, dim, dtype=torch.float32)
        else:
            slots = cache.resident_slots(bags.indices.numpy())
            if slots is not None:
                # Pool the whole record width: a column slice of the slot tensor would make
                # embedding_bag copy the entire cache; the extra state columns are dropped.
                pooled = F.embedding_bag(
                    torch.from_numpy(slots),
                    torch.from_numpy(cache.records),
                    bags.offsets,
                    mode="sum",
                    per_sample_weights=bags.per_sample_weights,
                    include_last_offset=True,
                )
                if pooled.shape[1] != dim:
                    pooled = pooled[:, :dim].contiguous()
        if pooled is None:
            unique_rows, inverse = torch.unique(bags.indices, return_inverse=True)
            records = cache.fetch(unique_rows.numpy())
            pooled = F.embedding_bag(
                inverse,
                torch.from_numpy(records[:, :dim]),
                bags.offsets,
                mode="sum",
                per_sample_weights=bags.per_sample_weights,
                include_last_offset=True,
            )
        inv = None
        if piece.spec.pooling == "mean":
            if bags.mean_divisor is None:
                divisor = (bags.offsets[1:] - bags.offsets[:-1]).to(torch.float32)
            else:
                divisor = bags.mean_divisor
            inv = 1.0 / divisor.clamp(min=1.0)
            pooled = pooled * inv[:, None]
        recorded = _RecordedBags(bags.indices, bags.offsets, bags.per_sample_weights, inv, batch)
        return pooled, recorded

    # ------------------------------------------------------------------ push / update

    def push_gradients(self, step: int, worker: int, grads: dict[str, torch.Tensor]) -> bool:
        """Accept d(loss)/d(pooled) [B, D] per feature of (step, worker).

        Returns:
            True when the step's update is applied (by this push, or earlier: a repeated push
            of an applied step is acknowledged without effect); False while other workers'
            pushes for the step are still missing (a repeated push here is also ignored).
        """
        with self._lock:
            self._check_open()
            self._check_worker(worker)
            if step <= self.applied_step:
                return True
            if step != self.applied_step + 1:
                raise StepOrderError(
                    f"push for step {step} arrived but node {self.node_id!r} applies step "
                    f"{self.applied_step + 1} next; steps are applied in order"
                )
            pending = self._pending.get(step)
            recorded = None if pending is None else pending.lookups.get(worker)
            if recorded is None:
                raise StepOrderError(
                    f"push for step {step} from worker {worker} without a training lookup of "
                    "that step on this node; call lookup(step, worker, ..., train=True) first"
                )
            if worker in pending.pushed:
                return False
            row_grads = self._row_gradients(recorded, grads)
            pending.pushed[worker] = row_grads
            if len(pending.pushed) < self.num_workers:
                return False
            started = time.perf_counter()
            self._apply_step(step, pending)
            self.update_seconds += time.perf_counter() - started
            return True

    def _row_gradients(
        self, recorded: dict[str, _RecordedBags], grads: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per table: (local rows [n], per-occurrence gradients [n, D]); validates first."""
        missing = sorted(set(recorded) - set(grads))
        if missing:
            raise BadTensorError(f"gradients missing for looked-up features: {missing}")
        for feature, grad in grads.items():
            if feature not in recorded:
                self._piece_for(feature)  # unknown feature -> UnknownFeatureError
                raise BadTensorError(
                    f"gradient for feature {feature!r}, which this worker did not look up"
                )
            dim = self._piece_of_feature[feature].spec.embedding_dim
            expected = (recorded[feature].batch_size, dim)
            if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
                raise BadTensorError(f"gradient for feature {feature!r} must be a float tensor")
            if tuple(grad.shape) != expected:
                raise BadTensorError(
                    f"gradient for feature {feature!r} has shape {tuple(grad.shape)}, "
                    f"expected {expected} (batch, dim)"
                )
            if not bool(torch.isfinite(grad).all()):
                raise BadTensorError(f"gradient for feature {feature!r} contains NaN or Inf")
        per_table: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for feature, rec in recorded.items():
            bag_of_value = rec.bag_of_value()
            values = grads[feature].to(torch.float32)[bag_of_value]
            scale = rec.scale(bag_of_value)
            if scale is not None:
                values = values * scale[:, None]
            table = self._piece_of_feature[feature].spec.table_name
            per_table.setdefault(table, []).append((rec.rows, values))
        return {
            table: (_joined([r for r, _ in parts]), _joined([g for _, g in parts]))
            for table, parts in per_table.items()
        }

    def _apply_step(self, step: int, pending: _PendingStep) -> None:
        """Sum all workers' gradients, merge duplicates, update each unique row once.

        Tables update `storage.update_threads` at a time, under the caller's lock: each is its own
        flash file and touches only its own cache and its features' early pools, and
        one table's update is a few dependent I/O batches (read the missed rows, write back
        what the cache evicts or does not admit), so one after another the node mostly waits
        on I/O round trips.
        """
        iteration = self.optimizer_step + 1
        tasks = [
            (table, piece, parts)
            for table, piece in self._pieces.items()
            if (
                parts := [
                    pending.pushed[w][table]
                    for w in sorted(pending.pushed)
                    if table in pending.pushed[w]
                ]
            )
        ]
        if len(tasks) > 1 and self._update_threads is not None:
            running = [
                self._update_threads.submit(self._update_table, *task, iteration) for task in tasks
            ]
            futures.wait(running)
            for future in running:
                future.result()  # the first failure, once every table is done
        else:
            for task in tasks:
                self._update_table(*task, iteration)
        self.optimizer_step = iteration
        self.applied_step = step
        del self._pending[step]
        for key in [k for k in self._early if k[0] <= step]:  # never looked up: stale now
            del self._early[key]
        self._release_pins(up_to_step=step)
        for piece in self._pieces.values():
            piece.cache.on_step()
        self._step_applied.notify_all()

    def _update_table(
        self,
        table: str,
        piece: _Piece,
        parts: list[tuple[torch.Tensor, torch.Tensor]],
        iteration: int,
    ) -> None:
        """One table's share of `_apply_step`: touches only this piece and the kept early
        pools of its features (safe beside the other tables' updates)."""
        rows = _joined([r for r, _ in parts])
        values = _joined([g for _, g in parts])
        if rows.numel() == 0:
            return
        updated = _UpdatedRows.of(rows, piece.num_rows)
        merged = torch.zeros(updated.rows.numel(), values.shape[1], dtype=torch.float32)
        merged.index_add_(0, updated.inverse, values)
        unique_np = updated.rows.numpy()
        with piece.flash.holding_reads():  # rows read here and written straight back
            records = torch.from_numpy(piece.cache.fetch(unique_np))
            dim = piece.spec.embedding_dim
            old = records[:, :dim].clone() if self._early else None
            apply_update(
                self.optimizer,
                records[:, :dim],
                records[:, dim:],
                merged,
                iteration=iteration,
            )
            piece.cache.store(unique_np, records.numpy())
        if old is not None:
            self._correct_early_pools(table, updated, records[:, :dim] - old)

    # ------------------------------------------------------------------ prefetch / pins

    def prefetch(self, step: int, indices: dict[str, torch.Tensor]) -> None:
        """Stage the rows of a future step into the cache, pinned until that step is applied.

        Rows that find no slot (cache full of pinned rows) are left on flash and read there
        when used. A prefetch for an already-applied step does nothing.
        """
        with self._lock:
            self._check_open()
            checked: list[tuple[_Piece, torch.Tensor]] = []
            for feature, values in indices.items():
                piece = self._piece_for(feature)
                values = self._int_vector(values, f"feature {feature!r}: prefetch indices")
                self._check_range(piece, feature, values)
                checked.append((piece, values))
            if step <= self.applied_step:
                return
            per_piece: dict[str, list[torch.Tensor]] = {}
            for piece, values in checked:
                per_piece.setdefault(piece.spec.table_name, []).append(values)
            plans = []
            for table, parts in per_piece.items():
                piece = self._pieces[table]
                rows = torch.unique(torch.cat(parts)).numpy()
                missing = piece.cache.rows_to_stage(rows)
                reader = piece.flash.detached_read() if missing.size else None
                plans.append(_StagingPlan(piece, piece.flash, rows, missing, reader))
        # Flash reads without the node lock: lookups and updates of the current steps go on
        # meanwhile (a prefetch is for a step at least one ahead).
        for plan in plans:
            if plan.reader is not None:
                try:
                    plan.records = plan.reader.read(plan.missing)
                except (OSError, ShardFileError):
                    plan.records = None  # the store was closed or replaced: nothing staged
        with self._lock:
            for plan in plans:
                stale = plan.reader.finish(plan.missing) if plan.reader is not None else None
                if self._closed or step <= self.applied_step or plan.piece.flash is not plan.flash:
                    continue  # applied, closed or restored meanwhile: nothing to pin
                staged = None
                if plan.records is not None and stale is not None:
                    keep = ~stale  # rows written meanwhile are read again by `pin`
                    staged = (plan.missing[keep], plan.records[keep])
                pinned = plan.piece.cache.pin(plan.rows, staged)
                self._pins.setdefault(step, []).append((plan.piece, pinned))

    def _release_pins(self, *, up_to_step: int) -> None:
        for step in [s for s in self._pins if s <= up_to_step]:
            for piece, rows in self._pins.pop(step):
                piece.cache.unpin(rows)

    # ------------------------------------------------------------------ inspection

    def read_rows(
        self, table_name: str, global_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Current weights [n, D] and optimizer state [n, S] of global rows of a table."""
        with self._lock:
            self._check_open()
            piece = self._pieces.get(table_name)
            if piece is None:
                raise UnknownFeatureError(
                    f"node {self.node_id!r} holds no piece of table {table_name!r}; "
                    f"it holds: {', '.join(sorted(self._pieces))}"
                )
            rows = self._int_vector(global_rows, f"table {table_name!r}: rows")
            spec = piece.spec
            outside = (rows < spec.row_start) | (rows >= spec.row_end)
            if bool(outside.any()):
                raise IndexOutOfRangeError(
                    f"table {table_name!r}: row {int(rows[outside][0])} is outside this node's "
                    f"piece [{spec.row_start}, {spec.row_end})"
                )
            unique_rows, inverse = torch.unique(rows - spec.row_start, return_inverse=True)
            records = torch.from_numpy(
                piece.cache.fetch(unique_rows.numpy(), admit=False, count=False)
            )[inverse]
            dim = spec.embedding_dim
            return records[:, :dim].clone(), records[:, dim:].clone()

    def write_rows(
        self,
        table_name: str,
        global_rows: torch.Tensor,
        weights: torch.Tensor,
        states: torch.Tensor | None = None,
    ) -> None:
        """Overwrite the weights [n, D] (and, if given, optimizer state [n, S]) of global rows.

        Why: loading a model trained elsewhere (`ndp.interop`) into a running node. Rows go
        through the write-back cache, so a cached copy can never shadow the new value; with
        `states=None` each row keeps its optimizer state. Refused while a step is in flight
        (lookups recorded, update not applied), which would mix old and new weights.
        """
        with self._lock:
            self._check_open()
            piece = self._pieces.get(table_name)
            if piece is None:
                raise UnknownFeatureError(
                    f"node {self.node_id!r} holds no piece of table {table_name!r}; "
                    f"it holds: {', '.join(sorted(self._pieces))}"
                )
            if self._pending:
                raise StepOrderError(
                    f"node {self.node_id!r}: write_rows while step {min(self._pending)} is in "
                    "flight; write rows between steps"
                )
            rows = self._int_vector(global_rows, f"table {table_name!r}: rows")
            spec = piece.spec
            outside = (rows < spec.row_start) | (rows >= spec.row_end)
            if bool(outside.any()):
                raise IndexOutOfRangeError(
                    f"table {table_name!r}: row {int(rows[outside][0])} is outside this node's "
                    f"piece [{spec.row_start}, {spec.row_end})"
                )
            if torch.unique(rows).numel() != rows.numel():
                raise BadTensorError(f"table {table_name!r}: write_rows got duplicate rows")
            dim = spec.embedding_dim
            width = optimizer_state_width(self.optimizer.name, dim)
            n = rows.numel()
            if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (n, dim):
                raise BadTensorError(
                    f"table {table_name!r}: weights must be a float tensor [{n}, {dim}]"
                )
            if states is not None and (
                not isinstance(states, torch.Tensor) or tuple(states.shape) != (n, width)
            ):
                raise BadTensorError(
                    f"table {table_name!r}: optimizer state must be a float tensor [{n}, {width}] "
                    f"for {self.optimizer.name}"
                )
            local = (rows - spec.row_start).numpy()
            if states is None:
                records = piece.cache.fetch(local, admit=False, count=False)
            else:
                records = np.empty((n, dim + width), dtype=np.float32)
                records[:, dim:] = states.detach().to(torch.float32).numpy()
            records[:, :dim] = weights.detach().to(torch.float32).numpy()
            piece.cache.store(local, records)
            self._early.clear()  # pooled before the write: the lookups pool afresh

    def stats(self) -> dict:
        """Counters per tier (cache, flash), hit rate, energy estimate, step, occupancy."""
        with self._lock:
            total: dict = {}
            tables: dict[str, dict] = {}
            for name, piece in self._pieces.items():
                part = summarize(piece.cache.counters, piece.flash.counters, self.storage.energy)
                part["cache"].update(
                    capacity_rows=piece.cache.capacity_rows,
                    cached_rows=int(piece.cache.cached_rows().size),
                    pinned_rows=int(piece.cache.pinned_rows().size),
                    hot_rows=int(piece.cache.hot.sum()),
                )
                tables[name] = part
                total = add_counters(total, part)
            cache = total["cache"]
            lookups = cache["hits"] + cache["misses"]
            cache["hit_rate"] = cache["hits"] / lookups if lookups else 0.0
            return {
                "node_id": self.node_id,
                "applied_step": self.applied_step,
                "optimizer_step": self.optimizer_step,
                "update_seconds": self.update_seconds,
                "lookup_seconds": self.lookup_seconds,
                "lookup_calls": self.lookup_calls,
                "early": dict(self.early_counters),
                **total,
                "tables": tables,
            }

    def health(self) -> dict:
        """Liveness and position (cheap; no I/O)."""
        with self._lock:
            return {
                "ok": not self._closed,
                "node_id": self.node_id,
                "applied_step": self.applied_step,
                "tables": sorted(self._pieces),
                "pending_steps": sorted(self._pending),
            }

    # ------------------------------------------------------------------ checkpoints

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
            shards = []
            for piece in self._pieces.values():
                piece.cache.flush()
                piece.flash.sync()
                name = _file_stem(self.node_id, piece.spec)
                digest = _copy_with_sha256(piece.flash.path, directory / name)
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
                if _sha256(directory / entry["file"]) != entry["sha256"]:
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
            staged: list[tuple[_Piece, Path]] = []
            try:
                for table, piece in self._pieces.items():
                    entry = by_table[table]
                    target = piece.flash.path.with_name(piece.flash.path.name + ".restoring")
                    staged.append((piece, target))
                    _stage_file(directory / entry["file"], target, entry["sha256"], move=consume)
            except BaseException:
                for _, target in staged:
                    target.unlink(missing_ok=True)
                raise
            for piece, target in staged:
                counters = piece.flash.counters
                piece.cache.invalidate()
                piece.flash.close()
                os.replace(target, piece.flash.path)
                piece.flash = self._open_flash(piece.spec)
                piece.flash.counters = counters
                piece.cache.flash = piece.flash
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
        manifest = json.loads(path.read_text())
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

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Write back dirty rows and close the shard files (idempotent)."""
        with self._lock:
            if self._closed:
                return
            if self._update_threads is not None:
                self._update_threads.shutdown(wait=True)
            for piece in self._pieces.values():
                piece.cache.flush()
                piece.flash.close()
            self._closed = True
            self._step_applied.notify_all()
