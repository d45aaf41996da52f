"""Logistic regression on the same train/validation split as a DLRM config: the bar to clear.

    python scripts/logreg_baseline.py [--config configs/dlrm.yaml] [--epochs 3] [--lr 0.05]
                                      [--l2 1e-4] [--seed 0]

Features are exactly what the DLRM sees (ndp's loader): the 13 log-transformed dense features
through one linear layer, and each categorical feature one-hot over its table's hashed rows
(one learned weight per embedding row, i.e. a DLRM with embedding dim 1 and no MLPs). Trained
in the config's batch size and order with Adagrad plus an L2 penalty; prints the validation
metrics of `ndp.metrics` over the same validation batches `ndp-train` evaluates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ndp.config import load_config
from ndp.data.batch import Batch
from ndp.data.loader import build_datasets
from ndp.metrics import BinaryEvaluator

REPO = Path(__file__).resolve().parent.parent


class LogisticRegression(torch.nn.Module):
    """logit = dense @ w_dense + b + sum over the sample's categorical ids of w_row[id]."""

    def __init__(self, num_dense: int, table_rows: list[int]) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(num_dense, 1)
        self.row_weights = torch.nn.Parameter(torch.zeros(sum(table_rows)))
        """One weight per row of every table, tables laid end to end."""
        self.register_buffer("table_offsets", torch.tensor([0, *table_rows[:-1]]).cumsum(0))

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [B]."""
        kjt = batch.sparse
        batch_size = batch.batch_size
        num_features = len(kjt.keys())
        lengths = kjt.lengths().long()
        # KJT lengths are feature-major: [feature 0: B samples, feature 1: B samples, ...]
        bag_feature = torch.arange(num_features).repeat_interleave(batch_size)
        bag_sample = torch.arange(num_features * batch_size) % batch_size
        rows = kjt.values().long() + self.table_offsets[bag_feature.repeat_interleave(lengths)]
        sparse_logit = torch.zeros(batch_size).index_add_(
            0, bag_sample.repeat_interleave(lengths), self.row_weights[rows]
        )
        return self.dense(batch.dense).squeeze(1) + sparse_logit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "dlrm.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05, help="Adagrad learning rate")
    parser.add_argument(
        "--l2", type=float, default=1e-4, help="L2 penalty added to each batch's mean loss"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    cfg = load_config(args.config)
    train_data, val_data = build_datasets(cfg)
    # one feature per table in the shipped configs; the loader hashes into these many rows
    table_rows = [table.num_rows for table in cfg.model.effective_tables()]
    model = LogisticRegression(cfg.model.dense_in_features, table_rows)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=args.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    batch_size = cfg.train.batch_size

    for _ in range(args.epochs):
        for batch in train_data.batches(batch_size):
            loss = loss_fn(model(batch), batch.labels)
            loss = loss + args.l2 * (
                model.row_weights.square().sum() + model.dense.weight.square().sum()
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    evaluator = BinaryEvaluator()
    with torch.no_grad():
        for batch in val_data.batches(batch_size):
            evaluator.update(model(batch), batch.labels)
    recipe = {**vars(args), "config": str(args.config)}
    print(json.dumps({**recipe, **evaluator.compute()}))


if __name__ == "__main__":
    main()
