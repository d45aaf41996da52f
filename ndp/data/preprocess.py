"""Criteo TSV -> the columnar format (`ndp.data.columnar`, layout `criteo_raw`).

Why: parsing text is the slow part of reading Criteo; done once, training reads
memory-mapped arrays. Raw 32-bit categorical ids are kept (not rows), so one preprocessed
copy serves every table size and `max_rows_per_table`.

The split is by line position over the input files in order: the last `val_fraction` of the
lines (`ndp.data.criteo.split_line`) go to `val/`, the rest to `train/` -- the same rule the
loader applies to TSV input, so both paths give the same samples. Input is streamed in
chunks; memory does not grow with the input size. Inputs are chosen and opened as for
training (`ndp.data.inputs`: plain or gzip-compressed TSV, a UTF-8 BOM skipped).

Input that yields no sample (empty, or every line dropped under `bad_line_policy=skip`) is
refused like training refuses it (`criteo.require_samples`), and whatever was written for
it is removed: a failed run leaves `--output` as it found it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ndp.config import NUM_DENSE_FEATURES, DataConfig
from ndp.data.columnar import SPLITS, NpyAppender, write_meta
from ndp.data.criteo import (
    CHUNK_LINES,
    NUM_CATEGORICAL_FEATURES,
    CriteoReader,
    require_samples,
    split_line,
    tsv_files,
)
from ndp.errors import DataError


def prepare_output_dir(output_dir: str | Path) -> Path:
    """An output directory that does not exist yet or is empty (never overwrite data)."""
    output = Path(output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DataError(
            f"--output {output}: exists and is not an empty directory; choose a new directory "
            "or remove this one"
        )
    output.mkdir(parents=True, exist_ok=True)
    return output


def preprocess_criteo(
    inputs: list[str | Path],
    output_dir: str | Path,
    *,
    data: DataConfig,
    val_fraction: float,
    chunk_lines: int = CHUNK_LINES,
) -> dict[str, Any]:
    """Parse TSV files (or directories of them) into train/ and val/ columnar splits.

    Args:
        inputs: TSV files (plain or gzip) or directories of them (`ndp.data.inputs`), read in
            this order.
        data: supplies `bad_line_policy` and `nan_policy`.
        val_fraction: fraction of lines (the last ones) written to val/.

    Returns:
        The content of the written meta.json.

    Raises:
        DataError: an input is missing or unsupported, a line is malformed (under `fail`), or
            the input holds no sample; nothing is left in `output_dir` then.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    files = [f for path in inputs for f in tsv_files(path)]
    reader = CriteoReader(
        files,
        bad_line_policy=data.bad_line_policy,
        nan_policy=data.nan_policy,
        chunk_lines=chunk_lines,
    )
    source = " ".join(str(path) for path in inputs)
    output_existed = Path(output_dir).exists()
    output = prepare_output_dir(output_dir)
    try:
        splits = _write_splits(reader, output, val_fraction)
        require_samples(source, reader)
    except BaseException:
        _remove_written(output, keep_dir=output_existed)
        raise
    meta = {
        "layout": "criteo_raw",
        "num_dense_features": NUM_DENSE_FEATURES,
        "splits": splits,
        "source": "criteo",
        "source_files": [str(f.resolve()) for f in files],
        "total_lines": reader.total_lines,
        "skipped_lines": reader.skipped_lines,
        "val_fraction": val_fraction,
        "bad_line_policy": data.bad_line_policy,
        "nan_policy": data.nan_policy,
    }
    # written last: a directory without meta.json is never taken for data
    return write_meta(output, meta)


def _write_splits(reader: CriteoReader, output: Path, val_fraction: float) -> dict[str, Any]:
    """Stream every line of `reader` into output/train and output/val; their meta entries."""
    first_val_line = split_line(reader.total_lines, val_fraction)
    ranges = {"train": (0, first_val_line), "val": (first_val_line, reader.total_lines)}
    splits = {}
    for split, (line_start, line_end) in ranges.items():
        directory = output / split
        labels = NpyAppender(directory / "labels.npy", np.float32)
        dense = NpyAppender(directory / "dense.npy", np.float32, (NUM_DENSE_FEATURES,))
        cat_ids = NpyAppender(directory / "cat_ids.npy", np.uint32, (NUM_CATEGORICAL_FEATURES,))
        for rows in reader.rows(line_start, line_end):
            labels.append(rows.labels)
            dense.append(rows.dense)
            cat_ids.append(rows.cat_ids)
        for appender in (labels, dense, cat_ids):
            appender.close()
        splits[split] = {"num_samples": labels.length, "lines": [line_start, line_end]}
    return splits


def _remove_written(output: Path, *, keep_dir: bool) -> None:
    """Undo a failed preprocess: its splits, and `output` itself if this run created it."""
    if not keep_dir:
        shutil.rmtree(output, ignore_errors=True)
        return
    for split in SPLITS:
        shutil.rmtree(output / split, ignore_errors=True)
