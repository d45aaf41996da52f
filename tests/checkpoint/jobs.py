"""A tiny ndp job for checkpoint and fault tests: two nodes, a row-wise table, small cache."""

from __future__ import annotations

import torch

from ndp.config import Config, config_from_dict

STEPS = 8
BATCH = 32


def tiny_job(*, sparse_optimizer: str = "adagrad", num_nodes: int = 2, **checkpoint) -> Config:
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
                    "pooling_factor": [3.0, 1.0],
                    "seed": 7,
                },
            },
            "optimizer": {
                "dense": {"name": "adagrad", "lr": 0.05},
                "sparse": {"name": sparse_optimizer, "lr": 0.05},
            },
            "train": {"steps": STEPS, "batch_size": BATCH, "seed": 3, "device": "cpu"},
            "cluster": {
                "num_storage_nodes": num_nodes,
                "num_gpu_workers": 1,
                "constraints": {"big": {"sharding_type": "row_wise"}},
            },
            "storage": {"cache_bytes": 2048},
            "checkpoint": {"enabled": True, **checkpoint},
            "logging": {"progress_bar": False},
        }
    )


def model_of(engine, cfg: Config) -> dict[str, torch.Tensor]:
    """Every embedding row (weights and optimizer state) and every dense parameter."""
    out = {f"dense.{k}": v for k, v in engine.dense_state_dict().items()}
    for table in cfg.model.tables:
        weights, state = engine.table_rows(table.name)
        out[f"{table.name}.weights"], out[f"{table.name}.state"] = weights, state
    return out


def assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
