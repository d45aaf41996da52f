"""`StorageNodeCore`: the pure core of one emulated computational storage device.

A node holds one piece (`ShardSpec`) of each of several tables. Each piece is a flash file
(`flash.FlashStore`); pieces with the same embedding dim form an arena (`storage_node.arena`):
one row space over their files behind one DRAM row cache (`cache.RowCache`) with one
eviction policy. The node's cache budget is split between arenas (usually one) by their
expected lookups, none getting more than holds all its rows (`cache.split_budget`). The node
answers pooled lookups and applies the sparse optimizer near the data, in step order:

1. ``lookup(step, worker, bags)`` (training) waits until ``applied_step == step - 1``, pools
   the rows and records the bags of (step, worker) so the gradient can be scattered later.
2. ``push_gradients(step, worker, grads)`` turns d(loss)/d(pooled) into per-occurrence row
   gradients (mean pooling divides by the bag length, per-sample weights multiply).
3. When all `num_workers` workers pushed, the gradients of the step are concatenated,
   duplicates merged (``unique`` + ``index_add``), the optimizer applied to each unique row
   once, ``applied_step = step``, rows pinned by ``prefetch(step)`` are released, and waiters
   are woken.

Every stage is a few calls per arena, not a loop over tables or features: a request's bags
are joined into one flat `KeyedBags` (arena rows, one offsets tensor), pooled by one
`embedding_bag` over the cache's slot tensor, and an update dedupes the rows of every table
at once, applies the optimizer once and writes the cache once.

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

Checkpoints: see `storage_node.shard_files` (one file per piece, unchanged by arenas).
"""

from __future__ import annotations

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

from ndp.config import SparseOptimizerConfig, StorageConfig
from ndp.errors import StorageNodeError
from ndp.model.spec import optimizer_state_width
from storage_node import shard_files
from storage_node.arena import ArenaDetachedRead, ArenaFlash
from storage_node.cache import SLOT_METADATA_BYTES, RowCache, distinct_below, split_budget
from storage_node.errors import (
    BadTensorError,
    EarlyPoolMissingError,
    IndexOutOfRangeError,
    ShardFileError,
    StepOrderError,
    UnknownFeatureError,
)
from storage_node.flash import FlashStore
from storage_node.keyed_bags import (
    FeaturePlace,
    KeyedBags,
    PushedGradients,
    check_range,
    int_vector,
    merge_row_gradients,
    normalised_bags,
)
from storage_node.optimizers import apply_update, apply_update_at
from storage_node.shard_files import CHECKPOINT_FORMAT, open_shard_file
from storage_node.spec import Bags, ShardSpec
from storage_node.stats import CacheCounters, FlashCounters, add_counters, summarize

__all__ = ["CHECKPOINT_FORMAT", "StorageNodeCore", "open_shard_file"]


@dataclass
class _Arena:
    """Pieces with one record width: their files as one row space behind one cache."""

    dim: int
    pieces: list[_Piece]
    flash: ArenaFlash
    cache: RowCache


@dataclass
class _Piece:
    """One table piece on this node: its place in its arena."""

    spec: ShardSpec
    arena: _Arena | None
    index: int
    """Position in the arena (its file is `arena.flash.stores[index]`)."""
    base: int
    """The piece's first arena row."""

    @property
    def num_rows(self) -> int:
        return self.spec.row_end - self.spec.row_start

    @property
    def flash(self) -> FlashStore:
        return self.arena.flash.stores[self.index]

    @property
    def cache(self) -> RowCache:
        """The arena's cache (shared with the arena's other pieces; rows are arena rows)."""
        return self.arena.cache

    @property
    def place(self) -> FeaturePlace:
        return FeaturePlace(self.spec, self.base)


@dataclass
class _Request:
    """One validated request: its features' bags joined per arena."""

    groups: list[tuple[_Arena, KeyedBags]]

    def features(self) -> list[str]:
        return [f for _, keyed in self.groups for f in keyed.features]

    def same_as(self, other: _Request) -> bool:
        return len(self.groups) == len(other.groups) and all(
            a is b and x.same_as(y)
            for (a, x), (b, y) in zip(self.groups, other.groups, strict=True)
        )


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
    """One arena's share of a prefetch: rows to pin, and those read from flash unlocked."""

    arena: _Arena
    stores: list[FlashStore]
    rows: np.ndarray
    missing: np.ndarray
    reader: ArenaDetachedRead | None
    records: np.ndarray | None = None


