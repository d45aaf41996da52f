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

    def __reduce__(self) -> tuple:
        """Pickle (ship to an actor) only the tensors that define the batch.

        Why: a `KeyedJaggedTensor` caches per-feature `JaggedTensor` views once anything calls
        `to_dict()` (torchrec's embedding modules do), and pickling a view pickles its whole
        storage: a 26-feature multi-hot batch of 0.9 MB went to Ray as 24 MB after one
        reference step. Views of a larger buffer are compacted the same way.
        """
        kjt = self.sparse
        weights = kjt.weights_or_none()
        return (
            _rebuild_batch,
            (
                _compact(self.dense),
                list(kjt.keys()),
                _compact(kjt.values()),
                _compact(kjt.lengths()),
                None if weights is None else _compact(weights),
                _compact(self.labels),
            ),
        )

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


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself if it owns exactly its bytes, else a compact copy (see `Batch.__reduce__`)."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _rebuild_batch(
    dense: torch.Tensor,
    keys: list[str],
    values: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None,
    labels: torch.Tensor,
) -> Batch:
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=values, lengths=lengths, weights=weights
    )
    return Batch(dense=dense, sparse=sparse, labels=labels)
