"""Tiny models and random batches shared by the model tests."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ndp.config import Config, config_from_dict


def tiny_config(**sections) -> Config:
    """Three tables (one mean-pooled, one with two features), dim 8, synthetic data."""
    raw = {
        "model": {
            "bottom_mlp": [16, 8],
            "top_mlp": [16, 1],
            "tables": [
                {"name": "t0", "num_rows": 50, "embedding_dim": 8, "features": ["f0"]},
                {
                    "name": "t1",
                    "num_rows": 30,
                    "embedding_dim": 8,
                    "pooling": "mean",
                    "features": ["f1"],
                },
                {"name": "t2", "num_rows": 20, "embedding_dim": 8, "features": ["f2", "f3"]},
            ],
        },
        "data": {"source": "synthetic"},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def random_sparse(cfg: Config, batch_size: int, seed: int, max_bag: int = 3) -> KeyedJaggedTensor:
    """Multi-hot bags (length 0..max_bag) with rows in range of each feature's table."""
    gen = torch.Generator().manual_seed(seed)
    rows_of = {f: t.num_rows for t in cfg.model.effective_tables() for f in t.features}
    values, lengths = [], []
    for feature in cfg.model.feature_names:
        feature_lengths = torch.randint(0, max_bag + 1, (batch_size,), generator=gen)
        lengths.append(feature_lengths)
        total = int(feature_lengths.sum())
        values.append(torch.randint(0, rows_of[feature], (total,), generator=gen))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=cfg.model.feature_names, values=torch.cat(values), lengths=torch.cat(lengths)
    )
