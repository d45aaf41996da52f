"""The dense half of one data-parallel rank: the GPU worker's pure core.

A worker holds a full replica of the dense half. For its share of a batch it asks every
storage node for the pooled vectors of the rows that node owns (concurrently, one call per
node), adds up the partials of row-wise pieces, runs the dense forward and backward, averages
the dense gradients with the other workers (torch.distributed: gloo on cpu, nccl on cuda) and
sends d(loss)/d(pooled) back to the storage nodes, which apply the sparse optimizer.

Off the critical path (lookahead, `ndp.pipeline`):

* the gradient push leaves from inside backward, as soon as every pooled vector's gradient
  exists (`_PushOnceReady`), so the nodes apply the update while the bottom MLP's backward,
  the all-reduce and the dense optimizer step still run;
* the gradient push is sent, not waited for: `train_step` returns while the nodes apply the
  update. The node's step barrier already orders the next lookup after that update, so the
  math is unchanged; the acknowledgements are collected (and any refusal raised) during the
  next step's lookup, or by `flush()` before anything that must see final state (predict,
  reading rows, checkpoints, close).
* a batch read ahead comes once, with `prefetch(step, share)`: the worker routes it then,
  sends its distinct rows to the nodes (`Prefetch`), and keeps the share with its routed
  bags. Those same bags are pooled early (`EarlyLookup`, right after batch s's pooled
  vectors arrive, when step s + 1 is held: they pool while s is in the dense half; the node
  corrects them for update s) and looked up at step s + 1, which the coordinator starts
  without shipping the batch again. So each batch is shipped once and routed once, and a
  node that kept the early pool answers the lookup without its bags (`use_early`): the bags
  are the kept ones by construction (the same objects), never compared.

Why the loss is divided by the number of workers before backward: the reference trains on the
mean loss of the whole batch B. Worker r holds B/M samples, so d(mean_B)/d(theta) is the sum
over workers of d(mean_{B/M})/d(theta) / M: summing (not averaging) the scaled dense gradients
and sending the scaled pooled gradients (which the nodes sum over workers) gives exactly the
reference's gradients.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from gpu_worker.node_api import NodeApi, Reply
from ndp.config import Config
from ndp.data.batch import Batch
from ndp.errors import CollectiveError, DataError
from ndp.model.dense_step import DenseStep
from ndp.plan import Bags, ShardingPlan
from ndp.routing import distinct_rows, reassemble, route_gradients, route_lookup
from storage_node.client import EarlyLookupAnswer, link_bytes

T = TypeVar("T")

RoutedBags = Mapping[int, Mapping[str, Bags]]
"""{node: {feature: Bags}} for one worker's share of a batch (from `ndp.routing.route_lookup`)."""


