"""Tiny model, bags and gradients shared by the wire tests (one node serving t0 and t1)."""

from __future__ import annotations

import torch

from ndp.config import Config, config_from_dict
from ndp.plan import Bags

TOKEN = "test-token-7f3a"
DIM = 16


def tiny_config(**storage) -> Config:
    """Two tables on one node: t0 (sum, features f0 and f1) and t1 (mean, feature f2)."""
    return config_from_dict(
        {
            "model": {
                "bottom_mlp": [8, DIM],
                "top_mlp": [8, 1],
                "tables": [
                    {"name": "t0", "num_rows": 40, "embedding_dim": DIM, "features": ["f0", "f1"]},
                    {
                        "name": "t1",
                        "num_rows": 25,
                        "embedding_dim": DIM,
                        "pooling": "mean",
                        "features": ["f2"],
                    },
                ],
            },
            "data": {"source": "synthetic"},
            "optimizer": {"sparse": {"name": "rowwise_adagrad", "lr": 0.5}},
            "storage": {"cache_bytes": 1 << 20, "io_threads": 2, **storage},
        }
    )


def random_bags(batch_size: int, seed: int, max_bag: int = 3) -> dict[str, Bags]:
    """Multi-hot bags of every feature of `tiny_config`, indices in range."""
    gen = torch.Generator().manual_seed(seed)
    bags = {}
    for feature, num_rows in (("f0", 40), ("f1", 40), ("f2", 25)):
        lengths = torch.randint(1, max_bag + 1, (batch_size,), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        indices = torch.randint(0, num_rows, (int(offsets[-1]),), generator=gen)
        bags[feature] = Bags(indices=indices, offsets=offsets)
    bags["f0"].per_sample_weights = torch.rand(bags["f0"].indices.numel(), generator=gen)
    return bags


def random_grads(batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    return {f: torch.randn(batch_size, DIM, generator=gen) for f in ("f0", "f1", "f2")}
