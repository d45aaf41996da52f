"""The reference embedding half: FBGEMM tables initialised by init_rows, fused optimizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.tiny import random_sparse, tiny_config
from ndp.errors import ConfigError
from ndp.model.embedding import build_reference_embeddings
from ndp.model.init import init_rows


def _manual_pool(cfg, embeddings, sparse):
    """Pooled vectors computed row by row from the current weights (the definition)."""
    table_of = {f: t for t in cfg.model.effective_tables() for f in t.features}
    pooled = {}
    for feature, jagged in sparse.to_dict().items():
        table = table_of[feature]
        weights = embeddings.table_weights(table.name)
        bags = []
        for rows in jagged.to_dense():
            bag = weights[rows].sum(0) if len(rows) else torch.zeros(weights.shape[1])
            if table.pooling == "mean" and len(rows):
                bag = bag / len(rows)
            bags.append(bag)
        pooled[feature] = torch.stack(bags)
    return pooled


def test_initial_weights_equal_init_rows(cfg):
    embeddings = build_reference_embeddings(cfg)
    for table in cfg.model.effective_tables():
        expected = init_rows(
            seed=cfg.train.seed,
            table_name=table.name,
            num_rows=table.num_rows,
            embedding_dim=table.embedding_dim,
            row_start=0,
            row_end=table.num_rows,
        )
        np.testing.assert_array_equal(embeddings.table_weights(table.name).numpy(), expected)


def test_max_rows_per_table_caps_the_tables():
    cfg = tiny_config(model={"max_rows_per_table": 10})
    embeddings = build_reference_embeddings(cfg)
    assert embeddings.table_weights("t0").shape == (10, 8)
    assert embeddings.table_weights("t2").shape == (10, 8)


def test_forward_pools_sum_and_mean_per_table(cfg):
    embeddings = build_reference_embeddings(cfg)
    sparse = random_sparse(cfg, batch_size=5, seed=2)
    with torch.no_grad():
        pooled = embeddings(sparse)
    expected = _manual_pool(cfg, embeddings, sparse)
    assert list(pooled) != []
    for feature in cfg.model.feature_names:
        torch.testing.assert_close(pooled[feature], expected[feature])


def test_backward_applies_exact_sgd_to_touched_rows_only():
    cfg = tiny_config(optimizer={"sparse": {"name": "sgd", "lr": 0.5}})
    embeddings = build_reference_embeddings(cfg)
    before = embeddings.table_weights("t0").clone()
    sparse = random_sparse(cfg, batch_size=4, seed=5)
    pooled = embeddings(sparse)
    grad = torch.randn(4, 8)
    pooled["f0"].backward(grad, retain_graph=True)

    # d(sum-pooled)/d(row) = sum of the gradients of the bags containing the row
    expected = before.clone()
    for sample, rows in enumerate(sparse["f0"].to_dense()):
        for row in rows:
            expected[row] -= 0.5 * grad[sample]
    torch.testing.assert_close(embeddings.table_weights("t0"), expected)


def test_rowwise_adagrad_state_is_one_float_per_row(cfg):
    embeddings = build_reference_embeddings(cfg)
    assert cfg.optimizer.sparse.name == "rowwise_adagrad"
    sparse = random_sparse(cfg, batch_size=4, seed=1)
    outputs = embeddings.pooled_by_group(sparse)
    torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])

    state = embeddings.table_state("t0")
    assert state.shape == (50, 1)
    touched = torch.unique(sparse["f0"].values())
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[touched] = False
    assert torch.all(state[touched] > 0)
    assert torch.all(state[untouched] == 0)


def test_adagrad_state_is_one_float_per_element():
    cfg = tiny_config(optimizer={"sparse": {"name": "adagrad"}})
    embeddings = build_reference_embeddings(cfg)
    assert embeddings.table_state("t1").shape == (30, 8)


def test_adam_on_cpu_is_refused_naming_the_field():
    cfg = tiny_config(optimizer={"sparse": {"name": "adam"}})
    with pytest.raises(ConfigError, match=r"optimizer\.sparse\.name.*cuda"):
        build_reference_embeddings(cfg, device="cpu")


def test_single_pooling_mode_and_shuffled_keys_pool_the_same():
    cfg = tiny_config(
        model={
            "tables": [
                {"name": "a", "num_rows": 40, "embedding_dim": 8, "features": ["x", "y"]},
                {"name": "b", "num_rows": 10, "embedding_dim": 8, "features": ["z"]},
            ]
        }
    )
    embeddings = build_reference_embeddings(cfg)
    sparse = random_sparse(cfg, batch_size=4, seed=3)
    shuffled = sparse.permute([2, 0, 1])
    assert shuffled.keys() == ["z", "x", "y"]
    with torch.no_grad():
        in_order, out_of_order = embeddings(sparse), embeddings(shuffled)
    for feature in cfg.model.feature_names:
        torch.testing.assert_close(in_order[feature], out_of_order[feature])
    torch.testing.assert_close(in_order["z"], _manual_pool(cfg, embeddings, sparse)["z"])
