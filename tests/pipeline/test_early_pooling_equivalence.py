"""ndp with early pooling (lookahead stage 2, exact mode) trains the same model as the
reference, step by step; stale mode (no correction) runs and trains a different one."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from ndp.coordinator import NdpEngine
from ndp.data.loader import build_datasets
from ndp.pipeline import with_lookahead
from ndp.reference import ReferenceEngine

# The equivalence test's tiny config (tests/ is not a package: load that module by path):
# two nodes, two workers, `big` split row-wise with mean pooling, caches that evict.
_spec = importlib.util.spec_from_file_location(
    "ndp_equivalence_spec", Path(__file__).parents[1] / "distributed" / "test_equivalence.py"
)
_equivalence = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_equivalence)
BATCH, STEPS, tiny_config = _equivalence.BATCH, _equivalence.STEPS, _equivalence.tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _pipelined(cfg, **pipeline):
    return dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, **pipeline))


def _batches(cfg):
    train_data, _ = build_datasets(cfg)
    return list(train_data.batches(BATCH))[:STEPS]


def _reference_losses(cfg, batches):
    reference = ReferenceEngine(cfg)
    return reference, [reference.train_step(step, b) for step, b in enumerate(batches)]


def _train(engine, cfg, batches):
    steps = with_lookahead(enumerate(batches), engine, cfg.pipeline)
    return [engine.train_step(step, batch) for step, batch in steps]


@pytest.mark.parametrize(
    ("optimizer", "depth"), [("sgd", 1), ("sgd", 2), ("rowwise_adagrad", 1), ("rowwise_adagrad", 2)]
)
def test_early_pooling_matches_reference_step_by_step(ray_session, optimizer, depth):
    cfg = _pipelined(tiny_config(optimizer), lookahead_depth=depth, early_pooling=True)
    batches = _batches(cfg)
    reference, reference_losses = _reference_losses(cfg, batches)

    with NdpEngine(cfg) as engine:
        ndp_losses = _train(engine, cfg, batches)
        torch.testing.assert_close(
            torch.tensor(ndp_losses), torch.tensor(reference_losses), rtol=1e-5, atol=0
        )
        for table in cfg.model.tables:
            weights, _ = engine.table_rows(table.name)
            torch.testing.assert_close(
                weights, reference.embeddings.table_weights(table.name), rtol=1e-5, atol=1e-5
            )
        early = [node["early"] for node in engine.node_stats()]
    # Every step after the first was answered from early pools: 2 workers x 2 nodes each,
    # and none of those lookups sent its bags again.
    assert sum(e["early_hits"] for e in early) == 2 * 2 * (STEPS - 1)
    assert sum(e["early_hits_without_bags"] for e in early) == 2 * 2 * (STEPS - 1)
    assert sum(e["early_mismatches"] for e in early) == 0


def test_stale_mode_runs_but_trains_a_different_model(ray_session):
    cfg = _pipelined(tiny_config("sgd"), lookahead_depth=1, mode="stale")
    batches = _batches(cfg)
    _, reference_losses = _reference_losses(cfg, batches)
    with NdpEngine(cfg) as engine:
        stale_losses = _train(engine, cfg, batches)
        early = [node["early"] for node in engine.node_stats()]
    assert sum(e["early_hits"] for e in early) == 2 * 2 * (STEPS - 1)
    assert all(torch.isfinite(torch.tensor(stale_losses)))
    assert stale_losses[0] == pytest.approx(reference_losses[0], rel=1e-5), (
        "step 0 reads rows before any update could be missed: same as exact"
    )
    assert not torch.allclose(
        torch.tensor(stale_losses), torch.tensor(reference_losses), rtol=1e-5, atol=0
    ), "stale pooled vectors miss one update; the losses must drift from the exact ones"
