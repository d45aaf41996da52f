"""Datasets: sample sequences that yield `Batch`es in a fixed order.

Every dataset is a sequence of `num_samples` samples; `batches(B, start_batch=s)` yields
samples [s*B, (s+1)*B), [(s+1)*B, ...) and stops before a partial batch. There is no
shuffling: the order is the order of the data, so a run is reproducible and resumable.

Sparse features leave a dataset as a KeyedJaggedTensor with the model's feature names as
keys, in model order, values int64 rows in [0, num_rows) of each feature's table.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ndp.data.batch import Batch
from ndp.data.columnar import load_array
from ndp.data.criteo import CriteoFeature, CriteoReader, CriteoRows, hash_to_rows
from ndp.errors import DataError

IndexPolicy = Literal["fail", "hash", "clamp"]


class Dataset(abc.ABC):
    """A finite, ordered sequence of samples."""

    num_samples: int
    skipped_lines: int = 0
    """Malformed input lines dropped under `data.bad_line_policy=skip` (0 when none)."""

    @abc.abstractmethod
    def batches(self, batch_size: int, *, start_batch: int = 0) -> Iterator[Batch]:
        """Full batches from batch `start_batch` on, in order (a last partial batch is dropped)."""

    def num_batches(self, batch_size: int) -> int:
        return self.num_samples // batch_size


def _check_batching(batch_size: int, start_batch: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size {batch_size} must be > 0")
    if start_batch < 0:
        raise ValueError(f"start_batch {start_batch} must be >= 0")


def make_batch(
    *,
    labels: np.ndarray,
    dense: np.ndarray,
    keys: Sequence[str],
    values: Sequence[np.ndarray],
    lengths: Sequence[np.ndarray],
) -> Batch:
    """Assemble a `Batch` from per-feature jagged arrays (values int64, lengths per sample)."""
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys),
        values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32, copy=False)),
    )
    return Batch(
        dense=torch.from_numpy(np.array(dense, dtype=np.float32)),
        sparse=kjt,
        labels=torch.from_numpy(np.array(labels, dtype=np.float32)),
    )


def apply_index_policy(
    rows: np.ndarray, *, num_rows: int, policy: IndexPolicy, table: str, feature: str
) -> np.ndarray:
    """Bring stored row indices into [0, num_rows) of the (effective) table.

    `fail` raises naming the table, feature, value and range; `hash` takes the value mod
    num_rows (non-negative); `clamp` clips to [0, num_rows - 1].
    """
    bad = (rows < 0) | (rows >= num_rows)
    if not bad.any():
        return rows
    if policy == "hash":
        return np.mod(rows, num_rows)
    if policy == "clamp":
        return np.clip(rows, 0, num_rows - 1)
    value = int(rows[np.flatnonzero(bad)[0]])
    raise DataError(
        f"feature {feature!r}: index {value} is out of range [0, {num_rows}) of table "
        f"{table!r}; set data.index_policy=hash or clamp, or size the table to the data"
    )


class CriteoArrayDataset(Dataset):
    """Criteo samples held as arrays (in memory or memory-mapped preprocessed files).

    Raw categorical ids are hashed into each feature's table per batch (vectorised mod).
    """

    def __init__(self, rows: CriteoRows, features: list[CriteoFeature]) -> None:
        self.rows = rows
        self.features = features
        self.num_samples = len(rows)

    @staticmethod
    def from_directory(split_dir: Path, features: list[CriteoFeature]) -> CriteoArrayDataset:
        rows = CriteoRows(
            labels=load_array(split_dir / "labels.npy"),
            dense=load_array(split_dir / "dense.npy"),
            cat_ids=load_array(split_dir / "cat_ids.npy"),
        )
        return CriteoArrayDataset(rows, features)

    def batches(self, batch_size: int, *, start_batch: int = 0) -> Iterator[Batch]:
        _check_batching(batch_size, start_batch)
        for b in range(start_batch, self.num_batches(batch_size)):
            yield criteo_batch(self.rows.slice(b * batch_size, (b + 1) * batch_size), self.features)


def criteo_batch(rows: CriteoRows, features: list[CriteoFeature]) -> Batch:
    """One-hot batch: feature `cat_<i>` looks up row `cat_ids[:, i] mod num_rows`."""
    cat_ids = np.asarray(rows.cat_ids)
    ones = np.ones(len(rows), np.int32)
    return make_batch(
        labels=rows.labels,
        dense=rows.dense,
        keys=[f.name for f in features],
        values=[hash_to_rows(cat_ids[:, f.column], f.num_rows) for f in features],
        lengths=[ones] * len(features),
    )


class CriteoStreamDataset(Dataset):
    """Criteo TSV lines [line_start, line_end) parsed chunk by chunk on every pass.

    For inputs too large to hold in memory. With `bad_line_policy=fail` a sample is a line,
    so `start_batch` skips lines without parsing them; with `skip` the sample count is only
    known after one counting pass (done lazily by `num_samples`).
    """

    def __init__(
        self,
        reader: CriteoReader,
        features: list[CriteoFeature],
        line_start: int,
        line_end: int,
    ) -> None:
        self.reader = reader
        self.features = features
        self.line_start = line_start
        self.line_end = line_end
        self._num_samples: int | None = None

    @property
    def skipped_lines(self) -> int:  # type: ignore[override]
        return self.reader.skipped_lines

    @property
    def num_samples(self) -> int:  # type: ignore[override]
        if self._num_samples is None:
            if self.reader.bad_line_policy == "fail":
                self._num_samples = self.line_end - self.line_start
            else:
                self._num_samples = sum(
                    len(r) for r in self.reader.rows(self.line_start, self.line_end)
                )
        return self._num_samples

    def batches(self, batch_size: int, *, start_batch: int = 0) -> Iterator[Batch]:
        _check_batching(batch_size, start_batch)
        to_skip = start_batch * batch_size
        first_line = self.line_start
        if self.reader.bad_line_policy == "fail":
            first_line, to_skip = min(self.line_start + to_skip, self.line_end), 0
        pending: list[CriteoRows] = []
        pending_count = 0
        for rows in self.reader.rows(first_line, self.line_end):
            if to_skip:
                dropped = min(to_skip, len(rows))
                rows, to_skip = rows.slice(dropped, len(rows)), to_skip - dropped
            pending.append(rows)
            pending_count += len(rows)
            if pending_count < batch_size:
                continue
            merged = CriteoRows.concat(pending)
            full = len(merged) // batch_size * batch_size
            for start in range(0, full, batch_size):
                yield criteo_batch(merged.slice(start, start + batch_size), self.features)
            rest = merged.slice(full, len(merged))
            pending, pending_count = [rest], len(rest)


@dataclass(frozen=True)
class JaggedFeature:
    """A feature stored as jagged row indices, with the table it must index now."""

    name: str
    table_name: str
    num_rows: int
    values: np.ndarray
    """int64 [nnz] stored row indices."""
    offsets: np.ndarray
    """int64 [N + 1] start of each sample's bag in `values`."""


