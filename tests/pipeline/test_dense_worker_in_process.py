"""A GPU worker over storage-node cores in this process: no Ray, no gRPC.

`DenseWorker` takes its nodes as `NodeApi`s; `InProcessNode` serves one over a
`StorageNodeCore`. One worker on two nodes (a table split row-wise across them, caches small
enough to evict) trains like the single-process reference, with and without early pooling.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from model.tiny import tiny_config

from gpu_worker.node_api import InProcessNode, NodeApi, NodeCore
from gpu_worker.worker import DenseWorker
from ndp.config import Config
from ndp.data.batch import Batch
from ndp.data.loader import build_datasets
from ndp.errors import DataError
from ndp.pipeline import with_lookahead
from ndp.plan import Bags
from ndp.planner import plan_shards
from ndp.reference import ReferenceEngine
from storage_node.client import StorageClient
from storage_node.errors import IndexOutOfRangeError
from storage_node.node import StorageNodeCore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 8
BATCH = 16


def _config(cache_bytes: int = 2048, **pipeline) -> Config:
    """`model.tiny`'s three tables; the mean-pooled `t1` split row-wise over both nodes (the
    whole-bag divisor crosses pieces), caches of a few rows (rows go to flash and back)
    unless `cache_bytes` says otherwise."""
    return tiny_config(
        data={"synthetic": {"num_samples": STEPS * BATCH, "num_val_samples": 32, "seed": 7}},
        optimizer={
            "dense": {"name": "adagrad", "lr": 0.05},
            "sparse": {"name": "rowwise_adagrad", "lr": 0.05},
        },
        train={"batch_size": BATCH, "seed": 3, "device": "cpu"},
        cluster={
            "num_storage_nodes": 2,
            "num_gpu_workers": 1,
            "constraints": {"t1": {"sharding_type": "row_wise"}},
        },
        storage={"cache_bytes": cache_bytes},
        pipeline=pipeline,
    )


def _cores(cfg: Config, plan, tmp_path) -> list[StorageNodeCore]:
    tables = cfg.model.effective_tables()
    return [
        StorageNodeCore(
            node_id=str(node),
            shards=plan.shards_for_node(node, tables),
            storage=cfg.storage,
            optimizer=cfg.optimizer.sparse,
            seed=cfg.train.seed,
            flash_dir=tmp_path / f"node-{node}",
        )
        for node in range(plan.num_nodes)
    ]


def _train(worker: DenseWorker, cfg: Config, batches: list[Batch]) -> list[float]:
    """Train every batch as the ndp engine drives a worker: with lookahead, each batch is
    handed over once, by `prefetch`, and its step is then trained without it."""
    prefetched: set[int] = set()

    class Engine:
        def prefetch(self, step: int, batch: Batch) -> None:
            prefetched.add(step)
            worker.prefetch(step, batch)

    return [
        worker.train_step(step, None if step in prefetched else batch)
        for step, batch in with_lookahead(enumerate(batches), Engine(), cfg.pipeline)
    ]


@pytest.mark.parametrize("early_pooling", [False, True], ids=["plain", "early-pooling"])
def test_a_worker_over_in_process_cores_trains_like_the_reference(tmp_path, early_pooling):
    cfg = _config(lookahead_depth=1 if early_pooling else 0, early_pooling=early_pooling)
    batches = list(build_datasets(cfg)[0].batches(BATCH))[:STEPS]
    plan = plan_shards(cfg)
    assert {p.node for p in plan.pieces_of("t1")} == {0, 1}
    cores = _cores(cfg, plan, tmp_path)
    worker = DenseWorker(
        rank=0, world_size=1, cfg=cfg, plan=plan, clients=[InProcessNode(c) for c in cores]
    )
    reference = ReferenceEngine(cfg)
    try:
        losses = _train(worker, cfg, batches)
        worker.flush()
        expected = [reference.train_step(step, batch) for step, batch in enumerate(batches)]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)
        reference_dense = reference.dense_half.state_dict()
        for name, value in worker.dense_state_dict().items():
            torch.testing.assert_close(value, reference_dense[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            worker.predict(STEPS, batches[0]),
            reference.predict(STEPS, batches[0]),
            rtol=1e-5,
            atol=1e-5,
        )
        hits = sum(core.early_counters["early_hits_without_bags"] for core in cores)
        assert (hits > 0) == early_pooling  # the kept pools answered lookups sent without bags
        # early lookups' flash blocks were kept past the previous step's update for their own
        # step's update (`ArenaFlash.carrying`), and the model above is still the reference's
        carried = sum(a.flash.peak_carried_bytes for core in cores for a in core._arenas)
        assert (carried > 0) == early_pooling
        timings = worker.timings()
        assert {"lookup_wait_s", "dense_compute_s", "dense_optimizer_s"} <= set(timings)
        assert timings["link_bytes_in"] == timings["link_bytes_out"] == 0
    finally:
        worker.close()
        for core in cores:
            core.close()


def test_a_node_refusal_reaches_the_worker_when_collected(tmp_path):
    """In process as over gRPC: the node's typed error, raised when the reply is collected."""
    cfg = _config()
    batch = next(build_datasets(cfg)[0].batches(BATCH))
    plan = plan_shards(cfg)
    cores = _cores(cfg, plan, tmp_path)
    node = InProcessNode(cores[0])
    feature = plan.shards_for_node(0, cfg.model.effective_tables())[0].features[0]
    bags = {feature: Bags(torch.tensor([10_000]), torch.tensor([0, 1]))}  # row out of range
    try:
        reply = node.lookup_async(0, 0, bags)
        with pytest.raises(IndexOutOfRangeError):
            reply.result()
        worker = DenseWorker(
            rank=0, world_size=1, cfg=cfg, plan=plan, clients=[InProcessNode(c) for c in cores]
        )
        worker.train_step(0, batch)  # the refused lookup left the nodes able to train
        worker.flush()
    finally:
        for core in cores:
            core.close()


