"""The batch every reader yields and every trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Batch:
    """One mini-batch of B samples.

    Attributes:
        dense: float32 [B, num_dense_features], already log-transformed.
        sparse: KeyedJaggedTensor with the model's feature names as keys (model order);
            values are int64 row indices in [0, num_rows) of each feature's table,
            lengths int32/int64 [num_features * B].
        labels: float32 [B], 0 or 1.
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def slice(self, start: int, end: int) -> Batch:
        """Samples [start, end) as a batch of their own (data-parallel split across workers)."""
        keys = self.sparse.keys()
        jagged = self.sparse.to_dict()
        values, lengths = [], []
        for key in keys:
            jt = jagged[key]
            offsets = jt.offsets()
            values.append(jt.values()[offsets[start] : offsets[end]])
            lengths.append(jt.lengths()[start:end])
        sparse = KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)
        )
        # clones, not views: a view pickles (ships to a worker actor) its whole storage
        return Batch(
            dense=self.dense[start:end].clone(),
            sparse=sparse,
            labels=self.labels[start:end].clone(),
        )

    def split(self, num_parts: int) -> list[Batch]:
        """Equal contiguous parts; the batch size must divide evenly."""
        if self.batch_size % num_parts:
            raise ValueError(f"batch of {self.batch_size} does not split into {num_parts} parts")
        if num_parts == 1:
            return [self]
        part = self.batch_size // num_parts
        return [self.slice(i * part, (i + 1) * part) for i in range(num_parts)]
