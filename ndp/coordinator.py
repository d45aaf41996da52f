"""The coordinator: plans the model, places it on Ray and drives synchronous steps.

`NdpEngine` implements the training loop's StepEngine over actors. One training step reads
as the design's data path:

    1. the loader yields batch s (done by `ndp.train_loop`),
    2. each worker gets its share of the batch and routes its sparse features to the storage
       nodes that own the rows (`ndp.routing.route_lookup`),
    3. workers ask the storage nodes for pooled vectors (nodes pool near the data),
    4. workers run the dense half and all-reduce dense gradients,
    5. workers push d(loss)/d(pooled); nodes scatter, merge and apply the sparse optimizer.

With lookahead (`ndp.pipeline`), `prefetch` hands each worker its share of a batch read ahead;
the worker routes it once, has the nodes stage its rows, pools it early a step before it is
trained, and trains it when `train_step` names its step (the batch is not shipped again). A
worker returns from step s before its gradient push is acknowledged. `flush()` waits for
those pushes: it runs before everything that must see the state after the last step
(predict, table_rows, export_state, import_state, close).

The coordinator reaches storage nodes only through their Ray actors (start, stats, rows,
restore: the control plane); tensors of a step travel between GPU workers and nodes over
gRPC (the data plane). docs/architecture.md, "Two planes", says why.

Everything the engine starts (storage-node actors, their gRPC servers, GPU-worker actors and
a local Ray instance) is torn down by `close()`, also after an error.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from gpu_worker.actor import launch_gpu_worker
from ndp.config import Config
from ndp.data.batch import Batch
from ndp.errors import ComponentDiedError, ComponentKind, ComponentTimeoutError, NDPError
from ndp.plan import ShardingPlan
from ndp.planner import plan_shards
from ndp.ray_local import init_local_ray
from ndp.routing import check_indices
from storage_node.actor import launch_storage_node

if TYPE_CHECKING:
    from ndp.checkpoint import Checkpoint, EngineState

log = logging.getLogger(__name__)


class NdpEngine:
    """Synchronous ndp training on storage-node and GPU-worker actors (a StepEngine).

    Args:
        cfg: the run's config.
        plan: a precomputed plan; default: `plan_shards(cfg)`.
        address: Ray cluster address; default `cfg.cluster.address`, else a local instance.
    """

    def __init__(
        self, cfg: Config, *, plan: ShardingPlan | None = None, address: str | None = None
    ) -> None:
        import ray

        self.cfg = cfg
        self.plan = plan or plan_shards(cfg)
        self.tables = cfg.model.effective_tables()
        self.num_workers = cfg.cluster.num_gpu_workers
        self._token = secrets.token_urlsafe(32)  # per job; handed to actors, never logged
        self._started_ray = not ray.is_initialized()
        self._nodes: list[Any] = []
        self._workers: list[Any] = []
        self._update_seconds: dict[int, float] = {}  # per node, at the last timings()
        self._ahead: list[tuple[int, Batch]] = []
        """Batches read ahead (`prefetch`) not yet handed to the workers: they go with the
        next `train_step` call (one Ray call per worker and step, not two)."""
        self._held: dict[int, Batch] = {}
        """step -> batch whose shares the workers hold (`prefetch`): not shipped again."""
        self._abandoned_calls = False
        """A wait raised before every actor answered (`_get` fails on the first error): the
        others may still be blocked, e.g. in the dense all-reduce of a step their peer left,
        so `close` must not wait on them."""
        try:
            init_local_ray(
                address=address or cfg.cluster.address, include_dashboard=cfg.cluster.dashboard
            )
            self._start_storage_nodes()
            self._start_gpu_workers()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- set-up

    def _start_storage_nodes(self) -> None:
        import ray

        for node in range(self.plan.num_nodes):
            shards = self.plan.shards_for_node(node, self.tables)
            self._nodes.append(
                launch_storage_node(self.cfg, node, shards, self._token, self.num_workers)
            )
        # _get, not ray.get: a node's user error (a full or read-only flash_dir) must reach
        # the CLI as its own one line, not wrapped in the actor's traceback
        _get([n.start.remote() for n in self._nodes], component="storage-node")
        self.node_addresses = ray.get([n.addresses.remote() for n in self._nodes])

    def _start_gpu_workers(self) -> None:
        import ray

        plan = self.plan.to_dict()
        self._workers = [
            launch_gpu_worker(self.cfg, rank, plan, self.node_addresses, self._token)
            for rank in range(self.num_workers)
        ]
        if self.num_workers > 1:
            host, port = ray.get(self._workers[0].rendezvous_address.remote())
            _get(
                [w.init_process_group.remote(host, port) for w in self._workers],
                component="gpu-worker",
            )
        else:
            ray.get(self._workers[0].ping.remote())

    # ----------------------------------------------------------------- StepEngine

    def train_step(self, step: int, batch: Batch) -> float:
        """One synchronous step; returns the whole batch's mean loss (before the update).

        Each worker gets its share of the batch and routes it to the storage nodes itself;
        when `prefetch` already handed the workers this very batch, they hold their routed
        shares and get only the step.

        Raises:
            DataError: an index outside its table anywhere in the batch, before any worker
                starts (`routing.check_indices`); the engine can take the next step.
        """
        check_indices(batch.sparse, self.plan, self.tables)
        held = self._held.pop(step, None) is batch
        for old in [s for s in self._held if s < step]:
            del self._held[old]
        parts: list[Batch | None] = [None] * self.num_workers
        if not held:
            parts = list(batch.split(self.num_workers))
        ahead, self._ahead = self._ahead, []
        shares = [list(later.split(self.num_workers)) for _, later in ahead]
        refs = [
            worker.train_step.remote(
                step, part, [(s, split[rank]) for (s, _), split in zip(ahead, shares, strict=True)]
            )
            for rank, (worker, part) in enumerate(zip(self._workers, parts, strict=True))
        ]
        losses = self._wait(refs)
        return float(sum(losses) / len(losses))

    def flush(self) -> None:
        """Wait until every worker's gradient pushes are acknowledged (updates applied).

        Raises:
            the first refusal of a push (e.g. a StorageNodeError) a worker collected.
        """
        if self._workers:
            self._wait([w.flush.remote() for w in self._workers])

    def prefetch(self, step: int, batch: Batch) -> None:
        """Lookahead: hand each worker its share of `batch`, the batch of a future `step`.

        The shares go with the next `train_step` call (each worker takes them before that
        step: one Ray call per worker and step, not two). Each worker routes its share once,
        sends the nodes its distinct rows to stage and pin for `step` (a node stages them
        from flash into its cache while the current step runs; see `ndp.pipeline`), and
        keeps the routed share for the early lookup and for `train_step(step)`. A share that
        cannot be routed (bad index) is refused by that step's `train_step`.
        """
        self._held[step] = batch
        self._ahead.append((step, batch))

    def predict(self, step: int, batch: Batch) -> torch.Tensor:
        """Logits [B] through the storage nodes, without updates (`step`: next training step)."""
        check_indices(batch.sparse, self.plan, self.tables)
        self.flush()
        parts = batch.split(self.num_workers)
        refs = [
            worker.predict.remote(step, part)
            for worker, part in zip(self._workers, parts, strict=True)
        ]
        return torch.cat(self._wait(refs))

    def timings(self) -> dict[str, float]:
        """Per-phase seconds summed over workers plus link bytes, since the last call.

        `storage_update_s` is the nodes' time applying updates (summed over nodes; it runs
        beside the workers' phases, not inside them). Does not flush: the last step's push
        may still be in flight, so the node counters here may lag it by one update.
        """
        merged: dict[str, float] = defaultdict(float)
        for worker_timings in self._wait([w.timings.remote() for w in self._workers]):
            for key, value in worker_timings.items():
                merged[key] += value
        stats = self._wait([n.stats.remote() for n in self._nodes], "storage-node")
        for node, node_stats in enumerate(stats):  # cumulative, per storage node
            merged[f"node{node}_cache_hit_rate"] = node_stats["cache"]["hit_rate"]
            merged[f"node{node}_flash_bytes_read"] = node_stats["flash"]["bytes_read"]
            update_s = node_stats["update_seconds"]
            merged["storage_update_s"] += update_s - self._update_seconds.get(node, 0.0)
            self._update_seconds[node] = update_s
        return dict(merged)

    def wire_bytes(self) -> dict[str, int]:
        """Bytes on the wire to and from the storage nodes since the engine started, per
        `<Rpc>.<sent|received>[.float_data]`: the workers' clients (lookups, pushes, early
        lookups, prefetches: every RPC of the job), measured message lengths. Cumulative:
        callers take differences."""
        merged: dict[str, int] = defaultdict(int)
        for per_worker in self._wait([w.wire_bytes.remote() for w in self._workers]):
            for key, value in per_worker.items():
                merged[key] += value
        return dict(merged)

    def node_stats(self) -> list[dict]:
        """Each storage node's counters (cache hits, bytes, steps) after the last step.

        Flushes first: the last step's gradient push may not be applied yet, and its update
        reads rows (counted accesses) and moves `applied_step`.
        """
        self.flush()
        return self._wait([n.stats.remote() for n in self._nodes], "storage-node")

    # ----------------------------------------------------------------- model access

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The dense half's parameters (all workers hold the same replica; rank 0's)."""
        return self._wait(self._workers[0].dense_state_dict.remote(), "gpu-worker", 0)

    def table_rows(self, table_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole table's weights [rows, D] and optimizer state [rows, S], gathered from its pieces."""
        self.flush()
        weights, states = [], []
        for piece in self.plan.pieces_of(table_name):
            rows = torch.arange(piece.row_start, piece.row_end, dtype=torch.int64)
            w, s = self._wait(
                self._nodes[piece.node].read_rows.remote(table_name, rows),
                f"storage-node-{piece.node}",
            )
            weights.append(w)
            states.append(s)
        return torch.cat(weights), torch.cat(states)

    # ----------------------------------------------------------------- checkpoints, recovery

    def export_state(self) -> EngineState:
        """Everything a checkpoint needs, taken at the current step barrier (see ndp.checkpoint).

        Rows are read from the nodes through their caches (`read_rows` does not admit or
        count), chunk by chunk, so the checkpoint sees exactly the rows training sees.
        """
        from ndp.checkpoint import EngineState, TableChunk, chunk_ranges

        self.flush()

        def chunks() -> Iterator[TableChunk]:
            for table in self.tables:
                for piece in self.plan.pieces_of(table.name):
                    for lo, hi in chunk_ranges(piece.row_start, piece.row_end):
                        rows = torch.arange(lo, hi, dtype=torch.int64)
                        w, s = self._wait(
                            self._nodes[piece.node].read_rows.remote(table.name, rows),
                            f"storage-node-{piece.node}",
                        )
                        yield TableChunk(table.name, lo, hi, torch.cat([w, s], dim=1).numpy())

        optimizer_steps = {int(s["optimizer_step"]) for s in self.node_stats()}
        assert len(optimizer_steps) == 1, f"nodes disagree on the optimizer step: {optimizer_steps}"
        return EngineState(
            dense_model=self.dense_state_dict(),
            dense_optimizer=self._wait(
                self._workers[0].optimizer_state_dict.remote(), "gpu-worker-0"
            ),
            tables=chunks(),
            sparse_optimizer_step=optimizer_steps.pop(),
            plan=self.plan.to_dict(),
        )

    def import_state(self, checkpoint: Checkpoint) -> None:
        """Load a checkpoint into the running actors (this engine's plan may differ from the
        checkpoint's: each node gets its pieces re-sliced from the global-row chunks).

        The checkpoint is read here and each node's rows are streamed to it through Ray, a
        few MiB per call and at most `RESTORE_CALLS_IN_FLIGHT` calls ahead; the node writes
        its restore directory on its own machine (`storage_node.restore`), so nodes need no
        file system shared with this process. Two phases, so that a refusal changes
        nothing anywhere: every node receives and verifies its stream (complete, sha256 per
        table, plan) first; only then do the nodes replace their state, and the workers
        load the dense half last.
        """
        import ray

        checkpoint.check_fits(self.cfg)
        self.flush()  # no push of the old state may land after the restore
        try:
            for node in range(len(self._nodes)):
                self._stream_restore(node, checkpoint)
        except BaseException:
            for actor in self._nodes:
                _quietly(lambda a=actor: ray.get(a.restore_abort.remote(), timeout=30))
            raise
        self._wait([n.restore_commit.remote() for n in self._nodes], "storage-node")
        model, optimizer = checkpoint.dense_model(), checkpoint.dense_optimizer()
        self._wait([w.load_dense_state.remote(model, optimizer) for w in self._workers])

    def _stream_restore(self, node: int, checkpoint: Checkpoint) -> None:
        """Send node `node` its rows of `checkpoint` and have it verify them (not commit)."""
        from ndp.checkpoint import RESTORE_CALLS_IN_FLIGHT, node_restore_header, node_restore_rows
        from storage_node.restore import RowsDigest

        actor = self._nodes[node]
        header = node_restore_header(
            checkpoint, self.plan.shards_for_node(node, self.tables), self.cfg
        )
        self._wait(actor.restore_begin.remote(header), "storage-node", node)
        digest, in_flight = RowsDigest(), deque()
        for chunk in node_restore_rows(checkpoint, header):
            digest.update(chunk.table_name, chunk.records)
            in_flight.append(
                actor.restore_rows.remote(chunk.table_name, chunk.row_start, chunk.records)
            )
            if len(in_flight) > RESTORE_CALLS_IN_FLIGHT:
                self._wait(in_flight.popleft(), "storage-node", node)
        while in_flight:
            self._wait(in_flight.popleft(), "storage-node", node)
        self._wait(actor.restore_finish.remote(digest.hexdigests()), "storage-node", node)

    def restart(self) -> None:
        """Kill every storage-node and GPU-worker actor (dead or alive) and start fresh ones.

        The fresh nodes hold initial rows; call `import_state` to roll back to a checkpoint.
        """
        import ray

        self._ahead, self._held = [], {}  # the fresh workers hold no shares
        self._abandoned_calls = False
        names = [f"ndp-gpu-worker-{r}" for r in range(len(self._workers))]
        names += [f"ndp-storage-node-{n}" for n in range(len(self._nodes))]
        for actor in [*self._workers, *self._nodes]:
            _quietly(lambda a=actor: ray.kill(a, no_restart=True))
        self._workers, self._nodes = [], []
        self._update_seconds = {}
        for name in names:  # a killed actor's name is released asynchronously
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(name)
                except ValueError:
                    break
                time.sleep(0.1)
        self._start_storage_nodes()
        self._start_gpu_workers()

    def component_pids(self) -> dict[str, int]:
        """{"storage-node-<n>" | "gpu-worker-<r>": process id} (fault tests kill them)."""
        import os

        actors = {f"storage-node-{n}": a for n, a in enumerate(self._nodes)}
        actors.update({f"gpu-worker-{r}": a for r, a in enumerate(self._workers)})
        pids = _get([a.__ray_call__.remote(lambda _self: os.getpid()) for a in actors.values()])
        return dict(zip(actors, pids, strict=True))

    def _wait(
        self, refs: Any, component: ComponentKind = "gpu-worker", index: int | None = None
    ) -> Any:
        """`_get` with the job's deadline (`cluster.step_timeout_s`): a hung actor is named."""
        try:
            return _get(
                refs, timeout_s=self.cfg.cluster.step_timeout_s, component=component, index=index
            )
        except BaseException:
            self._abandoned_calls = True
            raise

    # ----------------------------------------------------------------- tear-down

    def close(self) -> None:
        """Stop workers and storage nodes (servers closed, flash dirs removed), then Ray if ours."""
        import ray

        self._ahead, self._held = [], {}
        if not ray.is_initialized():
            return
        # After a failed call some workers may be blocked for good (in the all-reduce of a
        # step a peer left): flushing or closing them would wait cluster.step_timeout_s each
        # (10 minutes by default), so they are killed at once; the failed step's update is
        # lost either way.
        graceful = not self._abandoned_calls
        if graceful:
            _quietly(self.flush)  # the last step's update lands before the nodes shut down
        for worker in self._workers:
            if graceful:
                _quietly(lambda w=worker: ray.get(w.close.remote(), timeout=30))
            _quietly(lambda w=worker: ray.kill(w))
        for node in self._nodes:
            _quietly(lambda n=node: ray.get(n.shutdown.remote(), timeout=30))
            _quietly(lambda n=node: ray.kill(n))
        self._workers, self._nodes = [], []
        if self._started_ray:
            ray.shutdown()

    def __enter__(self) -> NdpEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _get(
    refs: Any,
    *,
    timeout_s: float | None = None,
    component: ComponentKind = "actor",
    index: int | None = None,
) -> Any:
    """ray.get that re-raises a user error (NDPError) from an actor as itself.

    Args:
        refs: one ObjectRef or a list (element i from actor `<component>-<i>`).
        timeout_s: deadline for all of them (`cluster.step_timeout_s`); None: wait forever.
        component: the kind of actor the refs come from (names them in errors).
        index: for one ref, its actor's index (`<component>-<index>`).

    Raises:
        ComponentTimeoutError: some refs were not ready in time; names their actors. An actor
            that hangs without dying (stopped, deadlocked) is only noticed this way.
        ComponentDiedError: an actor died or is unreachable (Ray's `RayActorError`); names it.
    """
    import ray

    many = isinstance(refs, list)
    refs_list = list(refs) if many else [refs]
    positions = {ref: i for i, ref in enumerate(refs_list)} if many else {refs: index}

    def actor_name(ref: Any) -> str:
        position = positions[ref]
        return component if position is None else f"{component}-{position}"

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        pending = refs_list  # fail on the first error, not behind a blocked peer
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                raise ComponentTimeoutError(
                    f"{', '.join(map(actor_name, pending))} did not answer within "
                    f"cluster.step_timeout_s={timeout_s:g}s (hung or stopped without dying); "
                    "raise cluster.step_timeout_s if its steps are legitimately slower",
                    component=component,
                )
            try:
                ray.get(ready)
            except ray.exceptions.RayActorError as exc:
                raise ComponentDiedError(
                    f"{actor_name(ready[0])} died or cannot be reached "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                    component=component,
                ) from exc
        values = ray.get(refs_list)
        return values if many else values[0]
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, NDPError):
            raise cause from None
        raise


def _quietly(action: Any) -> None:
    try:
        action()
    except Exception as exc:  # tear-down must go on past a dead actor
        log.debug("tear-down step failed: %s", exc)
