"""Synchronous ndp training equals single-process torchrec/FBGEMM training.

Two storage nodes hold a table-wise and a row-wise split (real Ray actors, real gRPC on
loopback, real flash files, caches small enough to evict), two GPU workers each take half of
every batch; the reference trainer runs the same DLRM in one process with FBGEMM's fused
optimizers. Same init, same data order: per-step losses, final embeddings and dense
parameters must agree to float tolerance.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ndp.config import Config, config_from_dict
from ndp.coordinator import NdpEngine
from ndp.data.loader import build_datasets
from ndp.reference import ReferenceEngine

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 20
BATCH = 16


def tiny_config(sparse_optimizer: str) -> Config:
    """Three tables: `big` is forced row-wise over both nodes (with mean pooling, so the
    whole-bag divisor crosses pieces); the others are placed whole."""
    return config_from_dict(
        {
            "model": {
                "bottom_mlp": [16, 8],
                "top_mlp": [16, 1],
                "tables": [
                    {
                        "name": "big",
                        "num_rows": 300,
                        "embedding_dim": 8,
                        "pooling": "mean",
                        "features": ["f_big"],
                    },
                    {
                        "name": "mid",
                        "num_rows": 120,
                        "embedding_dim": 8,
                        "pooling": "sum",
                        "features": ["f_mid", "f_mid2"],
                    },
                    {
                        "name": "small",
                        "num_rows": 40,
                        "embedding_dim": 8,
                        "pooling": "sum",
                        "features": ["f_small"],
                    },
                ],
            },
            "data": {
                "source": "synthetic",
                "synthetic": {
                    "num_samples": STEPS * BATCH,
                    "num_val_samples": 64,
                    "pooling_factor": [4.0, 3.0, 2.0, 1.0],
                    "pooling_distribution": "poisson",
                    "zipf_exponent": 1.05,
                    "seed": 7,
                },
            },
            "optimizer": {
                "dense": {"name": "adagrad", "lr": 0.05},
                "sparse": {"name": sparse_optimizer, "lr": 0.05},
            },
            "train": {"steps": STEPS, "batch_size": BATCH, "seed": 3, "device": "cpu"},
            "cluster": {
                "num_storage_nodes": 2,
                "num_gpu_workers": 2,
                "constraints": {"big": {"sharding_type": "row_wise"}},
            },
            # A few rows of cache: rows are evicted to flash and read back all the time.
            "storage": {"cache_bytes": 2048, "cache_policy": "hot+lfu"},
            "logging": {"progress_bar": False},
        }
    )


@pytest.mark.parametrize("sparse_optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
def test_ndp_matches_reference_step_by_step(ray_session, sparse_optimizer):
    cfg = tiny_config(sparse_optimizer)
    train_data, _ = build_datasets(cfg)
    batches = list(train_data.batches(BATCH))[:STEPS]
    assert len(batches) == STEPS

    reference = ReferenceEngine(cfg)
    reference_losses = [reference.train_step(step, b) for step, b in enumerate(batches)]

    with NdpEngine(cfg) as engine:
        assert {p.sharding_type for p in engine.plan.pieces_of("big")} == {"row_wise"}
        assert len({p.node for p in engine.plan.pieces_of("big")}) == 2
        ndp_losses = [engine.train_step(step, b) for step, b in enumerate(batches)]
        engine.flush()
        # by default each step's gradients ride on the next step's lookups (one call per
        # node and step); only the last step's push goes alone, at the flush
        wire = engine.wire_bytes()
        pushed_alone = wire["PushGradients.sent.float_data"]
        assert pushed_alone > 0
        assert wire["Lookup.sent.float_data"] == (STEPS - 1) * pushed_alone

        torch.testing.assert_close(
            torch.tensor(ndp_losses), torch.tensor(reference_losses), rtol=1e-5, atol=0
        )
        for table in cfg.model.tables:
            weights, state = engine.table_rows(table.name)
            torch.testing.assert_close(
                weights, reference.embeddings.table_weights(table.name), rtol=1e-5, atol=1e-5
            )
            expected_state = reference.embeddings.table_state(table.name)
            torch.testing.assert_close(
                state.reshape(expected_state.shape), expected_state, rtol=1e-5, atol=1e-5
            )
        reference_dense = reference.dense_half.state_dict()
        for name, value in engine.dense_state_dict().items():
            torch.testing.assert_close(value, reference_dense[name], rtol=1e-5, atol=1e-5)

        # Evaluation through the same path agrees too.
        probe = batches[0]
        torch.testing.assert_close(
            engine.predict(STEPS, probe), reference.predict(STEPS, probe), rtol=1e-5, atol=1e-5
        )


def test_gradients_pushed_during_backward_train_the_same_model(ray_session):
    """`pipeline.push: during_backward` (a call of its own per node and step, sent from
    inside backward) trains what the reference trains, as the default does."""
    cfg = tiny_config("rowwise_adagrad")
    cfg = replace(cfg, pipeline=replace(cfg.pipeline, push="during_backward"))
    batches = list(build_datasets(cfg)[0].batches(BATCH))[:8]
    reference = ReferenceEngine(cfg)
    reference_losses = [reference.train_step(step, b) for step, b in enumerate(batches)]
    with NdpEngine(cfg) as engine:
        losses = [engine.train_step(step, b) for step, b in enumerate(batches)]
        engine.flush()
        wire = engine.wire_bytes()
        assert wire["PushGradients.sent.float_data"] > 0
        assert wire.get("Lookup.sent.float_data", 0) == 0
        for table in cfg.model.tables:
            torch.testing.assert_close(
                engine.table_rows(table.name)[0],
                reference.embeddings.table_weights(table.name),
                rtol=1e-5,
                atol=1e-5,
            )
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-5, atol=0
    )


def _train_ndp(cfg: Config, batches: list) -> tuple[list[float], dict, dict]:
    """Losses, table weights and dense parameters after training `batches` through ndp."""
    with NdpEngine(cfg) as engine:
        losses = [engine.train_step(step, b) for step, b in enumerate(batches)]
        tables = {t.name: engine.table_rows(t.name)[0] for t in cfg.model.tables}
        return losses, tables, engine.dense_state_dict()


def test_two_workers_on_half_batches_train_the_model_one_worker_trains_on_whole_batches(
    ray_session,
):
    cfg = tiny_config("adagrad")
    one_worker = replace(cfg, cluster=replace(cfg.cluster, num_gpu_workers=1))
    batches = list(build_datasets(cfg)[0].batches(BATCH))[:5]

    losses_1, tables_1, dense_1 = _train_ndp(one_worker, batches)
    losses_2, tables_2, dense_2 = _train_ndp(cfg, batches)

    torch.testing.assert_close(torch.tensor(losses_2), torch.tensor(losses_1), rtol=1e-5, atol=0)
    for name, weights in tables_1.items():
        torch.testing.assert_close(tables_2[name], weights, rtol=1e-5, atol=1e-5)
    for name, value in dense_1.items():
        torch.testing.assert_close(dense_2[name], value, rtol=1e-5, atol=1e-5)


def test_training_moved_the_weights_so_the_comparison_is_not_vacuous(ray_session):
    cfg = tiny_config("sgd")
    train_data, _ = build_datasets(cfg)
    batch = next(iter(train_data.batches(BATCH)))
    reference = ReferenceEngine(cfg)
    before = reference.embeddings.table_weights("big").clone()
    reference.train_step(0, batch)
    assert not torch.allclose(before, reference.embeddings.table_weights("big"))