def _parameters(function) -> dict[str, inspect.Parameter]:
    return {
        name: param
        for name, param in inspect.signature(function).parameters.items()
        if name != "self"
    }


@pytest.mark.parametrize(
    ("protocol", "implementation"),
    [(NodeApi, StorageClient), (NodeApi, InProcessNode), (NodeCore, StorageNodeCore)],
    ids=["grpc-client", "in-process", "core"],
)
def test_each_node_api_implementation_takes_every_argument_the_protocol_names(
    protocol, implementation
):
    """The worker calls only what `NodeApi` declares; each implementation accepts it (a
    keyword with the same default, a positional in the same place)."""
    methods = [
        name
        for name, value in vars(protocol).items()
        if inspect.isfunction(value) and not name.startswith("_")
    ]
    assert methods
    for method in methods:
        wanted = _parameters(getattr(protocol, method))
        offered = _parameters(getattr(implementation, method))
        for position, (name, param) in enumerate(wanted.items()):
            assert name in offered, f"{implementation.__name__}.{method} lacks {name}"
            assert offered[name].kind == param.kind, f"{implementation.__name__}.{method}({name})"
            assert offered[name].default == param.default, f"{implementation.__name__}.{method}"
            if param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
                assert list(offered).index(name) == position
        extra = [p for n, p in offered.items() if n not in wanted]
        assert all(p.default is not inspect.Parameter.empty for p in extra), (
            f"{implementation.__name__}.{method} needs arguments the worker does not send"
        )


@contextmanager
def _worker_on_cores(cfg: Config, tmp_path) -> Iterator[tuple[DenseWorker, list[StorageNodeCore]]]:
    """One worker over the plan's nodes as in-process cores; all closed afterwards."""
    plan = plan_shards(cfg)
    cores = _cores(cfg, plan, tmp_path)
    worker = DenseWorker(
        rank=0, world_size=1, cfg=cfg, plan=plan, clients=[InProcessNode(c) for c in cores]
    )
    try:
        yield worker, cores
    finally:
        worker.close()
        for core in cores:
            core.close()


