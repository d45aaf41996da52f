"""Synthetic Criteo-shaped data: power-law rows, multi-hot bags, labels a model can learn.

Why synthetic data: benchmarks need tables of any size (billions of rows) with the access
skew of production traces, and tests need data with a known ground truth.

How one sample is made (all deterministic in `data.synthetic.seed`):

- **Rows.** Each feature draws ranks from a bounded Zipf over its table's `num_rows` items,
  p(rank) ~ rank^-s, by rejection-inversion (Hörmann & Derflinger 1996): O(1) memory per
  table whatever its size. Ranks map to row ids through a seeded bijection of [0, num_rows)
  (a 4-round Feistel network over the smallest even bit width that covers the table, with
  cycle-walking back into range), so the hot rows are spread over the table, never rows
  0..k, and no permutation array is ever built.
- **Bags.** Lengths are `fixed` (round(mean)), `poisson` (1 + Poisson(mean - 1)) or
  `uniform` (floor(U[1, 2 mean))), all >= 1, mean `pooling_factor` (one, or one per feature).
- **Dense.** Feature j is log(1 + floor(X_j)) with X_j log-normal (skewed counts like Criteo).
- **Labels.** A hidden logit ``a * D + b * S + bias``: D is a fixed random linear function of
  the dense features, S the sum over features of the bag mean of a per-row "preference" in
  [-1, 1] (a hash of the table and row). D and S are standardised on a pilot sample and the
  bias is set by bisection so the positive rate is `positive_rate`; label ~ Bernoulli(sigmoid).

Samples are produced in blocks of `BLOCK_SAMPLES`; block j of a split comes from its own
random stream keyed by (seed, split, j), so batch i is cheap to make from any start and the
data does not depend on the batch size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ndp.config import Config
from ndp.config_loader import to_dict
from ndp.data.batch import Batch
from ndp.data.columnar import NpyAppender, write_meta
from ndp.data.dataset import Dataset, _check_batching, make_batch
from ndp.model.init import _splitmix64, table_key

Split = Literal["train", "val"]
BLOCK_SAMPLES = 4096
_SPLIT_CODES = {"train": 0, "val": 1, "pilot": 2}
_PILOT_SAMPLES = 8192
_FEISTEL_ROUNDS = 4
_DENSE_WEIGHT = 2.0
_SPARSE_WEIGHT = 1.5


# --------------------------------------------------------------------------- permutation


class RowPermutation:
    """A seeded bijection of [0, num_rows), evaluated per index (never materialised)."""

    def __init__(self, num_rows: int, key: int) -> None:
        if num_rows <= 0:
            raise ValueError(f"num_rows {num_rows} must be > 0")
        self.num_rows = num_rows
        bits = max(2, int(num_rows - 1).bit_length())
        bits += bits % 2
        self.half_bits = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        keys = _splitmix64(np.uint64(key) + np.arange(_FEISTEL_ROUNDS, dtype=np.uint64))
        self.round_keys = [np.uint64(k) for k in keys]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half_bits, x & self.mask
        for key in self.round_keys:
            left, right = right, left ^ (_splitmix64(right ^ key) & self.mask)
        return (left << self.half_bits) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """Row ids (int64) of positions `index` (int64 in [0, num_rows))."""
        out = self._encrypt(np.asarray(index, dtype=np.uint64))
        outside = np.flatnonzero(out >= np.uint64(self.num_rows))
        while outside.size:  # cycle-walking: the domain is < 4 * num_rows, so this is short
            out[outside] = self._encrypt(out[outside])
            outside = outside[out[outside] >= np.uint64(self.num_rows)]
        return out.astype(np.int64)


# --------------------------------------------------------------------------- Zipf


def _log1p_over_x(x: np.ndarray) -> np.ndarray:
    small = np.abs(x) < 1e-8
    safe = np.where(small, 1.0, x)
    return np.where(small, 1.0 - x * (0.5 - x / 3.0), np.log1p(safe) / safe)


def _expm1_over_x(x: np.ndarray) -> np.ndarray:
    small = np.abs(x) < 1e-8
    safe = np.where(small, 1.0, x)
    return np.where(small, 1.0 + x * (0.5 + x / 6.0), np.expm1(safe) / safe)


class ZipfSampler:
    """Bounded Zipf on ranks 1..n, p(k) ~ k^-s, by rejection-inversion.

    Hörmann & Derflinger, "Rejection-inversion to generate variates from monotone discrete
    distributions" (1996), as in Apache Commons' RejectionInversionZipfSampler: invert the
    integral of the hat function h(x) = x^-s and accept with an O(1) test; the expected number
    of tries per sample is close to 1 for any n, and nothing of size n is stored.
    """

    def __init__(self, num_items: int, exponent: float) -> None:
        self.n = float(num_items)
        self.s = float(exponent)
        self.h_integral_x1 = float(self._h_integral(np.float64(1.5))) - 1.0
        self.h_integral_n = float(self._h_integral(np.float64(self.n + 0.5)))
        self.squeeze = 2.0 - float(
            self._h_integral_inverse(self._h_integral(np.float64(2.5)) - self._h(np.float64(2.0)))
        )

    def _h(self, x: np.ndarray) -> np.ndarray:
        return np.exp(-self.s * np.log(x))

    def _h_integral(self, x: np.ndarray) -> np.ndarray:
        log_x = np.log(x)
        return _expm1_over_x((1.0 - self.s) * log_x) * log_x

    def _h_integral_inverse(self, x: np.ndarray) -> np.ndarray:
        t = np.maximum(x * (1.0 - self.s), -1.0)
        return np.exp(_log1p_over_x(t) * x)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Ranks int64 [size] in [1, n]."""
        ranks = np.empty(size, np.int64)
        todo = np.arange(size)
        while todo.size:
            u = self.h_integral_n + rng.random(todo.size) * (self.h_integral_x1 - self.h_integral_n)
            x = self._h_integral_inverse(u)
            k = np.clip(np.floor(x + 0.5), 1.0, self.n)
            accept = (k - x <= self.squeeze) | (u >= self._h_integral(k + 0.5) - self._h(k))
            ranks[todo[accept]] = k[accept].astype(np.int64)
            todo = todo[~accept]
        return ranks


