"""The batch every reader yields and every trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

_NUMPY_DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32, torch.float16)


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
        """Pickle (ship to an actor) only the arrays that define the batch.

        Why not the tensors as they are: a `KeyedJaggedTensor` caches per-feature
        `JaggedTensor` views once anything calls `to_dict()` (torchrec's embedding modules
        do), and pickling a view pickles its whole storage: a 26-feature multi-hot batch of
        0.9 MB went to Ray as 24 MB after one reference step. And torch pickles tensor bytes
        in band (0.37 ms per round trip of a 1024-sample batch), while numpy arrays go out of
        band with pickle protocol 5 (Ray's shared-memory object store, 0.02 ms).
        """
        kjt = self.sparse
        weights = kjt.weights_or_none()
        return (
            _rebuild_batch,
            (
                _shippable(self.dense),
                list(kjt.keys()),
                _shippable(kjt.values()),
                _shippable(kjt.lengths()),
                None if weights is None else _shippable(weights),
                _shippable(self.labels),
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


def _shippable(tensor: torch.Tensor) -> np.ndarray | torch.Tensor:
    """A CPU tensor as a numpy array of its own bytes (numpy pickles a view's bytes only);
    other tensors (a device, a dtype numpy lacks) as a compact tensor."""
    if tensor.device.type == "cpu" and tensor.dtype in _NUMPY_DTYPES:
        return tensor.detach().numpy()
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _unshipped(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A writable tensor of its own (Ray hands out read-only views of shared memory)."""
    return torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value


def _rebuild_batch(
    dense: np.ndarray | torch.Tensor,
    keys: list[str],
    values: np.ndarray | torch.Tensor,
    lengths: np.ndarray | torch.Tensor,
    weights: np.ndarray | torch.Tensor | None,
    labels: np.ndarray | torch.Tensor,
) -> Batch:
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=_unshipped(values),
        lengths=_unshipped(lengths),
        weights=None if weights is None else _unshipped(weights),
    )
    return Batch(dense=_unshipped(dense), sparse=sparse, labels=_unshipped(labels))
