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

The core is split by concern: `node.py` (construction, the step barrier, lookups and pushes),
`node_updates.py` (applying a step's update: FBGEMM's kernel or the node's own path),
`node_early.py` (early lookups), `node_prefetch.py` (prefetch and pins), `node_inspection.py` (rows by table, stats),
`node_checkpoints.py` (checkpoint and restore; files in `shard_files.py`), `early_pools.py`
(early pools and their corrections), `arena.py` (arenas) and `keyed_bags.py` (a request's
bags, flat).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from concurrent import futures
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from ndp.config import SparseOptimizerConfig, StorageConfig
from ndp.errors import StorageNodeError
from ndp.model.spec import optimizer_state_width
from ndp.plan import Bags, KeyedJagged, ShardSpec
from ndp.rows import unique_inverse
from storage_node.arena import Arena, ArenaFlash, Piece
from storage_node.cache import RowCache, slot_bytes, split_budget
from storage_node.early_pools import EarlyPool, Request
from storage_node.errors import (
    BadTensorError,
    StepOrderError,
    UnknownFeatureError,
)
from storage_node.flash import FlashStore
from storage_node.keyed_bags import (
    FeaturePlace,
    KeyedBags,
    normalised_bags,
)
from storage_node.node_checkpoints import Checkpoints
from storage_node.node_early import EarlyLookups
from storage_node.node_inspection import Inspection
from storage_node.node_prefetch import PrefetchPins
from storage_node.node_updates import Updates, _PendingStep
from storage_node.shard_files import CHECKPOINT_FORMAT, open_shard_file
from storage_node.stats import CacheCounters

__all__ = ["CHECKPOINT_FORMAT", "StorageNodeCore", "open_shard_file"]


def _expected_lookups(shards: list[ShardSpec]) -> list[float]:
    """Each piece's expected lookups per step: the planner's figures when every piece has
    one, else one lookup per feature and sample spread evenly over the table's rows."""
    if all(s.expected_lookups > 0 for s in shards):
        return [s.expected_lookups for s in shards]
    return [len(s.features) * (s.row_end - s.row_start) / s.table_num_rows for s in shards]


class StorageNodeCore(PrefetchPins, Inspection, Checkpoints, EarlyLookups, Updates):
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
        self._pins: dict[int, list[tuple[Arena, np.ndarray]]] = {}
        self._early: dict[tuple[int, int], EarlyPool] = {}
        self.early_counters = {
            "early_pools": 0,
            "early_hits": 0,
            "early_hits_without_bags": 0,
            "early_mismatches": 0,
            "early_groups_deferred": 0,
        }
        """Early pools kept; answered by a lookup (of them: by a `lookup_early` that sent no
        bags); dropped because the lookup's bags differed; groups of them kept unpooled
        because every row was resident (`storage_node.early_pools`)."""
        self.update_paths = {"fbgemm_kernel": 0, "node_kernels": 0}
        """Arena updates applied by FBGEMM's backward kernel (`storage_node.fused_update`) and
        by the node's own dedupe/merge/optimizer path."""
        self._closed = False
        self._pieces: dict[str, Piece] = {}
        self._piece_of_feature: dict[str, Piece] = {}
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

    def _open_arenas(self, shards: list[ShardSpec]) -> list[Arena]:
        """One arena per embedding dim (in order of first appearance), its cache sized by
        the budget's split over arenas by expected lookups."""
        by_dim: dict[int, list[ShardSpec]] = {}
        for spec in shards:
            by_dim.setdefault(spec.embedding_dim, []).append(spec)
        lookups = dict(zip((s.table_name for s in shards), _expected_lookups(shards), strict=True))
        budgets = split_budget(
            self.storage.cache_bytes,
            [
                rows * slot_bytes(self._row_bytes(dim), rows)
                for dim, specs in by_dim.items()
                for rows in [sum(s.row_end - s.row_start for s in specs)]
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
                weight_floats=dim,
            )
            cache.preload()  # the whole arena fits: DRAM-resident from the start
            arena = Arena(dim=dim, pieces=[], flash=flash, cache=cache)
            for index, spec in enumerate(specs):
                piece = Piece(spec, arena, index, int(flash.bases[index]))
                arena.pieces.append(piece)
                self._pieces[spec.table_name] = piece
                for feature in spec.features:
                    self._piece_of_feature[feature] = piece
            arenas.append(arena)
        return arenas

    # ------------------------------------------------------------------ validation

    def _piece_for(self, feature: str) -> Piece:
        piece = self._piece_of_feature.get(feature)
        if piece is None:
            served = ", ".join(sorted(self._piece_of_feature)) or "none"
            raise UnknownFeatureError(
                f"node {self.node_id!r} does not serve feature {feature!r}; it serves: {served}"
            )
        return piece

    def _validated_request(self, bags: Mapping[str, Bags] | KeyedJagged) -> Request:
        """The request's bags checked (every rule, before anything changes) and joined per
        arena, features in the order they came.

        The wire's flat bags (`KeyedJagged`) of features that all live in one arena (the
        usual node: one embedding dim) are taken as they are; otherwise they are viewed per
        feature and joined per arena.
        """
        if isinstance(bags, KeyedJagged):
            pieces = [self._piece_for(feature) for feature in bags.keys]
            if pieces and all(piece.arena is pieces[0].arena for piece in pieces):
                keyed = KeyedBags.from_jagged([piece.place for piece in pieces], bags)
                return Request([(pieces[0].arena, keyed)])
            bags = bags.to_bags()
        per_arena: dict[int, tuple[Arena, list[str], list[FeaturePlace], list[Bags]]] = {}
        for feature, feature_bags in bags.items():
            piece = self._piece_for(feature)
            normal = normalised_bags(feature, feature_bags)
            arena = piece.arena
            _, features, places, parts = per_arena.setdefault(id(arena), (arena, [], [], []))
            features.append(feature)
            places.append(piece.place)
            parts.append(normal)
        return Request(
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

    def every_row_resident(self) -> bool:
        """Every row of every piece on this node is cached for good (`RowCache.
        every_row_resident`): an early lookup (exact mode) or a prefetch would stage nothing
        and pool nothing early, so the replies tell workers they can stop sending them."""
        return all(arena.cache.every_row_resident for arena in self._arenas)

    # ------------------------------------------------------------------ lookup

    def lookup(
        self,
        step: int,
        worker: int,
        bags: Mapping[str, Bags] | KeyedJagged,
        *,
        train: bool = True,
        wait_timeout_s: float | None = None,
        previous_push: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Pooled vectors per feature: float32 [B, D].

        With `train`, waits for `applied_step == step - 1` (up to `wait_timeout_s`, default
        `storage.step_wait_timeout_s`) and records the bags for the push of (step, worker);
        `train=False` pools the current rows and records nothing, after waiting for
        `applied_step >= step - 1` only when given `wait_timeout_s` (the wire's lookups are).
        The request is validated completely before any wait, so a malformed one is refused
        at once instead of after the step barrier.

        Args:
            previous_push: this worker's gradients of step - 1 (`push_gradients`), applied
                after this request is validated and before the wait: one call per node and
                step (`pipeline.push = "with_next_lookup"`). Refused bags apply nothing.
        """
        with self._lock:
            self._check_open()
            self._check_worker(worker)
            started = time.perf_counter()
            request = self._validated_request(bags)
            busy = time.perf_counter() - started  # the wait for the step is not lookup work
            if previous_push is not None:
                self._push_previous(step, worker, previous_push, train=train)
            if train or wait_timeout_s is not None:
                timeout_s = self.storage.step_wait_timeout_s
                self.wait_for_step(
                    step, timeout_s if wait_timeout_s is None else wait_timeout_s, training=train
                )
            started = time.perf_counter()
            with ExitStack() as carry:
                if train:  # the blocks this step reads stay for its update (`_apply_step`)
                    for arena, _ in request.groups:
                        carry.enter_context(arena.flash.carrying(step))
                early = self._take_early(step, worker, request) if train else None
                if early is not None:
                    pooled = early.answer(self._pool)
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

    def _record_lookup(self, step: int, worker: int, request: Request) -> None:
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
                request = Request(earlier.groups + request.groups)
        pending.lookups[worker] = request

    def _pool(self, arena: Arena, keyed: KeyedBags) -> torch.Tensor:
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
            return keyed.pool(torch.from_numpy(cache.weights), torch.from_numpy(slots), arena.dim)
        unique_rows, inverse, _ = unique_inverse(keyed.values.numpy(), arena.flash.layout.num_rows)
        records = cache.fetch(unique_rows)
        return keyed.pool(
            torch.from_numpy(records[:, : arena.dim]), torch.from_numpy(inverse), arena.dim
        )

    # ------------------------------------------------------------------ push / update

    def _push_previous(
        self, step: int, worker: int, grads: Mapping[str, torch.Tensor], *, train: bool
    ) -> None:
        """The push of step - 1 that rides on the training lookup of `step`."""
        if not train:
            raise StepOrderError(
                f"step {step}, worker {worker}: gradients ride only on a training lookup (the "
                "next step's); push them with push_gradients before an evaluation lookup"
            )
        self.push_gradients(step - 1, worker, dict(grads))

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
                arena.flash.close()
            self._closed = True
            self._step_applied.notify_all()