def fit_zipf_exponent(rows: np.ndarray, top_ranks: int = 100) -> float:
    """Exponent s of a power law fitted to the rank-frequency curve of `rows` (top ranks).

    Least squares of log(frequency) on log(rank) over the `top_ranks` most frequent rows.
    """
    counts = np.sort(np.unique(rows, return_counts=True)[1])[::-1][:top_ranks]
    ranks = np.arange(1, counts.size + 1)
    slope = np.polyfit(np.log(ranks), np.log(counts), 1)[0]
    return float(-slope)


# --------------------------------------------------------------------------- generator


@dataclass
class SyntheticBlock:
    """Samples of one block.

    Attributes:
        labels: float32 [n].  dense: float32 [n, dense_in_features].
        values: per feature int64 [nnz_f] rows.  lengths: per feature int32 [n].
    """

    labels: np.ndarray
    dense: np.ndarray
    values: list[np.ndarray]
    lengths: list[np.ndarray]

    def slice(self, start: int, end: int) -> SyntheticBlock:
        values = []
        for v, length in zip(self.values, self.lengths, strict=True):
            offsets = np.concatenate([[0], np.cumsum(length, dtype=np.int64)])
            values.append(v[offsets[start] : offsets[end]])
        return SyntheticBlock(
            labels=self.labels[start:end],
            dense=self.dense[start:end],
            values=values,
            lengths=[length[start:end] for length in self.lengths],
        )

    @staticmethod
    def concat(parts: list[SyntheticBlock]) -> SyntheticBlock:
        if len(parts) == 1:
            return parts[0]
        return SyntheticBlock(
            labels=np.concatenate([p.labels for p in parts]),
            dense=np.concatenate([p.dense for p in parts]),
            values=[np.concatenate(v) for v in zip(*(p.values for p in parts), strict=True)],
            lengths=[np.concatenate(v) for v in zip(*(p.lengths for p in parts), strict=True)],
        )


@dataclass(frozen=True)
class _Feature:
    name: str
    table_name: str
    num_rows: int
    pooling_factor: float
    zipf: ZipfSampler
    permutation: RowPermutation
    preference_key: np.uint64