class DenseWorker:
    """One data-parallel rank of the dense half.

    Args:
        rank: this worker's rank in [0, world_size).
        world_size: number of GPU workers M.
        cfg: the run's config.
        plan: the sharding plan (as `ShardingPlan.to_dict()` or the object).
        clients: per storage node, in node order, its `NodeApi`: a
            `storage_node.client.StorageClient` (the actor, `gpu_worker.actor`, connects
            them), or an `InProcessNode` over a core in this process (tests). The worker
            closes them.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        cfg: Config,
        plan: ShardingPlan | dict,
        clients: Sequence[NodeApi],
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.cfg = cfg
        self.plan = plan if isinstance(plan, ShardingPlan) else ShardingPlan.from_dict(plan)
        self.tables = cfg.model.effective_tables()
        self.dense = DenseStep(cfg)
        self.device = self.dense.device
        self.clients = list(clients)
        self._clock = self.dense.clock
        self._counters: dict[str, float] = defaultdict(float)
        self._wire_total: dict[str, int] = defaultdict(int)
        """Bytes on the wire since start, per `<Rpc>.<sent|received>[.float_data]`."""
        self._wire_at_timings: dict[str, int] = {}
        self._group_ready = world_size == 1
        self._pushes_in_flight: list[Reply[bool]] = []
        self._push_with_lookup = cfg.pipeline.push == "with_next_lookup"
        self._held_push: tuple[int, dict[int, dict[str, torch.Tensor]]] | None = None
        """(step, {node: gradients}) held for the next step's lookups (`pipeline.push`)."""
        self._prefetches_in_flight: list[tuple[int, int, Reply[bool]]] = []
        """(step, node, reply) of prefetches sent; collected by that step's `train_step` or
        `flush`."""
        self._resident_nodes: set[int] = set()
        """Nodes whose last early lookup or prefetch answered that every row they hold is
        resident for good: lookahead sends them no prefetches, nor early lookups in exact mode
        (those would stage nothing and defer every pool), until the next `flush` (after which
        a restore or resharding may have replaced their rows)."""
        self._held_prefetches: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        """step -> {node: rows}: prefetches waiting to ride on an early lookup."""
        self._ahead: dict[int, _RoutedShare] = {}
        """Shares of batches read ahead (`prefetch`), by step, with their routed bags."""
        self._early_in_flight: list[_EarlySent] = []
        self._early_kept: dict[tuple[int, int], Mapping[str, Bags]] = {}
        """(step, node) -> bags of an early lookup the node kept: its lookup sends no bags."""
        self._early_pooling = cfg.pipeline.early_pooling and cfg.pipeline.lookahead_depth >= 1
        self._early_correct = cfg.pipeline.mode == "exact"

    # ----------------------------------------------------------------- process group

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        """Join the workers' torch.distributed group (gloo on cpu, nccl on cuda)."""
        if self.world_size == 1:
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=self.world_size,
        )
        self._group_ready = True

    # ----------------------------------------------------------------- steps

    def prefetch(self, step: int, batch: Batch) -> None:
        """Lookahead: take this worker's share of a future step's batch, once.

        Routes it (`route_lookup`), sends each node the distinct rows of its bags to stage
        and pin for `step` (`Prefetch`, not waited for: refusals are raised with the next
        step's lookup or by `flush`), and keeps the share and its routed bags for the early
        lookup (at step - 1) and the lookup (`train_step(step)` without a batch).

        Why the worker routes and not the coordinator: the routed bags are ~2 tensors per
        feature and node, each a view of the batch's value tensor, and shipping them through
        Ray pickles that whole storage once per view (26x the batch at 26 features); the
        batch itself travels as a handful of tensors. A share whose indices fall outside
        their table is kept with its `DataError`, raised by `train_step(step)` before
        anything of that step is sent, as an unprefetched batch's would be.
        """
        with self._clock.phase("route_s"):  # routing, and sending the rows it found
            self._counters["shares_received"] += 1
            try:
                routed = self._route(batch)
            except DataError as error:
                self._ahead[step] = _RoutedShare(batch, {}, error)
                return
            self._ahead[step] = _RoutedShare(batch, routed)
            staging = {n: b for n, b in routed.items() if n not in self._resident_nodes}
            self._counters["prefetches_skipped"] += len(routed) - len(staging)
            if not staging:
                return
            rows = distinct_rows(staging, self.plan)
            if self._early_pooling:  # sent with an early lookup (`_early_lookups`)
                self._held_prefetches[step] = rows
            else:
                self._send_prefetches(step, rows)

    def _send_prefetches(self, step: int, rows: dict[int, dict[str, torch.Tensor]]) -> None:
        self._prefetches_in_flight += [
            (step, node, self.clients[node].prefetch_async(step, node_rows))
            for node, node_rows in rows.items()
        ]

    def _send_held_prefetches(self, up_to_step: int | None = None) -> None:
        """Send held prefetches (of steps <= `up_to_step`, default all) in calls of their own."""
        for step in sorted(self._held_prefetches):
            if up_to_step is None or step <= up_to_step:
                self._send_prefetches(step, self._held_prefetches.pop(step))

    def train_step(
        self,
        step: int,
        batch: Batch | None = None,
        ahead: Sequence[tuple[int, Batch]] = (),
    ) -> float:
        """Steps 2-5 of the design's data path for this worker's share; returns its mean loss.

        Args:
            batch: this worker's share of step `step`'s batch, routed here; None: the share
                `prefetch(step, ...)` already delivered and routed (lookahead).
            ahead: (later step, share) pairs read ahead, each taken by `prefetch` first: the
                coordinator delivers them with the step instead of in calls of their own.

        With early pooling on and step + 1's share held (`prefetch`), its routed bags are
        pooled on the nodes while this step's dense half runs. Returns before the nodes
        acknowledge the gradient push (see the module docstring).

        Raises:
            DataError: an index outside its table in this step's share, before anything of
                this step is sent.
        """
        for later_step, later_share in ahead:
            self.prefetch(later_step, later_share)
        share = self._take_share(step, batch)
        self._send_held_prefetches(up_to_step=step + 1)  # needed before the next early lookup
        self._collect_prefetches(up_to_step=step)
        self._resolve_early_lookups(keep=True)
        pooled = self._lookup(step, share.routed, train=True)
        upcoming = self._ahead.get(step + 1)
        if self._early_pooling and upcoming is not None and upcoming.error is None:
            with self._clock.phase("early_lookup_s"):
                self._early_lookups(step + 1, upcoming.routed)
        else:
            self._send_held_prefetches()
        batch = share.batch
        leaves = self.dense.leaves(pooled)
        early_push = _PushOnceReady(lambda grads: self._push_gradients(step, grads), leaves)
        # the push leaves from inside backward: `gradient_push_s`, not `dense_compute_s`
        loss = self.dense.forward_backward(
            batch.dense, leaves, batch.labels, loss_divisor=self.world_size
        )
        early_push.finish()
        with self._clock.phase("allreduce_s"):
            self._sum_dense_gradients()
        self.dense.optimizer_step()
        return float(loss)

    def _early_lookups(self, step: int, routed: RoutedBags) -> None:
        """Send `step`'s bags to be pooled early, each node's call carrying the rows of the
        next held prefetch for that node (one call per node instead of two). Nodes whose
        every row is resident get none in exact mode (`_resident_nodes`)."""
        if self._early_correct:
            sending = {n: b for n, b in routed.items() if n not in self._resident_nodes}
            self._counters["early_lookups_skipped"] += len(routed) - len(sending)
            routed = sending
        riding: dict[int, dict[str, torch.Tensor]] = {}
        prefetch_step = min(self._held_prefetches, default=None)
        if prefetch_step is not None:
            riding, alone = _split_by_node(self._held_prefetches.pop(prefetch_step), routed)
            alone = {n: rows for n, rows in alone.items() if n not in self._resident_nodes}
            if alone:
                self._send_prefetches(prefetch_step, alone)
        self._early_in_flight = [
            _EarlySent(
                step,
                node,
                bags,
                self.clients[node].early_lookup_async(
                    step,
                    self.rank,
                    bags,
                    correct=self._early_correct,
                    prefetch=None if node not in riding else (prefetch_step, riding[node]),
                ),
            )
            for node, bags in routed.items()
        ]

    @torch.no_grad()
    def predict(self, step: int, batch: Batch) -> torch.Tensor:
        """Logits [B/M] on CPU through the same lookup path, without any update."""
        self.flush()
        pooled = self._lookup(step, route_lookup(batch.sparse, self.plan, self.tables), train=False)
        return self.dense.predict(batch.dense, pooled).float().cpu()

    def flush(self) -> None:
        """Wait for every gradient push and early lookup in flight; raise the first refusal.

        Call before anything that must see the state after the last step (the coordinator
        does: predict, table rows, checkpoints, close).
        """
        self._send_held_push()
        self._send_held_prefetches()
        with self._clock.phase("push_wait_s"):
            _resolve_all(self._take_pushes())
        self._collect_prefetches()
        # forget the kept pools: what runs after a flush may drop them on the nodes (restore,
        # write_rows), so the next lookup sends its bags (a node still holding the pool
        # matches them and answers it anyway); for the same reason, ask again which nodes
        # hold every row
        self._resolve_early_lookups(keep=False)
        self._resident_nodes.clear()

    def timings(self) -> dict[str, float]:
        """Seconds per phase and counters since the last call.

        `link_bytes_in` / `link_bytes_out`: the bytes of every message this worker's gRPC
        clients received / sent since the last call (measured lengths, `wire_bytes`).
        """
        total = self.wire_bytes()
        in_bytes, out_bytes = link_bytes(total)
        last_in, last_out = link_bytes(self._wire_at_timings)
        self._counters["link_bytes_in"] += in_bytes - last_in
        self._counters["link_bytes_out"] += out_bytes - last_out
        self._wire_at_timings = total
        out = {**self._clock.take(), **self._counters}
        self._counters = defaultdict(float)
        return out

    def wire_bytes(self) -> dict[str, int]:
        """Bytes on the wire since this worker started, per `<Rpc>.<sent|received>` (and
        `.float_data`: the tensor bytes inside), counted by its gRPC clients. Cumulative, so
        any number of readers can take differences (a reply counts once it is collected)."""
        for client in self.clients:
            for key, value in client.take_wire_bytes().items():
                self._wire_total[key] += value
        return dict(self._wire_total)

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The dense half's parameters, on CPU."""
        state = self.dense.dense_half.state_dict()
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def optimizer_state_dict(self) -> dict[str, Any]:
        return self.dense.optimizer.state_dict()

    def load_dense_state(self, model_state: dict, optimizer_state: dict | None) -> None:
        self.dense.dense_half.load_state_dict(model_state)
        if optimizer_state is not None:
            self.dense.optimizer.load_state_dict(optimizer_state)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        if self.world_size > 1 and self._group_ready and dist.is_initialized():
            dist.destroy_process_group()
            self._group_ready = False

    # ----------------------------------------------------------------- internals

    def _take_pushes(self) -> list[Reply[bool]]:
        futures, self._pushes_in_flight = self._pushes_in_flight, []
        return futures

    def _collect_prefetches(self, up_to_step: int | None = None) -> None:
        """Collect the prefetch replies of steps <= `up_to_step` (all with None): raise the
        first refusal, note the nodes that hold every row (`_resident_nodes`).

        Why collected at their own step: a prefetch was sent `lookahead_depth` steps earlier
        and is long answered then, so collecting it never waits; a refusal surfaces there.
        """
        taken = [
            (n, r)
            for s, n, r in self._prefetches_in_flight
            if up_to_step is None or s <= up_to_step
        ]
        self._prefetches_in_flight = [
            (s, n, r)
            for s, n, r in self._prefetches_in_flight
            if up_to_step is not None and s > up_to_step
        ]
        answers = _resolve_all([reply for _, reply in taken])
        self._resident_nodes.update(
            node for (node, _), resident in zip(taken, answers, strict=True) if resident
        )

    def _route(self, batch: Batch) -> RoutedBags:
        """The one place a share is routed: {node: {feature: Bags}} (counted per share)."""
        routed = route_lookup(batch.sparse, self.plan, self.tables)
        self._counters["shares_routed"] += 1
        return routed

    def _take_share(self, step: int, batch: Batch | None) -> _RoutedShare:
        """Step `step`'s share with its routed bags: `batch` routed now, else the one
        `prefetch` kept; shares of this and earlier steps are dropped."""
        held = self._ahead.pop(step, None)
        for old in [s for s in self._ahead if s < step]:
            del self._ahead[old]
        if batch is not None:
            with self._clock.phase("route_s"):
                self._counters["shares_received"] += 1
                return _RoutedShare(batch, self._route(batch))
        if held is None:
            raise RuntimeError(
                f"gpu-worker-{self.rank}: step {step} came without its batch, and none was "
                "prefetched for it"
            )
        if held.error is not None:
            raise held.error
        return held

    def _resolve_early_lookups(self, *, keep: bool) -> None:
        """Collect the early lookups in flight; with `keep`, remember the pools nodes kept."""
        sent, self._early_in_flight = self._early_in_flight, []
        with self._clock.phase("early_lookup_s"):
            answers = _resolve_all([early.reply for early in sent])
        self._early_kept = {
            (early.step, early.node): early.bags
            for early, answer in zip(sent, answers, strict=True)
            if keep and answer.kept
        }
        self._resident_nodes.update(
            early.node
            for early, answer in zip(sent, answers, strict=True)
            if answer.every_row_resident
        )

    def _answers_from_early_pool(self, step: int, node: int, bags: Mapping[str, Bags]) -> bool:
        """True when `node` keeps this worker's early pool of these very bags for `step`.

        Identity, not equality: a share is routed once, and its early lookup and lookup send
        the same bags objects; a share shipped again with its step was routed again, and its
        lookup sends its bags (the node compares them with its kept pool).
        """
        return self._early_kept.get((step, node)) is bags

    def _lookup(self, step: int, routed: RoutedBags, *, train: bool) -> dict[str, torch.Tensor]:
        riding = self._pushes_riding_on(step, routed) if train else {}
        with self._clock.phase("lookup_wait_s"):
            futures = {
                node: self.clients[node].lookup_async(
                    step,
                    self.rank,
                    bags,
                    train=train,
                    use_early=train and self._answers_from_early_pool(step, node, bags),
                    previous_push=riding.get(node),
                )
                for node, bags in routed.items()
            }
            self._early_kept = {}
        # The previous step's push acknowledgements: the nodes answer this lookup only after
        # that update anyway, so waiting here costs nothing the barrier does not.
        with self._clock.phase("push_wait_s"):
            _resolve_all(self._take_pushes())
        with self._clock.phase("lookup_wait_s"):
            partials = {node: future.result() for node, future in futures.items()}
        return reassemble(partials, self.plan)

    def _push_gradients(self, step: int, grads: dict[str, torch.Tensor]) -> None:
        """Step `step`'s gradients: held for the next lookups (`pipeline.push` =
        `with_next_lookup`), or sent now, each node's in its own call."""
        self._send_held_push()  # never two held: a step's push goes before the next one's
        if self._push_with_lookup:
            with self._clock.phase("gradient_push_s"):  # routing; it leaves with the lookup
                self._held_push = (step, route_gradients(grads, self.plan))
            return
        self._send_pushes(step, route_gradients(grads, self.plan))

    def _send_pushes(self, step: int, routed: dict[int, dict[str, torch.Tensor]]) -> None:
        with self._clock.phase("gradient_push_s"):  # sending only; acknowledged in the next step
            self._pushes_in_flight += [
                self.clients[node].push_gradients_async(step, self.rank, node_grads)
                for node, node_grads in routed.items()
            ]

    def _send_held_push(self) -> None:
        """Send a held push in calls of its own (before a flush, or when no lookup of the
        next step will carry it)."""
        held, self._held_push = self._held_push, None
        if held is not None:
            self._send_pushes(*held)

    def _pushes_riding_on(
        self, step: int, routed: RoutedBags
    ) -> dict[int, dict[str, torch.Tensor]]:
        """{node: gradients of step - 1} that the lookups of `step` carry; the held push's
        other nodes (or a push of another step) are sent alone first."""
        held, self._held_push = self._held_push, None
        if held is None:
            return {}
        held_step, per_node = held
        if held_step != step - 1:
            self._send_pushes(held_step, per_node)
            return {}
        riding, alone = _split_by_node(per_node, routed)
        if alone:
            self._send_pushes(held_step, alone)
        return riding

    def _sum_dense_gradients(self) -> None:
        """All-reduce (sum) the dense gradients, flattened into one tensor.

        Raises:
            CollectiveError: the all-reduce failed (a peer died or cannot be reached; gloo
                says so with a bare RuntimeError, so it is named here, where it is known).
        """
        if self.world_size == 1:
            return
        grads = [p.grad for p in self.dense.dense_half.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        try:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        except RuntimeError as error:
            raise CollectiveError(
                f"gpu-worker-{self.rank}: the dense all-reduce of {self.world_size} GPU workers "
                f"failed (a peer died or cannot be reached): {_first_line(error)}",
                component="gpu-worker",
            ) from error
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@dataclass
class _RoutedShare:
    """A worker's share of one step's batch and its bags, routed once."""

    batch: Batch
    routed: RoutedBags
    """{node: {feature: Bags}} (`route_lookup`); used by the prefetch, early lookup, lookup."""
    error: DataError | None = None
    """Why the share could not be routed (raised by its `train_step`)."""


@dataclass
class _EarlySent:
    """An early lookup in flight: which step's bags went to which node."""

    step: int
    node: int
    bags: Mapping[str, Bags]
    reply: Reply[EarlyLookupAnswer]
    """Whether the node kept the pooled vectors, and whether it holds every row."""


class _PushOnceReady:
    """Sends d(loss)/d(pooled) as soon as backward has produced it for every feature.

    Why from a hook: the pooled vectors' gradients come out of the interaction's backward,
    before the bottom MLP's backward, the dense all-reduce and the optimizer step run; pushing
    then lets the storage nodes apply the update while the worker finishes those, instead of
    after them (the next lookup waits for that update).

    Args:
        push: called once with {feature: gradient [B, D] on CPU}.
        leaves: {feature: pooled vectors, requires_grad} of this step.
    """

    def __init__(
        self, push: Callable[[dict[str, torch.Tensor]], None], leaves: Mapping[str, torch.Tensor]
    ) -> None:
        self._push = push
        self._leaves = leaves
        self._grads: dict[str, torch.Tensor] = {}
        self._sent = False
        for feature, leaf in leaves.items():
            leaf.register_hook(self._collector(feature))

    def _collector(self, feature: str) -> Callable[[torch.Tensor], None]:
        def collect(grad: torch.Tensor) -> None:
            self._grads[feature] = grad.detach().cpu()
            if len(self._grads) == len(self._leaves):
                self._send()

        return collect

    def finish(self) -> None:
        """After backward: push now if some feature got no gradient (zeros for it)."""
        if not self._sent:
            for feature, leaf in self._leaves.items():
                self._grads.setdefault(feature, torch.zeros(leaf.shape, dtype=torch.float32))
            self._send()

    def _send(self) -> None:
        self._sent = True
        self._push({feature: self._grads[feature] for feature in self._leaves})


def _split_by_node(
    per_node: dict[int, dict[str, torch.Tensor]], routed: RoutedBags
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, dict[str, torch.Tensor]]]:
    """(the parts for nodes `routed` sends a call to: they ride on it; the others: they go
    alone) of something held per node, a push or a prefetch."""
    riding = {node: part for node, part in per_node.items() if node in routed}
    alone = {node: part for node, part in per_node.items() if node not in routed}
    return riding, alone


def _resolve_all(futures: Sequence[Reply[T]]) -> list[T]:
    """Wait for every future (none left behind), then raise the first error, if any; else
    their values, in order."""
    first: BaseException | None = None
    values = []
    for future in futures:
        try:
            values.append(future.result())
        except Exception as error:
            first = first or error
    if first is not None:
        raise first
    return values


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__
