"""Tiny models and random batches shared by the model tests."""

from __future__ import annotations

import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ndp.config import Config, config_from_dict
from ndp.data.batch import Batch


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


class InMemoryDataset:
    """A split held in memory, served in fixed order as full batches (the loader's contract)."""

    def __init__(
        self,
        dense: torch.Tensor,
        sparse_rows: torch.Tensor,
        labels: torch.Tensor,
        features: list[str],
    ) -> None:
        self.dense, self.sparse_rows, self.labels, self.features = (
            dense,
            sparse_rows,
            labels,
            features,
        )
        self.num_samples = int(labels.shape[0])

    def batches(self, batch_size: int, *, start_batch: int = 0):
        for start in range(start_batch * batch_size, self.num_samples - batch_size + 1, batch_size):
            end = start + batch_size
            rows = self.sparse_rows[start:end]  # [B, F] one row per feature
            sparse = KeyedJaggedTensor.from_lengths_sync(
                keys=self.features,
                values=rows.T.reshape(-1),
                lengths=torch.ones(len(self.features) * batch_size, dtype=torch.int64),
            )
            yield Batch(dense=self.dense[start:end], sparse=sparse, labels=self.labels[start:end])


def learnable_splits(cfg: Config, num_train: int, num_val: int, seed: int = 0):
    """One-hot data whose click probability is a hidden score of the row of feature f0.

    Only the embedding of table t0 can learn the score, so a rising AUC means the embedding
    half trains through the fused backward, not only the dense half.
    """
    gen = torch.Generator().manual_seed(seed)
    rows_of = {f: t.num_rows for t in cfg.model.effective_tables() for f in t.features}
    hidden_score = torch.randn(rows_of["f0"], generator=gen) * 3.0

    def split(num_samples: int) -> InMemoryDataset:
        columns = [
            torch.randint(0, rows_of[f], (num_samples,), generator=gen)
            for f in cfg.model.feature_names
        ]
        sparse_rows = torch.stack(columns, dim=1)
        probability = torch.sigmoid(hidden_score[sparse_rows[:, 0]])
        labels = torch.bernoulli(probability, generator=gen)
        dense = torch.randn(num_samples, cfg.model.dense_in_features, generator=gen)
        return InMemoryDataset(dense, sparse_rows, labels, cfg.model.feature_names)

    return split(num_train), split(num_val)


def torchrec_dlrm_with_same_weights(cfg: Config, embeddings, dense_half) -> DLRM:
    """A torchrec DLRM (EmbeddingBagCollection tables) holding the same weights as our halves."""
    pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=t.name,
                embedding_dim=t.embedding_dim,
                num_embeddings=t.num_rows,
                feature_names=list(t.features),
                pooling=pooling[t.pooling],
            )
            for t in cfg.model.effective_tables()
        ]
    )
    with torch.no_grad():
        for t in cfg.model.effective_tables():
            ebc.embedding_bags[t.name].weight.copy_(embeddings.table_weights(t.name))
    dlrm = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=cfg.model.dense_in_features,
        dense_arch_layer_sizes=list(cfg.model.bottom_mlp),
        over_arch_layer_sizes=list(cfg.model.top_mlp),
    )
    result = dlrm.load_state_dict(dense_half.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(key.startswith("sparse_arch.") for key in result.missing_keys)
    return dlrm