class SyntheticGenerator:
    """The hidden data-generating process of a config (pure: arrays in, arrays out)."""

    def __init__(self, cfg: Config) -> None:
        syn = cfg.data.synthetic
        self.seed = syn.seed
        self.distribution = syn.pooling_distribution
        names = cfg.model.feature_names
        factors = (
            syn.pooling_factor
            if isinstance(syn.pooling_factor, list)
            else [syn.pooling_factor] * len(names)
        )
        factor_of = dict(zip(names, factors, strict=True))
        self.features = [
            _Feature(
                name=name,
                table_name=table.name,
                num_rows=table.num_rows,
                pooling_factor=float(factor_of[name]),
                zipf=ZipfSampler(table.num_rows, syn.zipf_exponent),
                permutation=RowPermutation(table.num_rows, int(table_key(syn.seed, table.name))),
                preference_key=table_key(syn.seed, "preference:" + table.name),
            )
            for table in cfg.model.effective_tables()
            for name in table.features
        ]
        self.num_dense = cfg.model.dense_in_features
        params = np.random.default_rng([syn.seed, 7919])
        self.dense_log_mean = params.uniform(0.0, 4.0, self.num_dense)
        self.dense_log_sigma = params.uniform(0.5, 1.5, self.num_dense)
        self.dense_weights = params.standard_normal(self.num_dense)
        # standardise both logit parts on a pilot sample, then fit the bias to positive_rate
        self._center = np.zeros(2)
        self._scale = np.ones(2)
        pilot = self._inputs(self._rng("pilot", 0), _PILOT_SAMPLES)
        parts = self._score_parts(*pilot)
        self._center = parts.mean(axis=0)
        self._scale = parts.std(axis=0) + 1e-12
        logits = self._logits(*pilot)
        self.bias = _bias_for_rate(logits, syn.positive_rate)

    def _rng(self, split: str, block: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODES[split], block])

    def _bag_lengths(self, rng: np.random.Generator, mean: float, size: int) -> np.ndarray:
        if self.distribution == "fixed":
            lengths = np.full(size, max(1, round(mean)))
        elif self.distribution == "poisson":
            lengths = 1 + rng.poisson(mean - 1.0, size)
        else:
            lengths = np.floor(rng.uniform(1.0, 2.0 * mean, size))
        return np.maximum(lengths, 1).astype(np.int32)

    def _inputs(
        self, rng: np.random.Generator, size: int
    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        counts = np.floor(
            rng.lognormal(self.dense_log_mean, self.dense_log_sigma, (size, self.num_dense))
        )
        dense = np.log1p(counts).astype(np.float32)
        values, lengths = [], []
        for f in self.features:
            bag_lengths = self._bag_lengths(rng, f.pooling_factor, size)
            ranks = f.zipf.sample(rng, int(bag_lengths.sum()))
            values.append(f.permutation(ranks - 1))
            lengths.append(bag_lengths)
        return dense, values, lengths

    def preference(self, feature: int, rows: np.ndarray) -> np.ndarray:
        """Hidden per-row preference in [-1, 1) of a feature's table rows."""
        bits = _splitmix64(rows.astype(np.uint64) ^ self.features[feature].preference_key)
        return (bits >> np.uint64(11)).astype(np.float64) * (2.0 / (1 << 53)) - 1.0

    def _score_parts(
        self, dense: np.ndarray, values: list[np.ndarray], lengths: list[np.ndarray]
    ) -> np.ndarray:
        """[n, 2]: the raw dense part D and sparse part S of the hidden logit."""
        dense_part = dense.astype(np.float64) @ self.dense_weights
        sparse_part = np.zeros(dense.shape[0])
        for i, (v, length) in enumerate(zip(values, lengths, strict=True)):
            starts = np.concatenate([[0], np.cumsum(length[:-1], dtype=np.int64)])
            sparse_part += np.add.reduceat(self.preference(i, v), starts) / length
        return np.stack([dense_part, sparse_part], axis=1)

    def _logits(
        self, dense: np.ndarray, values: list[np.ndarray], lengths: list[np.ndarray]
    ) -> np.ndarray:
        parts = (self._score_parts(dense, values, lengths) - self._center) / self._scale
        return _DENSE_WEIGHT * parts[:, 0] + _SPARSE_WEIGHT * parts[:, 1]

    def hidden_logits(self, block: SyntheticBlock) -> np.ndarray:
        """The logit the labels of `block` were drawn from (ground truth for tests)."""
        return self._logits(block.dense, block.values, block.lengths) + self.bias

    def block(self, split: Split, index: int, size: int) -> SyntheticBlock:
        """Block `index` of a split: `size` samples from the stream (seed, split, index)."""
        rng = self._rng(split, index)
        dense, values, lengths = self._inputs(rng, size)
        probability = 1.0 / (1.0 + np.exp(-(self._logits(dense, values, lengths) + self.bias)))
        labels = (rng.random(size) < probability).astype(np.float32)
        return SyntheticBlock(labels=labels, dense=dense, values=values, lengths=lengths)


def _bias_for_rate(logits: np.ndarray, rate: float) -> float:
    """Bias b with mean(sigmoid(logits + b)) == rate (bisection; the mean is monotone in b)."""
    low, high = -30.0, 30.0
    for _ in range(80):
        mid = (low + high) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logits + mid)))) < rate:
            low = mid
        else:
            high = mid
    return (low + high) / 2