class JaggedArrayDataset(Dataset):
    """Samples with multi-hot features stored as jagged indices (`jagged_indices` layout)."""

    def __init__(
        self,
        labels: np.ndarray,
        dense: np.ndarray,
        features: list[JaggedFeature],
        index_policy: IndexPolicy,
    ) -> None:
        self.labels = labels
        self.dense = dense
        self.features = features
        self.index_policy = index_policy
        self.num_samples = int(labels.shape[0])

    def batches(self, batch_size: int, *, start_batch: int = 0) -> Iterator[Batch]:
        _check_batching(batch_size, start_batch)
        for b in range(start_batch, self.num_batches(batch_size)):
            lo, hi = b * batch_size, (b + 1) * batch_size
            values, lengths = [], []
            for f in self.features:
                start, end = int(f.offsets[lo]), int(f.offsets[hi])
                rows = np.asarray(f.values[start:end], dtype=np.int64)
                values.append(
                    apply_index_policy(
                        rows,
                        num_rows=f.num_rows,
                        policy=self.index_policy,
                        table=f.table_name,
                        feature=f.name,
                    )
                )
                lengths.append(np.diff(np.asarray(f.offsets[lo : hi + 1])))
            yield make_batch(
                labels=self.labels[lo:hi],
                dense=self.dense[lo:hi],
                keys=[f.name for f in self.features],
                values=values,
                lengths=lengths,
            )
