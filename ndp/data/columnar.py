"""The preprocessed columnar format written by `ndp-data` and memory-mapped by the loader.

Why columnar .npy files: a training run reads contiguous sample ranges; numpy's memory map
turns that into page-cache reads with no parsing, and every array is readable by any tool.

Directory layout::

    DIR/
      meta.json                  format, layout, per-split counts, provenance
      train/                     one directory per split ("train", "val")
        labels.npy               float32 [N]
        dense.npy                float32 [N, 13]   log(1 + max(x, 0)) already applied
        cat_ids.npy              uint32  [N, 26]   layout "criteo_raw": raw hex ids
        sparse/<k>.values.npy    int64   [nnz_k]   layout "jagged_indices": row indices of
        sparse/<k>.lengths.npy   int32   [N]       feature k (meta "features"[k]), bag lengths
      val/ ...

meta.json::

    {"format": "ndp-columnar", "format_version": 1,
     "layout": "criteo_raw" | "jagged_indices",
     "num_dense_features": 13,
     "splits": {"train": {"num_samples": N}, "val": {"num_samples": M}},
     "features": [{"name": "cat_0", "table": "t_cat_0", "num_rows": 1460}, ...],  # jagged only
     "source_files": [...], "skipped_lines": 0, "val_fraction": 0.1, ...}

`criteo_raw` keeps the 32-bit raw ids so that the same files serve any table size (rows are
`raw_id mod num_rows` at batch time); `jagged_indices` stores rows directly (synthetic data,
multi-hot) and the loader applies `data.index_policy` to rows outside the configured tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ndp.errors import DataError

FORMAT = "ndp-columnar"
FORMAT_VERSION = 1
META_FILE = "meta.json"
LAYOUTS = ("criteo_raw", "jagged_indices")
SPLITS = ("train", "val")
_HEADER_BYTES = 128  # fixed .npy header size, so the shape can be patched after streaming


def is_columnar_dir(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


class NpyAppender:
    """Writes a .npy file whose first dimension grows as chunks are appended.

    Why: a streamed preprocess does not know the sample count in advance. The header is
    written with a fixed size and rewritten with the final shape on `close`.
    """

    def __init__(self, path: Path, dtype: np.dtype | type, row_shape: tuple[int, ...] = ()):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.row_shape = row_shape
        self.length = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._write_header()

    def _write_header(self) -> None:
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.length, *self.row_shape),
        }
        text = repr(header).encode("latin1")
        padding = _HEADER_BYTES - 10 - len(text) - 1
        assert padding >= 0, "npy header does not fit"
        self._handle.seek(0)
        self._handle.write(b"\x93NUMPY\x01\x00")
        self._handle.write((_HEADER_BYTES - 10).to_bytes(2, "little"))
        self._handle.write(text + b" " * padding + b"\n")

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        assert array.shape[1:] == self.row_shape, (array.shape, self.row_shape)
        self._handle.write(array.tobytes())
        self.length += array.shape[0]

    def close(self) -> None:
        self._write_header()
        self._handle.close()


def write_meta(directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write meta.json (format and version added); returns what was written."""
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    assert full["layout"] in LAYOUTS
    (directory / META_FILE).write_text(json.dumps(full, indent=2) + "\n")
    return full


def read_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json of a preprocessed directory, checked for format and version."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable meta.json ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("layout") not in LAYOUTS:
        raise DataError(
            f"{path}: not an ndp preprocessed directory (format {meta.get('format')!r}, "
            f"layout {meta.get('layout')!r}); make one with `ndp-data preprocess` or `ndp-data synth`"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {meta.get('format_version')} is not supported (this ndp "
            f"reads version {FORMAT_VERSION}); preprocess the data again"
        )
    return meta


def load_array(path: Path) -> np.ndarray:
    """A .npy file, memory-mapped read-only."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read ({exc}); preprocess the data again") from None
