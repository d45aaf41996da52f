"""`build_datasets(cfg) -> (train, val)`: the one place that turns `cfg.data` into datasets.

Sources:

- `data.source: synthetic`: `SyntheticDataset`s for the `train` and `val` streams.
- `data.source: criteo` with `data.path` one of
    * a TSV file (plain or gzip-compressed, e.g. Criteo 1TB's `day_0.gz`) or a directory of
      them (which files it may hold: `ndp.data.inputs`): without `data.val_path` the last
      `data.val_fraction` of the lines are the validation split (`criteo.split_line`), else
      all lines train. Inputs up to `IN_MEMORY_TSV_BYTES` of (decompressed) text are parsed
      once into memory; larger ones are streamed chunk by chunk on every pass. An empty
      input, or one whose every line `data.bad_line_policy=skip` dropped, is a `DataError`
      naming it (`criteo.require_samples`; streamed input is only parsed while training,
      where the training loop's "fewer than one batch" refuses it).
    * a directory made by `ndp-data preprocess` / `ndp-data synth` (has meta.json): its
      `train/` split trains and its `val/` split validates (the split was fixed when it was
      written; `data.val_fraction` does not re-split it).
  `data.val_path` (same forms) replaces the validation split: a TSV source is read whole, a
  preprocessed one gives its `val/` split, or its `train/` split if `val/` is empty (as
  written with `--val-fraction 0`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ndp.config import Config
from ndp.data.columnar import SPLITS, is_columnar_dir, load_array, read_meta
from ndp.data.criteo import (
    CriteoReader,
    criteo_features,
    require_samples,
    split_line,
    tsv_files,
)
from ndp.data.dataset import (
    CriteoArrayDataset,
    CriteoStreamDataset,
    Dataset,
    JaggedArrayDataset,
    JaggedFeature,
)
from ndp.data.synthetic import SyntheticDataset, SyntheticGenerator
from ndp.errors import DataError

__all__ = ["Dataset", "build_datasets", "open_columnar", "open_tsv"]

log = logging.getLogger("ndp.data")

IN_MEMORY_TSV_BYTES = 256 << 20
"""TSV input up to this much text (decompressed) is parsed once at build time; larger input
is streamed."""


def build_datasets(cfg: Config) -> tuple[Dataset, Dataset]:
    """Train and validation datasets of a run (see the module docstring for the sources)."""
    if cfg.data.source == "synthetic":
        generator = SyntheticGenerator(cfg)
        return (
            SyntheticDataset(cfg, "train", generator),
            SyntheticDataset(cfg, "val", generator),
        )
    assert cfg.data.path is not None, "validated by DataConfig"
    path = Path(cfg.data.path)
    if is_columnar_dir(path):
        train = open_columnar(path, "train", cfg)
        if cfg.data.val_path is None:
            return train, open_columnar(path, "val", cfg)
    elif cfg.data.val_path is None:
        return open_tsv(path, cfg, holdout=True)
    else:
        train, _ = open_tsv(path, cfg, holdout=False)
    val_path = Path(cfg.data.val_path)
    if is_columnar_dir(val_path):
        has_val = read_meta(val_path)["splits"]["val"]["num_samples"] > 0
        return train, open_columnar(val_path, "val" if has_val else "train", cfg)
    val, _ = open_tsv(val_path, cfg, holdout=False)
    return train, val


def open_tsv(
    path: str | Path,
    cfg: Config,
    *,
    holdout: bool,
    in_memory_max_bytes: int = IN_MEMORY_TSV_BYTES,
) -> tuple[Dataset, Dataset]:
    """Datasets over TSV input: (first part, last `val_fraction` of lines) if `holdout`,
    else (all lines, an empty dataset)."""
    features = criteo_features(cfg.model)
    files = tsv_files(path)
    reader = CriteoReader(
        files, bad_line_policy=cfg.data.bad_line_policy, nan_policy=cfg.data.nan_policy
    )
    total = reader.total_lines
    first_val_line = split_line(total, cfg.data.val_fraction) if holdout else total
    ranges = [(0, first_val_line), (first_val_line, total)]
    if reader.text_bytes <= in_memory_max_bytes:  # empty input included: 0 bytes
        rows = [reader.read_all(lo, hi) for lo, hi in ranges]
        require_samples(str(path), reader)
        first, second = (CriteoArrayDataset(r, features) for r in rows)
        first.skipped_lines = second.skipped_lines = reader.skipped_lines
    else:
        first, second = (CriteoStreamDataset(reader, features, lo, hi) for lo, hi in ranges)
    return first, second


def open_columnar(directory: str | Path, split: str, cfg: Config) -> Dataset:
    """One split of a preprocessed directory, memory-mapped."""
    directory = Path(directory)
    meta = read_meta(directory)
    assert split in SPLITS
    width = meta["num_dense_features"]
    if width != cfg.model.dense_in_features:
        raise DataError(
            f"{directory}: holds {width} dense features, model.dense_in_features is "
            f"{cfg.model.dense_in_features}"
        )
    split_dir = directory / split
    if meta["layout"] == "criteo_raw":
        dataset: Dataset = CriteoArrayDataset.from_directory(split_dir, criteo_features(cfg.model))
    else:
        dataset = _open_jagged(directory, split_dir, meta, cfg)
    dataset.skipped_lines = int(meta.get("skipped_lines", 0))
    expected = meta["splits"][split]["num_samples"]
    if dataset.num_samples != expected:
        raise DataError(
            f"{split_dir}: holds {dataset.num_samples} samples, meta.json says {expected}; the "
            "directory is incomplete, write it again"
        )
    return dataset


def _open_jagged(directory: Path, split_dir: Path, meta: dict, cfg: Config) -> Dataset:
    stored = {f["name"]: k for k, f in enumerate(meta["features"])}
    features = []
    for table in cfg.model.effective_tables():
        for name in table.features:
            if name not in stored:
                raise DataError(
                    f"{directory}: has no feature {name!r} (model.tables: {table.name}); it "
                    f"holds {', '.join(stored)}"
                )
            k = stored[name]
            lengths = load_array(split_dir / "sparse" / f"{k}.lengths.npy")
            offsets = np.zeros(lengths.shape[0] + 1, np.int64)
            np.cumsum(lengths, out=offsets[1:])
            features.append(
                JaggedFeature(
                    name=name,
                    table_name=table.name,
                    num_rows=table.num_rows,
                    values=load_array(split_dir / "sparse" / f"{k}.values.npy"),
                    offsets=offsets,
                )
            )
    return JaggedArrayDataset(
        labels=load_array(split_dir / "labels.npy"),
        dense=load_array(split_dir / "dense.npy"),
        features=features,
        index_policy=cfg.data.index_policy,
    )
