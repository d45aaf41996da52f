"""The train benchmark's baselines train the same model as the reference trainer.

`HybridEngine` (EmbeddingBag + CPU sparse SGD) and `OsPagedEngine` (memory-mapped tables,
numpy SGD) are only fair baselines if they do the reference's math: same init, same
pooling, same merged-gradient SGD, same dense half. Four SGD steps on the same batches must
give the same losses, the same rows of every table and the same dense parameters.
"""

from __future__ import annotations

import pytest
import torch

from ndp.bench.baselines import HybridEngine, OsPagedEngine
from ndp.config import Config, config_from_dict
from ndp.data.loader import build_datasets
from ndp.reference import ReferenceEngine

STEPS = 4
BATCH_SIZE = 16

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config() -> Config:
    """Small tables: sum- and mean-pooled, one read by two features, multi-hot bags."""
    table = {"embedding_dim": 8}
    return config_from_dict(
        {
            "model": {
                "bottom_mlp": [16, 8],
                "top_mlp": [16, 1],
                "tables": [
                    {**table, "name": "t_sum", "num_rows": 40, "features": ["f_sum"]},
                    {
                        **table,
                        "name": "t_mean",
                        "num_rows": 30,
                        "pooling": "mean",
                        "features": ["f_mean"],
                    },
                    {**table, "name": "t_shared", "num_rows": 20, "features": ["f_a", "f_b"]},
                    {**table, "name": "t_multihot", "num_rows": 25, "features": ["f_multi"]},
                ],
            },
            "data": {
                "source": "synthetic",
                "synthetic": {
                    "num_samples": STEPS * BATCH_SIZE,
                    "num_val_samples": BATCH_SIZE,
                    # f_mean and f_multi are multi-hot (bags of 3 and 5 rows), so mean
                    # pooling divides and one bag repeats rows; the others are one-hot
                    "pooling_factor": [1.0, 3.0, 1.0, 1.0, 5.0],
                },
            },
            "train": {"batch_size": BATCH_SIZE, "device": "cpu", "seed": 7},
            "optimizer": {
                "dense": {"name": "sgd", "lr": 0.2},
                "sparse": {"name": "sgd", "lr": 0.5},
            },
        }
    )


def _train(engine, batches) -> list[float]:
    return [engine.train_step(step, batch) for step, batch in enumerate(batches)]


def _rows_of(engine, table: str) -> torch.Tensor:
    if isinstance(engine, ReferenceEngine):
        return engine.embeddings.table_weights(table).detach().cpu()
    if isinstance(engine, HybridEngine):
        return engine.bags[table].weight.detach()
    return torch.from_numpy(engine.tables[table].copy())


@pytest.fixture(scope="module")
def reference():
    """The reference trainer after STEPS steps, its losses, and the batches it trained on."""
    cfg = _config()
    train, _ = build_datasets(cfg)
    batches = list(train.batches(BATCH_SIZE))[:STEPS]
    assert len(batches) == STEPS
    engine = ReferenceEngine(cfg)
    initial = {t.name: _rows_of(engine, t.name).clone() for t in cfg.model.tables}
    losses = _train(engine, batches)
    # every table was trained, so comparing its rows compares the updates
    assert all(not torch.equal(_rows_of(engine, name), rows) for name, rows in initial.items())
    return engine, losses, batches


@pytest.mark.parametrize("baseline", [HybridEngine, OsPagedEngine], ids=["hybrid", "os_paged"])
def test_baseline_trains_the_reference_model_loss_rows_and_dense_parameters(
    baseline, reference, tmp_path
):
    cfg = _config()
    ref_engine, ref_losses, batches = reference
    # the data really has what the test is about: multi-hot bags with repeated rows
    multi = batches[0].sparse["f_multi"]
    assert multi.lengths().eq(5).all()
    assert any(len(set(bag.tolist())) < len(bag) for bag in multi.values().view(-1, 5))
    assert batches[0].sparse["f_sum"].lengths().eq(1).all()

    engine = baseline(cfg, tmp_path) if baseline is OsPagedEngine else baseline(cfg)
    try:
        losses = _train(engine, batches)
        # same losses step by step (step 0's loss checks the init, later ones every update)
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7
        )
        for table in cfg.model.effective_tables():
            torch.testing.assert_close(
                _rows_of(engine, table.name),
                _rows_of(ref_engine, table.name),
                rtol=1e-5,
                atol=1e-6,
                msg=lambda m, name=table.name: f"table {name}: {m}",
            )
        reference_dense = ref_engine.dense_half.state_dict()
        for name, param in engine.dense.dense_half.state_dict().items():
            torch.testing.assert_close(
                param.cpu(), reference_dense[name].cpu(), rtol=1e-5, atol=1e-6
            )
    finally:
        engine.close()