# --------------------------------------------------------------------------- dataset


class SyntheticDataset(Dataset):
    """A split of synthetic data, generated on the fly block by block."""

    def __init__(self, cfg: Config, split: Split, generator: SyntheticGenerator | None = None):
        self.generator = generator or SyntheticGenerator(cfg)
        self.split = split
        syn = cfg.data.synthetic
        self.num_samples = syn.num_samples if split == "train" else syn.num_val_samples
        self.feature_names = [f.name for f in self.generator.features]
        self._cached: tuple[int, SyntheticBlock] | None = None

    def block(self, index: int) -> SyntheticBlock:
        """Block `index` of this split (the last one may be short)."""
        if self._cached is None or self._cached[0] != index:
            size = min(BLOCK_SAMPLES, self.num_samples - index * BLOCK_SAMPLES)
            self._cached = (index, self.generator.block(self.split, index, size))
        return self._cached[1]

    def samples(self, start: int, end: int) -> SyntheticBlock:
        """Samples [start, end) of the split."""
        parts = []
        for index in range(start // BLOCK_SAMPLES, (end - 1) // BLOCK_SAMPLES + 1):
            base = index * BLOCK_SAMPLES
            block = self.block(index)
            parts.append(block.slice(max(start - base, 0), min(end - base, len(block.labels))))
        return SyntheticBlock.concat(parts)

    def batches(self, batch_size: int, *, start_batch: int = 0) -> Iterator[Batch]:
        _check_batching(batch_size, start_batch)
        for b in range(start_batch, self.num_batches(batch_size)):
            part = self.samples(b * batch_size, (b + 1) * batch_size)
            yield make_batch(
                labels=part.labels,
                dense=part.dense,
                keys=self.feature_names,
                values=part.values,
                lengths=part.lengths,
            )


def write_synthetic(cfg: Config, output_dir: str | Path) -> dict:
    """Write both splits in the `jagged_indices` columnar layout; returns meta.json's content."""
    output = Path(output_dir)
    generator = SyntheticGenerator(cfg)
    splits = {}
    for split in ("train", "val"):
        dataset = SyntheticDataset(cfg, split, generator)
        directory = output / split
        labels = NpyAppender(directory / "labels.npy", np.float32)
        dense = NpyAppender(directory / "dense.npy", np.float32, (generator.num_dense,))
        values = [
            NpyAppender(directory / "sparse" / f"{k}.values.npy", np.int64)
            for k in range(len(generator.features))
        ]
        lengths = [
            NpyAppender(directory / "sparse" / f"{k}.lengths.npy", np.int32)
            for k in range(len(generator.features))
        ]
        for index in range((dataset.num_samples + BLOCK_SAMPLES - 1) // BLOCK_SAMPLES):
            block = dataset.block(index)
            labels.append(block.labels)
            dense.append(block.dense)
            for k in range(len(generator.features)):
                values[k].append(block.values[k])
                lengths[k].append(block.lengths[k])
        for appender in (labels, dense, *values, *lengths):
            appender.close()
        splits[split] = {"num_samples": dataset.num_samples}
    meta = {
        "layout": "jagged_indices",
        "num_dense_features": generator.num_dense,
        "splits": splits,
        "features": [
            {"name": f.name, "table": f.table_name, "num_rows": f.num_rows}
            for f in generator.features
        ],
        "source": "synthetic",
        "synthetic": to_dict(cfg.data.synthetic),
    }
    return write_meta(output, meta)
