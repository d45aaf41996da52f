"""Index traces for the cache benchmark: the shipped Criteo sample and Zipf streams.

A trace is what one table's cache sees during training: the row ids of each step's batch,
back to back, with `batch_offsets` marking the steps. Criteo rows are hashed exactly as the
data reader does (`raw_id mod num_rows`, `ndp.data.criteo.hash_to_rows`); Zipf rows come from
the synthetic generator's bounded Zipf sampler and seeded row permutation (hot rows spread
over the table).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ndp.data.criteo import CriteoReader, hash_to_rows, tsv_files
from ndp.data.synthetic import RowPermutation, ZipfSampler
from ndp.errors import DataError

KAGGLE_TABLE_ROWS = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
"""Rows of the 26 Criteo Kaggle DLRM tables (facebookresearch/dlrm), table i <- `cat_i`."""


@dataclass(frozen=True)
class Trace:
    """One table's accesses, step by step."""

    name: str
    rows: np.ndarray
    """int64 [n] row ids in access order."""
    batch_offsets: np.ndarray
    """int64 [steps + 1]: step k reads rows[batch_offsets[k]:batch_offsets[k + 1]]."""
    table_num_rows: int

    @property
    def distinct_rows(self) -> int:
        return int(np.unique(self.rows).size)

    def describe(self) -> dict:
        return {
            "trace": self.name,
            "table_num_rows": self.table_num_rows,
            "distinct_rows": self.distinct_rows,
            "accesses": int(self.rows.size),
            "steps": int(self.batch_offsets.size - 1),
        }


def _step_offsets(num_values: int, values_per_step: int) -> np.ndarray:
    offsets = np.arange(0, num_values, values_per_step, dtype=np.int64)
    return np.append(offsets, num_values)


def default_criteo_sample() -> Path:
    """data/criteo_day0_sample.tsv of the repository this package runs from."""
    return Path(__file__).resolve().parents[2] / "data" / "criteo_day0_sample.tsv"


def criteo_traces(
    path: str | Path,
    *,
    table_rows: tuple[int, ...] = KAGGLE_TABLE_ROWS,
    batch_samples: int,
    largest: int,
) -> list[Trace]:
    """Traces of the `largest` tables (by distinct rows in the file) of a Criteo TSV.

    Args:
        path: a Criteo TSV file or directory of them.
        table_rows: rows of table i, fed by categorical column `cat_i` (26 values).
        batch_samples: samples per training step (one-hot: one row per sample per table).
        largest: how many tables to keep, most distinct rows first.

    Raises:
        DataError: the file is missing or cannot be parsed.
    """
    if not Path(path).exists():
        raise DataError(f"{path}: Criteo sample not found; pass a TSV with --criteo")
    cat_ids = CriteoReader(tsv_files(path), bad_line_policy="skip").read_all().cat_ids
    if cat_ids.shape[0] == 0:
        raise DataError(f"{path}: no usable Criteo lines")
    traces = []
    for column, num_rows in enumerate(table_rows):
        rows = hash_to_rows(cat_ids[:, column], num_rows)
        traces.append(
            Trace(
                name=f"criteo:t_cat_{column}",
                rows=rows,
                batch_offsets=_step_offsets(rows.size, batch_samples),
                table_num_rows=num_rows,
            )
        )
    traces.sort(key=lambda t: -t.distinct_rows)
    return traces[:largest]


def zipf_trace(
    *,
    num_rows: int,
    exponent: float,
    num_samples: int,
    pooling_factor: int,
    batch_samples: int,
    seed: int,
) -> Trace:
    """A power-law trace: p(rank) ~ rank^-exponent, ranks mapped to rows by a seeded bijection.

    Args:
        pooling_factor: rows per sample (fixed bag length).
    """
    rng = np.random.default_rng([seed, num_rows])
    ranks = ZipfSampler(num_rows, exponent).sample(rng, num_samples * pooling_factor)
    rows = RowPermutation(num_rows, key=seed)(ranks - 1)
    return Trace(
        name=f"zipf:s={exponent:g},rows={num_rows}",
        rows=rows.astype(np.int64),
        batch_offsets=_step_offsets(rows.size, batch_samples * pooling_factor),
        table_num_rows=num_rows,
    )
