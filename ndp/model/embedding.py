"""The reference embedding half: every table in one process, on FBGEMM's fused kernels.

Why FBGEMM's `SplitTableBatchedEmbeddingBagsCodegen` (TBE): it is what torchrec runs under
the hood, so training through it is the yardstick that ndp's storage nodes must match
(same init from `ndp.model.init.init_rows`, same optimizer semantics). The optimizer is
fused into the backward pass: calling `backward` on the pooled output updates the rows.

A TBE has one pooling mode, so tables are grouped by pooling mode into one TBE per mode.
Inside one TBE, FBGEMM lays out inputs and outputs feature by feature::

    indices  [nnz]            values of feature f0 for samples 0..B-1, then f1, ...
    offsets  [F_group*B + 1]  bag boundaries in that order
    output   [B, F_group*D]   f0's pooled vector in columns [0, D), f1's in [D, 2D), ...

FBGEMM's CPU build (fbgemm-gpu-cpu) has no Adam kernel: `optimizer.sparse.name: adam` works
only on cuda; on CPU it is refused with a ConfigError naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    EmbeddingLocation,
    PoolingMode,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ndp.config import Config, TableConfig
from ndp.errors import ConfigError, DataError
from ndp.model.init import init_table

SPARSE_OPTIMIZERS: dict[str, EmbOptimType] = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
}
"""cfg.optimizer.sparse.name -> FBGEMM optimizer (exact: duplicate rows merged before the update)."""

CPU_SPARSE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
"""Sparse optimizers that fbgemm-gpu-cpu implements (checked against 1.8.0)."""

_POOLING = {"sum": PoolingMode.SUM, "mean": PoolingMode.MEAN}


@dataclass(frozen=True)
class _Group:
    """Tables sharing one pooling mode, served by one TBE."""

    pooling: str
    tables: list[TableConfig]
    features: list[str]
    """Features in TBE order (table order, then feature order)."""


class ReferenceEmbeddings(nn.Module):
    """All embedding tables of a model with a fused optimizer (FBGEMM TBE, one per pooling mode).

    Attributes:
        feature_names: features in model order.
        tables: effective tables (after `max_rows_per_table`).
    """

    def __init__(self, cfg: Config, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        optimizer = cfg.optimizer.sparse
        if self.device.type == "cpu" and optimizer.name not in CPU_SPARSE_OPTIMIZERS:
            raise ConfigError(
                f"optimizer.sparse.name: {optimizer.name!r} has no CPU kernel in fbgemm-gpu-cpu; "
                f"on CPU use one of {', '.join(CPU_SPARSE_OPTIMIZERS)}, or run on cuda"
            )
        self.tables: list[TableConfig] = cfg.model.effective_tables()
        self.feature_names: list[str] = list(cfg.model.feature_names)
        self.embedding_dim: int = cfg.model.embedding_dim
        self._groups: list[_Group] = []
        for pooling in ("sum", "mean"):
            tables = [t for t in self.tables if t.pooling == pooling]
            if tables:
                features = [f for t in tables for f in t.features]
                self._groups.append(_Group(pooling, tables, features))
        # table name -> (group index, table index inside that TBE)
        self._table_slot: dict[str, tuple[int, int]] = {
            t.name: (g, i)
            for g, group in enumerate(self._groups)
            for i, t in enumerate(group.tables)
        }
        self._num_rows = {t.name: t.num_rows for t in self.tables}

        on_cuda = self.device.type == "cuda"
        location = EmbeddingLocation.DEVICE if on_cuda else EmbeddingLocation.HOST
        compute = ComputeDevice.CUDA if on_cuda else ComputeDevice.CPU
        self.tbes = nn.ModuleList()
        for group in self._groups:
            table_index = {t.name: i for i, t in enumerate(group.tables)}
            feature_table_map = [table_index[t.name] for t in group.tables for _ in t.features]
            tbe = SplitTableBatchedEmbeddingBagsCodegen(
                embedding_specs=[
                    (t.num_rows, t.embedding_dim, location, compute) for t in group.tables
                ],
                feature_table_map=feature_table_map,
                optimizer=SPARSE_OPTIMIZERS[optimizer.name],
                learning_rate=optimizer.lr,
                eps=optimizer.eps,
                beta1=optimizer.beta1,
                beta2=optimizer.beta2,
                weight_decay=0.0,
                pooling_mode=_POOLING[group.pooling],
                device=self.device,
            )
            with torch.no_grad():
                for table, weights in zip(group.tables, tbe.split_embedding_weights(), strict=True):
                    weights.copy_(
                        init_table(
                            seed=cfg.train.seed,
                            table_name=table.name,
                            num_rows=table.num_rows,
                            embedding_dim=table.embedding_dim,
                        )
                    )
            self.tbes.append(tbe)

    def pooled_by_group(self, sparse: KeyedJaggedTensor) -> list[torch.Tensor]:
        """Pooled output of each TBE, [B, F_group * D], still attached to the fused backward.

        Calling `backward` on these (or on anything computed from them) applies the sparse
        optimizer to the rows the batch touched.
        """
        self._check_keys(sparse)
        tbe_order = [f for g in self._groups for f in g.features]
        if list(sparse.keys()) == tbe_order and len(self._groups) == 1:
            pieces = [sparse]  # the common case: one pooling mode, keys in model order
        else:
            order = {name: i for i, name in enumerate(sparse.keys())}
            grouped = sparse.permute([order[f] for f in tbe_order])
            pieces = grouped.split([len(g.features) for g in self._groups])
        outputs = []
        for tbe, piece in zip(self.tbes, pieces, strict=True):
            weights = piece.weights_or_none()
            outputs.append(
                tbe(
                    indices=piece.values().to(self.device, torch.int64),
                    offsets=piece.offsets().to(self.device, torch.int64),
                    per_sample_weights=None if weights is None else weights.to(self.device),
                )
            )
        return outputs

    def split_features(self, group_outputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Feature name -> pooled [B, D] views of the group outputs of `pooled_by_group`."""
        pooled: dict[str, torch.Tensor] = {}
        for group, output in zip(self._groups, group_outputs, strict=True):
            columns = output.split(self.embedding_dim, dim=1)
            pooled.update(zip(group.features, columns, strict=True))
        return pooled

    def forward(self, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Pooled embeddings: feature name -> float32 [B, D] (backward applies the optimizer)."""
        return self.split_features(self.pooled_by_group(sparse))

    def table_weights(self, name: str) -> torch.Tensor:
        """Current weights of table `name`: float32 [num_rows, D] (a view; do not write)."""
        group, index = self._slot(name)
        return self.tbes[group].split_embedding_weights()[index]

    def table_state(self, name: str) -> torch.Tensor:
        """Optimizer state of table `name`, in the layout of `ndp.model.spec.optimizer_state_width`.

        Returns:
            float32 [num_rows, S]: S = 0 for sgd, D for adagrad, 1 for rowwise_adagrad,
            2*D for adam (first moment, then second moment).
        """
        group, index = self._slot(name)
        states = self.tbes[group].split_optimizer_states()
        num_rows = self._num_rows[name]
        if not states:
            return torch.zeros(num_rows, 0)
        columns = [s.reshape(num_rows, -1) for s in states[index]]
        return torch.cat(columns, dim=1).float()

    def _slot(self, name: str) -> tuple[int, int]:
        if name not in self._table_slot:
            raise KeyError(f"unknown table {name!r}; tables: {', '.join(self._table_slot)}")
        return self._table_slot[name]

    def _check_keys(self, sparse: KeyedJaggedTensor) -> None:
        keys = set(sparse.keys())
        missing = [f for f in self.feature_names if f not in keys]
        if missing:
            raise DataError(
                f"sparse batch lacks features {missing}; the model's features are "
                f"{self.feature_names}"
            )


def build_reference_embeddings(
    cfg: Config, device: torch.device | str = "cpu"
) -> ReferenceEmbeddings:
    """The embedding half of `cfg.model` with the fused `cfg.optimizer.sparse`, on `device`."""
    return ReferenceEmbeddings(cfg, device)