@pytest.mark.parametrize("depth", [1, 2])
def test_with_lookahead_each_share_is_received_once_and_routed_once(tmp_path, depth):
    """The share of each step reaches the worker once (its prefetch) and is routed once:
    the same routed bags serve the prefetch, the early lookup of the step before, and the
    lookup, which every node then answers from its early pool without the bags."""
    cfg = _config(lookahead_depth=depth, early_pooling=True)
    batches = list(build_datasets(cfg)[0].batches(BATCH))[:STEPS]
    with _worker_on_cores(cfg, tmp_path) as (worker, cores):
        _train(worker, cfg, batches)
        worker.flush()
        counted = worker.timings()
        assert counted["shares_received"] == STEPS
        assert counted["shares_routed"] == STEPS
        staged = sum(core.stats()["cache"]["staged_misses"] for core in cores)
        assert staged > 0  # the prefetches sent the routed rows, and the nodes staged them
        early = [core.early_counters for core in cores]
        assert sum(e["early_hits_without_bags"] for e in early) == len(cores) * (STEPS - 1)
        assert sum(e["early_mismatches"] for e in early) == 0


def test_lookahead_stops_calling_nodes_that_hold_every_row_and_trains_the_same(tmp_path):
    """Where a node's cache holds every row for good, an early lookup would stage nothing and
    defer every pool: after the first answer says so, the worker sends that node no early
    lookups and no prefetches, its lookups carry their bags, and the model is the
    reference's. A flush (restore, resharding may follow) makes it ask again."""
    cfg = _config(cache_bytes=1 << 20, lookahead_depth=1, early_pooling=True)
    batches = list(build_datasets(cfg)[0].batches(BATCH))[:STEPS]
    reference = ReferenceEngine(cfg)
    with _worker_on_cores(cfg, tmp_path) as (worker, cores):
        assert all(core.every_row_resident() for core in cores)
        losses = _train(worker, cfg, batches)
        worker.flush()
        expected = [reference.train_step(step, batch) for step, batch in enumerate(batches)]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)
        counted = worker.timings()
        # the prefetches of steps 0 and 1 went before step 0's lookup; their answers told
        assert sum(core.early_counters["early_pools"] for core in cores) == 0
        assert counted["early_lookups_skipped"] == len(cores) * (STEPS - 1)
        assert counted["prefetches_skipped"] == len(cores) * (STEPS - 2)
        worker.prefetch(STEPS, batches[0])  # after the flush: asks again
        worker.prefetch(STEPS + 1, batches[1])
        worker.train_step(STEPS)
        assert worker.timings()["prefetches_skipped"] == 0


def test_a_step_shipped_again_is_routed_again_and_its_lookup_sends_its_bags(tmp_path):
    """A batch that comes again with its step (not the prefetched share) is routed anew; the
    node's kept early pool was for other bags objects, so the lookup sends its bags."""
    cfg = _config(lookahead_depth=1, early_pooling=True)
    batches = list(build_datasets(cfg)[0].batches(BATCH))[:2]
    with _worker_on_cores(cfg, tmp_path) as (worker, cores):
        worker.prefetch(0, batches[0])
        worker.prefetch(1, batches[1])
        worker.train_step(0)
        worker.train_step(1, batches[1])
        worker.flush()
        counted = worker.timings()
        assert counted["shares_received"] == 3 and counted["shares_routed"] == 3
        assert sum(core.early_counters["early_hits_without_bags"] for core in cores) == 0


def test_a_prefetched_share_with_a_bad_index_is_refused_by_its_own_step(tmp_path):
    """Routing refuses the share when it arrives; the refusal is raised by its step's
    `train_step` (before anything of that step is sent), and earlier steps train."""
    cfg = _config(lookahead_depth=1, early_pooling=True)
    good, bad = list(build_datasets(cfg)[0].batches(BATCH))[:2]
    values = bad.sparse.values().clone()
    values[0] = 10**9
    bad = Batch(
        dense=bad.dense,
        sparse=type(bad.sparse)(
            keys=bad.sparse.keys(), values=values, lengths=bad.sparse.lengths()
        ),
        labels=bad.labels,
    )
    with _worker_on_cores(cfg, tmp_path) as (worker, cores):
        worker.prefetch(0, good)
        worker.prefetch(1, bad)
        worker.train_step(0)
        with pytest.raises(DataError, match="index 1000000000 outside"):
            worker.train_step(1)
        worker.flush()