@dataclass
class _PendingStep:
    """Lookups and pushes collected for the step that is applied next."""

    lookups: dict[int, _Request] = field(default_factory=dict)
    pushed: dict[int, list[tuple[_Arena, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


@dataclass
class _EarlyPool:
    """One (step, worker)'s bags pooled before their step's turn, kept until its lookup."""

    request: _Request
    """The validated bags as they came (the lookup must send the same ones to use them)."""
    pooled: list[torch.Tensor]
    """float32 [sum B, D] per group of `request`, corrected for every update since pooling."""
    correct: bool
    """False (stale mode): updates applied after pooling are not added."""

    def answer(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for (_, keyed), pooled in zip(self.request.groups, self.pooled, strict=True):
            out.update(keyed.split(pooled))
        return out


def _expected_lookups(shards: list[ShardSpec]) -> list[float]:
    """Each piece's expected lookups per step: the planner's figures when every piece has
    one, else one lookup per feature and sample spread evenly over the table's rows."""
    if all(s.expected_lookups > 0 for s in shards):
        return [s.expected_lookups for s in shards]
    return [len(s.features) * (s.row_end - s.row_start) / s.table_num_rows for s in shards]


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
        self._pins: dict[int, list[tuple[_Arena, np.ndarray]]] = {}
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
        self._arenas = self._open_arenas(shards)
        threads = min(storage.update_threads, len(self._arenas))
        self._update_threads = (
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ndp-update")
            if threads > 1
            else None
        )

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

    def _open_arenas(self, shards: list[ShardSpec]) -> list[_Arena]:
        """One arena per embedding dim (in order of first appearance), its cache sized by
        the budget's split over arenas by expected lookups."""
        by_dim: dict[int, list[ShardSpec]] = {}
        for spec in shards:
            by_dim.setdefault(spec.embedding_dim, []).append(spec)
        lookups = dict(zip((s.table_name for s in shards), _expected_lookups(shards), strict=True))
        budgets = split_budget(
            self.storage.cache_bytes,
            [
                sum(s.row_end - s.row_start for s in specs)
                * (self._row_bytes(dim) + SLOT_METADATA_BYTES)
                for dim, specs in by_dim.items()
            ],
            [sum(lookups[s.table_name] for s in specs) for specs in by_dim.values()],
        )
        arenas = []
        for (dim, specs), cache_bytes in zip(by_dim.items(), budgets, strict=True):
            flash = ArenaFlash([self._open_flash(spec) for spec in specs])
            cache = RowCache(
                flash,
                capacity_bytes=cache_bytes,
                policy=self.storage.cache_policy,
                hot_fraction=self.storage.hot_fraction,
                counters=CacheCounters(),
            )
            cache.preload()  # the whole arena fits: DRAM-resident from the start
            arena = _Arena(dim=dim, pieces=[], flash=flash, cache=cache)
            for index, spec in enumerate(specs):
                piece = _Piece(spec, arena, index, int(flash.bases[index]))
                arena.pieces.append(piece)
                self._pieces[spec.table_name] = piece
                for feature in spec.features:
                    self._piece_of_feature[feature] = piece
            arenas.append(arena)
        return arenas

    # ------------------------------------------------------------------ validation

    def _piece_for(self, feature: str) -> _Piece:
        piece = self._piece_of_feature.get(feature)
        if piece is None:
            served = ", ".join(sorted(self._piece_of_feature)) or "none"
            raise UnknownFeatureError(
                f"node {self.node_id!r} does not serve feature {feature!r}; it serves: {served}"
            )
        return piece

    def _validated_request(self, bags: dict[str, Bags]) -> _Request:
        """The request's bags checked (every rule, before anything changes) and joined per
        arena, features in the order they came."""
        per_arena: dict[int, tuple[_Arena, list[str], list[FeaturePlace], list[Bags]]] = {}
        for feature, feature_bags in bags.items():
            piece = self._piece_for(feature)
            normal = normalised_bags(feature, feature_bags)
            arena = piece.arena
            _, features, places, parts = per_arena.setdefault(id(arena), (arena, [], [], []))
            features.append(feature)
            places.append(piece.place)
            parts.append(normal)
        return _Request(
            [
                (arena, KeyedBags.build(features, places, parts))
                for arena, features, places, parts in per_arena.values()
            ]
        )

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
            request = self._validated_request(bags)
            busy = time.perf_counter() - started  # the wait for the step is not lookup work
            if train:
                self.wait_for_step(step, self.storage.step_wait_timeout_s)
            started = time.perf_counter()
            early = self._take_early(step, worker, request) if train else None
            if early is not None:
                pooled = early.answer()
                request = early.request
            else:
                pooled = {}
                for arena, keyed in request.groups:
                    pooled.update(keyed.split(self._pool(arena, keyed)))
            if train:
                self._record_lookup(step, worker, request)
            self.lookup_seconds += busy + time.perf_counter() - started
            self.lookup_calls += 1
            return pooled

    def _record_lookup(self, step: int, worker: int, request: _Request) -> None:
        """Keep the bags of (step, worker) for its push. A repeated lookup (a client's retry)
        replaces the earlier one; one that covers only some of its features is refused."""
        pending = self._pending.setdefault(step, _PendingStep())
        earlier = pending.lookups.get(worker)
        if earlier is not None:
            old, new = set(earlier.features()), set(request.features())
            if old & new and not old <= new:
                raise StepOrderError(
                    f"step {step}, worker {worker}: a second lookup repeats features "
                    f"{sorted(old & new)} but not {sorted(old - new)} of the first; send the "
                    "features of one node and step in one lookup"
                )
            if not old & new:
                request = _Request(earlier.groups + request.groups)
        pending.lookups[worker] = request

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
            self._record_lookup(step, worker, early.request)
            return early.answer()

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
            request = self._validated_request(bags)
            if step <= self.applied_step:
                return False
            pooled = [self._pool(arena, keyed) for arena, keyed in request.groups]
            self._early[(step, worker)] = _EarlyPool(request, pooled, correct)
            self.early_counters["early_pools"] += 1
            return True

    def _take_early(self, step: int, worker: int, request: _Request) -> _EarlyPool | None:
        """The early pool of (step, worker) if its bags are the lookup's; dropped either way."""
        early = self._early.pop((step, worker), None)
        if early is None:
            return None
        same = early.request.same_as(request)
        self.early_counters["early_hits" if same else "early_mismatches"] += 1
        return early if same else None

    def _pool(self, arena: _Arena, keyed: KeyedBags) -> torch.Tensor:
        """float32 [sum B, D]: every bag of `keyed` pooled in one `embedding_bag`.

        Fast path (every requested row cache-resident): straight over the cache's slot tensor
        with slot ids, so no rows are copied out. Otherwise the unique rows are fetched
        (misses read from flash, admitted per policy) and pooled.
        """
        if keyed.values.numel() == 0:
            return torch.zeros(keyed.total_bags, arena.dim, dtype=torch.float32)
        cache = arena.cache
        slots = cache.resident_slots(keyed.values.numpy())
        if slots is not None:
            # Pool the whole record width: a column slice of the slot tensor would make
            # embedding_bag copy the entire cache; the extra state columns are dropped.
            return keyed.pool(torch.from_numpy(cache.records), torch.from_numpy(slots), arena.dim)
        unique_rows, inverse = torch.unique(keyed.values, return_inverse=True)
        records = cache.fetch(unique_rows.numpy())
        return keyed.pool(torch.from_numpy(records[:, : arena.dim]), inverse, arena.dim)

    def _correct_early_pools(
        self, arena: _Arena, updated: _UpdatedRows, delta: torch.Tensor
    ) -> None:
        """Add one arena's update to every kept early pool (exact mode) that reads its rows:
        one lookup of the updated rows and one `index_add_` per pool.

        Args:
            updated: the arena rows the update changed.
            delta: float32 [u, D] new minus old weights of those rows (in `updated.rows` order).
        """
        for early in self._early.values():
            if not early.correct:
                continue
            for (group_arena, keyed), pooled in zip(
                early.request.groups, early.pooled, strict=True
            ):
                if group_arena is not arena or keyed.values.numel() == 0:
                    continue
                hit, position = updated.find(keyed.values)
                if position.numel() == 0:
                    continue
                bag_of_value = keyed.bag_of_value()
                change = delta[position]
                scale = keyed.scale(bag_of_value)  # weights x 1/divisor, as the pooling used
                if scale is not None:
                    change = change * scale[hit][:, None]
                pooled.index_add_(0, bag_of_value[hit], change)

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
            request = None if pending is None else pending.lookups.get(worker)
            if request is None:
                raise StepOrderError(
                    f"push for step {step} from worker {worker} without a training lookup of "
                    "that step on this node; call lookup(step, worker, ..., train=True) first"
                )
            if worker in pending.pushed:
                return False
            pending.pushed[worker] = self._row_gradients(request, grads)
            if len(pending.pushed) < self.num_workers:
                return False
            started = time.perf_counter()
            self._apply_step(step, pending)
            self.update_seconds += time.perf_counter() - started
            return True

    def _row_gradients(
        self, request: _Request, grads: dict[str, torch.Tensor]
    ) -> list[tuple[_Arena, PushedGradients]]:
        """Per group: (arena, its gradients as pushed); validates every gradient first."""
        looked_up = {
            feature: keyed.batch_sizes[i]
            for _, keyed in request.groups
            for i, feature in enumerate(keyed.features)
        }
        missing = sorted(set(looked_up) - set(grads))
        if missing:
            raise BadTensorError(f"gradients missing for looked-up features: {missing}")
        for feature, grad in grads.items():
            if feature not in looked_up:
                self._piece_for(feature)  # unknown feature -> UnknownFeatureError
                raise BadTensorError(
                    f"gradient for feature {feature!r}, which this worker did not look up"
                )
            dim = self._piece_of_feature[feature].spec.embedding_dim
            expected = (looked_up[feature], dim)
            if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
                raise BadTensorError(f"gradient for feature {feature!r} must be a float tensor")
            if tuple(grad.shape) != expected:
                raise BadTensorError(
                    f"gradient for feature {feature!r} has shape {tuple(grad.shape)}, "
                    f"expected {expected} (batch, dim)"
                )
        pushed = []
        for arena, keyed in request.groups:
            part = keyed.pushed_gradients(grads)
            if part is None:
                for feature in keyed.features:  # the error path only: name the feature
                    if not bool(torch.isfinite(grads[feature]).all()):
                        raise BadTensorError(
                            f"gradient for feature {feature!r} contains NaN or Inf"
                        )
            pushed.append((arena, part))
        return pushed

    def _apply_step(self, step: int, pending: _PendingStep) -> None:
        """Sum all workers' gradients, merge duplicates, update each unique row once.

        One update per arena (every table of it at once); arenas update
        `storage.update_threads` at a time, under the caller's lock.
        """
        iteration = self.optimizer_step + 1
        per_arena: dict[int, tuple[_Arena, list[PushedGradients]]] = {}
        for worker in sorted(pending.pushed):
            for arena, part in pending.pushed[worker]:
                per_arena.setdefault(id(arena), (arena, []))[1].append(part)
        tasks = list(per_arena.values())
        if len(tasks) > 1 and self._update_threads is not None:
            running = [
                self._update_threads.submit(self._update_arena, *task, iteration) for task in tasks
            ]
            futures.wait(running)
            for future in running:
                future.result()  # the first failure, once every arena is done
        else:
            for task in tasks:
                self._update_arena(*task, iteration)
        self.optimizer_step = iteration
        self.applied_step = step
        del self._pending[step]
        for key in [k for k in self._early if k[0] <= step]:  # never looked up: stale now
            del self._early[key]
        self._release_pins(up_to_step=step)
        for arena in self._arenas:
            arena.cache.on_step()
        self._step_applied.notify_all()

    def _update_arena(self, arena: _Arena, parts: list[PushedGradients], iteration: int) -> None:
        """One arena's share of `_apply_step`: one dedupe, one merge, one optimizer call
        and one write for every table of the arena; touches only this arena's cache and
        files and the early pools' groups of this arena (safe beside other arenas' updates)."""
        pushed = PushedGradients.join(parts)
        if pushed.rows.numel() == 0:
            return
        updated = _UpdatedRows.of(pushed.rows, arena.flash.layout.num_rows)
        merged = merge_row_gradients(pushed, updated.inverse, updated.rows.numel())
        unique_np = updated.rows.numpy()
        dim = arena.dim
        slots = arena.cache.resident_for_update(unique_np)
        if slots is not None:  # every row cached: changed in place in the slot tensor
            records_t, slots_t = torch.from_numpy(arena.cache.records), torch.from_numpy(slots)
            old = records_t[slots_t, :dim] if self._early else None
            apply_update_at(self.optimizer, records_t, slots_t, dim, merged, iteration=iteration)
            if old is not None:
                self._correct_early_pools(arena, updated, records_t[slots_t, :dim] - old)
            return
        with arena.flash.holding_reads():  # rows read here and written straight back
            records = torch.from_numpy(arena.cache.fetch(unique_np))
            old = records[:, :dim].clone() if self._early else None
            apply_update(
                self.optimizer,
                records[:, :dim],
                records[:, dim:],
                merged,
                iteration=iteration,
            )
            arena.cache.store(unique_np, records.numpy())
        if old is not None:
            self._correct_early_pools(arena, updated, records[:, :dim] - old)

    # ------------------------------------------------------------------ prefetch / pins

    def prefetch(self, step: int, indices: dict[str, torch.Tensor]) -> None:
        """Stage the rows of a future step into the cache, pinned until that step is applied.

        Rows that find no slot (cache full of pinned rows) are left on flash and read there
        when used. A prefetch for an already-applied step does nothing.
        """
        with self._lock:
            self._check_open()
            per_arena: dict[int, tuple[_Arena, list[torch.Tensor]]] = {}
            for feature, values in indices.items():
                piece = self._piece_for(feature)
                values = int_vector(values, f"feature {feature!r}: prefetch indices")
                check_range(piece.place, feature, values)
                per_arena.setdefault(id(piece.arena), (piece.arena, []))[1].append(
                    values + piece.base
                )
            if step <= self.applied_step:
                return
            plans = []
            for arena, parts in per_arena.values():
                rows = torch.unique(torch.cat(parts)).numpy()
                missing = arena.cache.rows_to_stage(rows)
                reader = arena.flash.detached_read(missing) if missing.size else None
                plans.append(_StagingPlan(arena, list(arena.flash.stores), rows, missing, reader))
        # Flash reads without the node lock: lookups and updates of the current steps go on
        # meanwhile (a prefetch is for a step at least one ahead).
        for plan in plans:
            if plan.reader is not None:
                try:
                    plan.records = plan.reader.read()
                except (OSError, ShardFileError):
                    plan.records = None  # the store was closed or replaced: nothing staged
        with self._lock:
            for plan in plans:
                stale = plan.reader.finish() if plan.reader is not None else None
                replaced = any(
                    a is not b for a, b in zip(plan.stores, plan.arena.flash.stores, strict=True)
                )
                if self._closed or step <= self.applied_step or replaced:
                    continue  # applied, closed or restored meanwhile: nothing to pin
                staged = None
                if plan.records is not None and stale is not None:
                    keep = ~stale  # rows written meanwhile are read again by `pin`
                    staged = (plan.missing[keep], plan.records[keep])
                pinned = plan.arena.cache.pin(plan.rows, staged)
                self._pins.setdefault(step, []).append((plan.arena, pinned))

    def _release_pins(self, *, up_to_step: int) -> None:
        for step in [s for s in self._pins if s <= up_to_step]:
            for arena, rows in self._pins.pop(step):
                arena.cache.unpin(rows)

    # ------------------------------------------------------------------ inspection

    def _table_rows(
        self, table_name: str, global_rows: torch.Tensor
    ) -> tuple[_Piece, torch.Tensor]:
        """The piece of a table and the local rows of `global_rows` (all checked)."""
        piece = self._pieces.get(table_name)
        if piece is None:
            raise UnknownFeatureError(
                f"node {self.node_id!r} holds no piece of table {table_name!r}; "
                f"it holds: {', '.join(sorted(self._pieces))}"
            )
        rows = int_vector(global_rows, f"table {table_name!r}: rows")
        spec = piece.spec
        outside = (rows < spec.row_start) | (rows >= spec.row_end)
        if bool(outside.any()):
            raise IndexOutOfRangeError(
                f"table {table_name!r}: row {int(rows[outside][0])} is outside this node's "
                f"piece [{spec.row_start}, {spec.row_end})"
            )
        return piece, rows - spec.row_start

    def read_rows(
        self, table_name: str, global_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Current weights [n, D] and optimizer state [n, S] of global rows of a table."""
        with self._lock:
            self._check_open()
            piece, local = self._table_rows(table_name, global_rows)
            unique_rows, inverse = torch.unique(local + piece.base, return_inverse=True)
            records = torch.from_numpy(
                piece.cache.fetch(unique_rows.numpy(), admit=False, count=False)
            )[inverse]
            dim = piece.spec.embedding_dim
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
            if table_name in self._pieces and self._pending:
                raise StepOrderError(
                    f"node {self.node_id!r}: write_rows while step {min(self._pending)} is in "
                    "flight; write rows between steps"
                )
            piece, local_rows = self._table_rows(table_name, global_rows)
            if torch.unique(local_rows).numel() != local_rows.numel():
                raise BadTensorError(f"table {table_name!r}: write_rows got duplicate rows")
            dim = piece.spec.embedding_dim
            width = optimizer_state_width(self.optimizer.name, dim)
            n = local_rows.numel()
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
            rows = (local_rows + piece.base).numpy()
            if states is None:
                records = piece.cache.fetch(rows, admit=False, count=False)
            else:
                records = np.empty((n, dim + width), dtype=np.float32)
                records[:, dim:] = states.detach().to(torch.float32).numpy()
            records[:, :dim] = weights.detach().to(torch.float32).numpy()
            piece.cache.store(rows, records)
            self._early.clear()  # pooled before the write: the lookups pool afresh

    def stats(self) -> dict:
        """Counters per tier (cache, flash), hit rate, energy estimate, step, occupancy.

        The cache counters are the arenas' (one cache serves every piece of an arena); per
        table, the flash counters of its file and how many of its rows the cache holds.
        """
        with self._lock:
            total: dict = {}
            tables: dict[str, dict] = {}
            for arena in self._arenas:
                cache = arena.cache
                occupancy = {
                    "cached_rows": cache.cached_rows(),
                    "pinned_rows": cache.pinned_rows(),
                    "hot_rows": cache.slot_rows[cache.hot],
                }
                arena_part = summarize(cache.counters, FlashCounters(), self.storage.energy)
                arena_part["cache"].update(
                    capacity_rows=cache.capacity_rows,
                    **{name: int(rows.size) for name, rows in occupancy.items()},
                )
                total = add_counters(total, arena_part)
                for piece in arena.pieces:
                    part = summarize(CacheCounters(), piece.flash.counters, self.storage.energy)
                    low, high = piece.base, piece.base + piece.num_rows
                    part["cache"] = {
                        "capacity_rows": cache.capacity_rows,
                        **{
                            name: int(np.count_nonzero((rows >= low) & (rows < high)))
                            for name, rows in occupancy.items()
                        },
                    }
                    tables[piece.spec.table_name] = part
                    total = add_counters(
                        total, {"flash": part["flash"], "energy_pj": part["energy_pj"]}
                    )
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
                "arenas": len(self._arenas),
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
            for arena in self._arenas:
                arena.cache.flush()
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
            staged: list[tuple[_Piece, Path]] = []
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
            for arena in self._arenas:
                arena.cache.flush()
                for store in arena.flash.stores:
                    store.close()
            self._closed = True
            self._step_applied.notify_all()
