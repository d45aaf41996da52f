"""Criteo TSV blocks parsed with pyarrow's columnar CSV reader: the fast path of preprocessing.

Why a second parser beside `ndp.data.criteo.parse_lines`: splitting text into fields is most
of the cost of reading Criteo, and pyarrow's C++ reader does it several times faster than
numpy can. It is only trusted on blocks it fully decides: a block of clean Criteo lines
(40 fields, label 0/1, decimal dense values, hex ids of at most 8 digits) gives the same
rows as `parse_lines`, and any block that holds something else -- a malformed line, a field
pyarrow would read differently from `parse_lines` (`+5`, `0x1f`, a carriage return, a BOM,
NaN, 19-digit numbers) -- is handed whole to `parse_lines`, so that what counts as malformed
and how it is described (`file:line: problem`) stays defined in one place.

A block is read with every column as bytes (an empty field is null)::

    column   0        1 .. 13                       14 .. 39
             label    dense: arrow's int64 cast     categorical: hex, decoded with numpy
                      (null -> 0), then             right-aligned in [n, 8] characters,
                      log(1 + max(x, 0))            one lookup, nibbles packed to uint32
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from ndp.config import NUM_DENSE_FEATURES
from ndp.data.criteo import NUM_CATEGORICAL_FEATURES, NUM_FIELDS, CriteoRows, parse_lines
from ndp.data.inputs import UTF8_BOM

_COLUMN_NAMES = [f"f{i}" for i in range(NUM_FIELDS)]
_READ = pa_csv.ReadOptions(column_names=_COLUMN_NAMES, use_threads=False, block_size=4 << 20)
_PARSE = pa_csv.ParseOptions(
    delimiter="\t",
    quote_char=False,
    escape_char=False,
    double_quote=False,
    newlines_in_values=False,
    ignore_empty_lines=False,  # an empty line is a malformed line, not nothing
)
_CONVERT = pa_csv.ConvertOptions(
    column_types={name: pa.binary() for name in _COLUMN_NAMES},
    null_values=[""],
    strings_can_be_null=True,
    quoted_strings_can_be_null=False,
)
_MAX_DENSE_CHARS = 18  # parse_lines reads up to 18 digits plus a sign; longer -> parse_lines
_HEX_DIGITS = 8
_HEX = np.full(256, 255, dtype=np.uint8)
for _value, _char in enumerate("0123456789abcdef"):
    _HEX[ord(_char)] = _HEX[ord(_char.upper())] = _value
# bytes pyarrow reads differently from parse_lines: line ends, "0x" prefixes
_UNDECIDED_BYTES = (b"\r", b"x", b"X")


def parse_block(
    text: bytes,
    *,
    source: str,
    first_line: int,
    bad_line_policy: Literal["fail", "skip"] = "fail",
    nan_policy: Literal["fail", "zero"] = "fail",
) -> tuple[CriteoRows, dict[int, str]]:
    """Parse a block of whole TSV lines; the contract of `criteo.parse_lines`.

    Args:
        text: lines, each ending in a newline except perhaps the last.
        source: file name used in error messages.
        first_line: 1-based line number of the block's first line in `source`.

    Returns:
        rows: the well-formed lines, in order.
        skipped: {1-based line number: problem} of the lines dropped under `skip`.

    Raises:
        DataError: `source:line: problem` for the first malformed line under `fail`.
    """
    rows = _parse_clean(text)
    if rows is not None:
        return rows, {}
    return parse_lines(
        list(io.BytesIO(text)),  # split at b"\n" only, as a file is iterated
        source=source,
        first_line=first_line,
        bad_line_policy=bad_line_policy,
        nan_policy=nan_policy,
    )


def count_lines(text: bytes) -> int:
    """Lines of a block (a last line without newline counts)."""
    return text.count(b"\n") + (bool(text) and not text.endswith(b"\n"))


def _parse_clean(text: bytes) -> CriteoRows | None:
    """Rows of a block of clean Criteo lines, or None if the block holds anything else."""
    if not text or text.startswith(UTF8_BOM) or any(b in text for b in _UNDECIDED_BYTES):
        return None
    try:
        table = pa_csv.read_csv(
            pa.py_buffer(text), read_options=_READ, parse_options=_PARSE, convert_options=_CONVERT
        )
    except pa.ArrowInvalid:  # a line without 40 fields
        return None
    if table.num_rows != count_lines(text):
        return None
    columns = [table.column(i).combine_chunks() for i in range(NUM_FIELDS)]
    labels = _labels(columns[0])
    if labels is None:
        return None
    dense = _dense(columns[1 : 1 + NUM_DENSE_FEATURES])
    if dense is None:
        return None
    cat_ids = _cat_ids(columns[1 + NUM_DENSE_FEATURES :])
    if cat_ids is None:
        return None
    return CriteoRows(labels=labels, dense=dense, cat_ids=cat_ids)


def _bytes_of(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """offsets int64 [n + 1] into data uint8 of a binary array (a null has length 0)."""
    buffers = column.buffers()
    offsets = np.frombuffer(buffers[1], np.int32)[column.offset : column.offset + len(column) + 1]
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    return offsets.astype(np.int64), data


def _labels(column: pa.Array) -> np.ndarray | None:
    """float32 [n] of a label column of only `0` and `1`."""
    offsets, data = _bytes_of(column)
    if column.null_count or not (np.diff(offsets) == 1).all():
        return None
    chars = data[offsets[:-1]]
    if not ((chars == ord("0")) | (chars == ord("1"))).all():
        return None
    return (chars == ord("1")).astype(np.float32)


def _dense(columns: list[pa.Array]) -> np.ndarray | None:
    """float32 [n, 13] log(1 + max(x, 0)) of decimal columns (empty is 0)."""
    values = np.empty((len(columns[0]), len(columns)), np.int64)
    for j, column in enumerate(columns):
        offsets, _ = _bytes_of(column)
        if (np.diff(offsets) > _MAX_DENSE_CHARS).any():
            return None
        try:
            parsed = pc.cast(column, pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # not an integer, +5, NaN
            return None
        values[:, j] = parsed.fill_null(0).to_numpy()
    return np.log1p(np.maximum(values, 0).astype(np.float64)).astype(np.float32)


def _cat_ids(columns: list[pa.Array]) -> np.ndarray | None:
    """uint32 [n, 26] of hex columns of at most 8 digits (empty is 0)."""
    num_lines = len(columns[0])
    chars = np.full((num_lines, NUM_CATEGORICAL_FEATURES, _HEX_DIGITS), ord("0"), np.uint8)
    position = np.arange(_HEX_DIGITS)
    for k, column in enumerate(columns):
        offsets, data = _bytes_of(column)
        lengths = np.diff(offsets)
        if (lengths > _HEX_DIGITS).any():
            return None
        full = lengths == _HEX_DIGITS
        if (full | (lengths == 0)).all():  # Criteo's case: 8 digits or empty, no gather
            cells = data[offsets[0] : offsets[-1]].reshape(-1, _HEX_DIGITS)
            if cells.shape[0] == num_lines:
                chars[:, k] = cells
            else:
                chars[full, k] = cells
            continue
        # right-align: character p of a cell of length L sits at end - 8 + p, for p >= 8 - L
        inside = position >= _HEX_DIGITS - lengths[:, None]
        index = offsets[1:, None] - _HEX_DIGITS + position
        chars[:, k][inside] = data[index[inside]]
    digits = _HEX[chars]
    if (digits == 255).any():
        return None
    packed = (digits[..., 0::2] << 4) | digits[..., 1::2]  # [n, 26, 4] bytes, big-endian
    return packed.view(">u4")[..., 0].astype(np.uint32)
