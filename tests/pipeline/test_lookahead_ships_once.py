"""With lookahead, the ndp engine ships each batch to the GPU workers once and each worker
routes its share once: the share that `prefetch` delivered serves the prefetch, the early
lookup and the lookup of its step (counted by the workers: `shares_received`,
`shares_routed`)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from ndp.coordinator import NdpEngine
from ndp.data.loader import build_datasets
from ndp.pipeline import with_lookahead

# The equivalence test's tiny config (tests/ is not a package: load that module by path):
# two nodes, two workers.
_spec = importlib.util.spec_from_file_location(
    "ndp_equivalence_spec", Path(__file__).parents[1] / "distributed" / "test_equivalence.py"
)
_equivalence = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_equivalence)
BATCH, tiny_config = _equivalence.BATCH, _equivalence.tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 6


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_each_batch_is_shipped_once_and_routed_once(ray_session, depth):
    cfg = tiny_config("sgd")
    cfg = dataclasses.replace(
        cfg, pipeline=dataclasses.replace(cfg.pipeline, lookahead_depth=depth, early_pooling=True)
    )
    batches = list(build_datasets(cfg)[0].batches(BATCH))[:STEPS]
    workers = cfg.cluster.num_gpu_workers
    with NdpEngine(cfg) as engine:
        for step, batch in with_lookahead(enumerate(batches), engine, cfg.pipeline):
            engine.train_step(step, batch)
        counted = engine.timings()
        early = [node["early"] for node in engine.node_stats()]
    assert counted["shares_received"] == workers * STEPS, "a share shipped twice"
    assert counted["shares_routed"] == workers * STEPS, "a share routed twice"
    hits_without_bags = sum(e["early_hits_without_bags"] for e in early)
    assert hits_without_bags == (
        0 if depth == 0 else workers * cfg.cluster.num_storage_nodes * (STEPS - 1)
    )
