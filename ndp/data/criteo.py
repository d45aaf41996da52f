"""Criteo Display Advertising TSV: parsing, validation and the categorical hash.

One line is one sample, 40 tab-separated fields (numbered from 1 in error messages)::

    field  1        2 .. 14                    15 .. 40
           label    I1 .. I13                  C1 .. C26
           0 or 1   integers, may be empty     hexadecimal ids (1-8 digits), may be empty

Dense features: an empty field is 0; a negative value (Criteo's I2 has a few -1, -2, -3) is
clamped to 0 *before* the transform, because log(1 + x) is undefined below -1 and a negative
count carries no meaning; then x -> log(1 + x), stored as float32. With
`data.nan_policy=zero` a literal NaN/Inf is read as 0, with `fail` it makes the line malformed.

Categorical features: the *raw id* of field C<i+1> is ``int(hex, 16)`` as a uint32 (an empty
field is raw id 0). The model feature ``cat_<i>`` (0 <= i < 26, column 14 + i counted from 0)
looks up the row::

    row = int(hex, 16) mod num_rows

of its table, `num_rows` taken from `cfg.model.effective_tables()`. The hash is a plain
modulo on purpose: it is stable across runs, machines and table resizes of the preprocessed
format (which keeps raw ids), and easy to check by hand.

Malformed lines (wrong field count, a non-integer dense value, a non-hex categorical, a label
other than 0/1, binary garbage, NaN/Inf under `nan_policy=fail`) raise `DataError` naming
`file:line` (1-based, counted in the decompressed text) and what is wrong; with
`data.bad_line_policy=skip` they are dropped and counted (`CriteoReader.skipped_lines`, and a
log line).

Parsing is vectorised per chunk of lines: tab and newline positions of the joined chunk are
found with numpy, fields are gathered into a bytes array `[lines, 40]`, and digits are decoded
with lookup tables. Python code runs per line only to describe a malformed one.

Which files a data path reads (plain or gzip-compressed, what a directory may hold) and how
they are opened is `ndp.data.inputs`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

import numpy as np

from ndp.config import NUM_DENSE_FEATURES, ModelConfig
from ndp.data.inputs import data_files, open_input, scan_input
from ndp.errors import ConfigError, DataError

log = logging.getLogger("ndp.data")

NUM_CATEGORICAL_FEATURES = 26
NUM_FIELDS = 1 + NUM_DENSE_FEATURES + NUM_CATEGORICAL_FEATURES
CHUNK_LINES = 65536
"""Lines parsed together: big enough to amortise numpy calls, small enough for memory."""

_FEATURE_NAME = re.compile(r"cat_(\d+)")
_NON_TEXT = re.compile(rb"[^\t\x20-\x7e]")
_NONFINITE = [
    s.encode() for word in ("nan", "inf", "infinity") for s in (word, "+" + word, "-" + word)
]
_MAX_DECIMAL_DIGITS = 18  # fits int64 without overflow
_MAX_HEX_DIGITS = 8  # uint32 raw ids


def _lookup_table(alphabet: str) -> np.ndarray:
    table = np.full(256, 255, dtype=np.uint8)
    for value, char in enumerate(alphabet):
        table[ord(char)] = value
        table[ord(char.upper())] = value
    return table


_DECIMAL = _lookup_table("0123456789")
_HEX = _lookup_table("0123456789abcdef")


# --------------------------------------------------------------------------- rows


@dataclass
class CriteoRows:
    """Parsed samples, column-wise.

    Attributes:
        labels: float32 [n], 0 or 1.
        dense: float32 [n, 13], log(1 + max(x, 0)).
        cat_ids: uint32 [n, 26], raw categorical ids (hash into a table at batch time).
    """

    labels: np.ndarray
    dense: np.ndarray
    cat_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @staticmethod
    def empty() -> CriteoRows:
        return CriteoRows(
            labels=np.zeros(0, np.float32),
            dense=np.zeros((0, NUM_DENSE_FEATURES), np.float32),
            cat_ids=np.zeros((0, NUM_CATEGORICAL_FEATURES), np.uint32),
        )

    @staticmethod
    def concat(parts: list[CriteoRows]) -> CriteoRows:
        if not parts:
            return CriteoRows.empty()
        if len(parts) == 1:
            return parts[0]
        return CriteoRows(
            labels=np.concatenate([p.labels for p in parts]),
            dense=np.concatenate([p.dense for p in parts]),
            cat_ids=np.concatenate([p.cat_ids for p in parts]),
        )

    def slice(self, start: int, end: int) -> CriteoRows:
        return CriteoRows(self.labels[start:end], self.dense[start:end], self.cat_ids[start:end])


@dataclass(frozen=True)
class CriteoFeature:
    """A model feature read from a Criteo categorical column."""

    name: str
    table_name: str
    num_rows: int
    column: int
    """Index i of `cat_<i>` (0..25) into `CriteoRows.cat_ids`."""


def criteo_features(model: ModelConfig) -> list[CriteoFeature]:
    """The model's sparse features (model order) as Criteo columns with their table sizes.

    Raises:
        ConfigError: a feature is not named `cat_<i>` with 0 <= i < 26.
    """
    features = []
    for t, table in enumerate(model.effective_tables()):
        for f, name in enumerate(table.features):
            match = _FEATURE_NAME.fullmatch(name)
            if not match or int(match.group(1)) >= NUM_CATEGORICAL_FEATURES:
                raise ConfigError(
                    f"model.tables[{t}].features[{f}]: {name!r} is not a Criteo feature; with "
                    f"data.source=criteo features are named cat_0 .. cat_"
                    f"{NUM_CATEGORICAL_FEATURES - 1} (categorical columns 14..39)"
                )
            features.append(CriteoFeature(name, table.name, table.num_rows, int(match.group(1))))
    return features


def hash_to_rows(raw_ids: np.ndarray, num_rows: int) -> np.ndarray:
    """Rows of a table for raw categorical ids: `raw_id mod num_rows`, int64 [n]."""
    return raw_ids.astype(np.int64) % np.int64(num_rows)


# --------------------------------------------------------------------------- parsing


def _decode(
    cells: np.ndarray, table: np.ndarray, base: int, max_digits: int, signed: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a bytes array of numbers in `base`, vectorised.

    Returns:
        values: int64 [cells.shape]; 0 for an empty cell.
        valid: bool [cells.shape]; False where a cell is not a number of <= max_digits digits.
    """
    cells = np.ascontiguousarray(cells)
    shape = cells.shape
    width = cells.dtype.itemsize
    lengths = np.char.str_len(cells).astype(np.int64)
    raw = cells.view(np.uint8).reshape(*shape, width)[..., : max_digits + 2]
    start = np.zeros(shape, np.int64)
    negative = np.zeros(shape, bool)
    if signed and raw.shape[-1]:
        first = raw[..., 0]
        negative = first == ord("-")
        start = (negative | (first == ord("+"))).astype(np.int64)
    num_digits = lengths - start
    valid = (lengths == 0) | ((num_digits >= 1) & (num_digits <= max_digits))
    values = np.zeros(shape, np.int64)
    for pos in range(raw.shape[-1]):
        digit = table[raw[..., pos]]
        inside = (pos >= start) & (pos < lengths)
        valid &= ~inside | (digit != 255)
        values = np.where(inside, values * base + digit, values)
    values = np.where(negative, -values, values)
    return np.where(valid, values, 0), valid


_MAX_FIELD_BYTES = _MAX_DECIMAL_DIGITS + 2  # longer fields are malformed whatever they hold


def _split_fields(lines: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Split lines at tabs without a Python object per field.

    Returns:
        counts: int64 [lines], fields per line.
        fields: bytes array [lines with 40 fields, 40] of at most `_MAX_FIELD_BYTES` bytes per
            cell; a longer field is replaced by an invalid byte so that it fails to decode.
    """
    text = b"".join(lines)
    if not text.endswith(b"\n"):
        text += b"\n"
    text = text.replace(b"\r\n", b"\n")
    buf = np.frombuffer(text, dtype=np.uint8)
    is_separator = (buf == ord("\t")) | (buf == ord("\n"))
    separators = np.flatnonzero(is_separator)
    line_ends = separators[buf[separators] == ord("\n")]
    assert line_ends.size == len(lines), "one newline per line"
    fields_before = np.searchsorted(separators, line_ends, side="right")
    counts = np.diff(fields_before, prepend=0)
    starts = np.concatenate([[0], separators[:-1] + 1])
    lengths = separators - starts
    keep = np.repeat(counts == NUM_FIELDS, counts)
    starts, lengths = starts[keep], lengths[keep]
    width = max(1, min(int(lengths.max(initial=0)), _MAX_FIELD_BYTES))
    cells = np.zeros((starts.size, width), np.uint8)
    for pos in range(width):  # one gather per byte position, not per field
        inside = pos < lengths
        cells[inside, pos] = buf[starts[inside] + pos]
    cells[lengths > width, 0] = 0xFF
    fields = np.ascontiguousarray(cells).view(f"S{width}").reshape(-1, NUM_FIELDS)
    return counts, fields


def _fields_of(line: bytes) -> list[bytes]:
    return line.rstrip(b"\r\n").split(b"\t")


def _describe_problem(
    line: bytes, fields: list[bytes], label_ok: bool, dense_bad: np.ndarray, cat_bad: np.ndarray
) -> str:
    if _NON_TEXT.search(line.rstrip(b"\r\n")):
        return "contains binary (non-text) bytes; is this a Criteo TSV file?"
    if len(fields) != NUM_FIELDS:
        return (
            f"has {len(fields)} tab-separated fields, expected {NUM_FIELDS} "
            "(label, 13 integers, 26 hexadecimal categoricals)"
        )
    if not label_ok:
        return f"field 1 (label) is {fields[0][:40]!r}, expected 0 or 1"
    for j in np.flatnonzero(dense_bad):
        value = fields[1 + j]
        if value.lower() in _NONFINITE:
            return (
                f"field {j + 2} (dense I{j + 1}) is {value.decode()!r}; set data.nan_policy=zero "
                "to read NaN/Inf as 0"
            )
        return f"field {j + 2} (dense I{j + 1}) is {value[:40]!r}, not an integer"
    for k in np.flatnonzero(cat_bad):
        value = fields[1 + NUM_DENSE_FEATURES + k]
        return (
            f"field {k + 2 + NUM_DENSE_FEATURES} (categorical C{k + 1}, feature cat_{k}) is "
            f"{value[:40]!r}, not a hexadecimal id of 1-{_MAX_HEX_DIGITS} digits"
        )
    raise AssertionError("line flagged bad without a problem")


def parse_lines(
    lines: list[bytes],
    *,
    source: str,
    first_line: int,
    bad_line_policy: Literal["fail", "skip"] = "fail",
    nan_policy: Literal["fail", "zero"] = "fail",
) -> tuple[CriteoRows, dict[int, str]]:
    """Parse raw TSV lines (with or without their newline) into rows.

    Args:
        source: file name used in error messages.
        first_line: 1-based line number of `lines[0]` in `source`.

    Returns:
        rows: the well-formed lines, in order.
        skipped: {1-based line number: problem} of the lines dropped under `skip`.

    Raises:
        DataError: `source:line: problem` for the first malformed line under `fail`.
    """
    counts, fields = _split_fields(lines)
    whole = np.flatnonzero(counts == NUM_FIELDS)

    labels = fields[:, 0]
    label_ok = (labels == b"1") | (labels == b"0")
    dense_values, dense_ok = _decode(
        fields[:, 1 : 1 + NUM_DENSE_FEATURES], _DECIMAL, 10, _MAX_DECIMAL_DIGITS, signed=True
    )
    if nan_policy == "zero" and not dense_ok.all():
        nonfinite = np.isin(np.char.lower(fields[:, 1 : 1 + NUM_DENSE_FEATURES]), _NONFINITE)
        dense_ok |= nonfinite
    cat_ids, cat_ok = _decode(
        fields[:, 1 + NUM_DENSE_FEATURES :], _HEX, 16, _MAX_HEX_DIGITS, signed=False
    )
    good = label_ok & dense_ok.all(axis=1) & cat_ok.all(axis=1)

    problems: dict[int, str] = {}
    if not good.all() or len(whole) != len(lines):
        row_of_line = np.full(len(lines), -1, np.int64)
        row_of_line[whole] = np.arange(len(whole))
        for i in range(len(lines)):
            row = row_of_line[i]
            if row >= 0 and good[row]:
                continue
            if row >= 0:
                problem = _describe_problem(
                    lines[i],
                    _fields_of(lines[i]),
                    bool(label_ok[row]),
                    ~dense_ok[row],
                    ~cat_ok[row],
                )
            else:
                problem = _describe_problem(
                    lines[i], _fields_of(lines[i]), True, np.zeros(0), np.zeros(0)
                )
            if bad_line_policy == "fail":
                raise DataError(
                    f"{source}:{first_line + i}: {problem} "
                    "(set data.bad_line_policy=skip to skip malformed lines)"
                )
            problems[first_line + i] = problem

    dense = np.log1p(np.maximum(dense_values[good], 0).astype(np.float64)).astype(np.float32)
    rows = CriteoRows(
        labels=(labels[good] == b"1").astype(np.float32),
        dense=dense,
        cat_ids=cat_ids[good].astype(np.uint32),
    )
    return rows, problems


# --------------------------------------------------------------------------- files


def tsv_files(path: str | Path) -> list[Path]:
    """A TSV file, or the files a data directory reads (rules: `ndp.data.inputs`)."""
    return data_files(path)


class CriteoReader:
    """Streams parsed rows from TSV files, treated as one sequence of lines.

    Lines are addressed by a global 0-based index over the files in order, so that a
    train/validation split is a pair of line ranges (`line_start`, `line_end`). Files are
    opened by `ndp.data.inputs.open_input` (plain or gzip, streamed; a BOM skipped); each is
    read once at construction to count its lines.

    Attributes:
        line_counts: lines of each file (decompressed).
        text_bytes: decompressed bytes of all files, what parsing them in memory is sized by.
    """

    def __init__(
        self,
        files: list[Path],
        *,
        bad_line_policy: Literal["fail", "skip"] = "fail",
        nan_policy: Literal["fail", "zero"] = "fail",
        chunk_lines: int = CHUNK_LINES,
    ) -> None:
        self.files = list(files)
        self.bad_line_policy = bad_line_policy
        self.nan_policy = nan_policy
        self.chunk_lines = chunk_lines
        scans = [scan_input(f) for f in self.files]
        self.line_counts = [lines for lines, _ in scans]
        self.text_bytes = sum(text_bytes for _, text_bytes in scans)
        self._skipped: dict[tuple[str, int], str] = {}

    @property
    def total_lines(self) -> int:
        return sum(self.line_counts)

    @property
    def skipped_lines(self) -> int:
        """Distinct malformed lines dropped so far (each counted once over repeated passes)."""
        return len(self._skipped)

    @property
    def skipped(self) -> dict[tuple[str, int], str]:
        """{(file, 1-based line): problem} of the dropped lines."""
        return dict(self._skipped)

    def rows(self, line_start: int = 0, line_end: int | None = None) -> Iterator[CriteoRows]:
        """Parsed rows of global lines [line_start, line_end), chunk by chunk."""
        line_end = self.total_lines if line_end is None else line_end
        before = self.skipped_lines
        offset = 0
        for path, count in zip(self.files, self.line_counts, strict=True):
            lo, hi = max(line_start - offset, 0), min(line_end - offset, count)
            offset += count
            if lo >= hi:
                continue
            with open_input(path) as handle:
                for _ in islice(handle, lo):
                    pass
                position = lo
                while position < hi:
                    lines = list(islice(handle, min(self.chunk_lines, hi - position)))
                    if not lines:
                        break
                    rows, problems = parse_lines(
                        lines,
                        source=str(path),
                        first_line=position + 1,
                        bad_line_policy=self.bad_line_policy,
                        nan_policy=self.nan_policy,
                    )
                    for line_no, problem in problems.items():
                        if (str(path), line_no) not in self._skipped and len(self._skipped) < 5:
                            log.warning("skipping %s:%d: %s", path, line_no, problem)
                        self._skipped[(str(path), line_no)] = problem
                    position += len(lines)
                    yield rows
        if self.skipped_lines > before:
            log.warning(
                "skipped %d malformed lines so far (data.bad_line_policy=skip)", self.skipped_lines
            )

    def read_all(self, line_start: int = 0, line_end: int | None = None) -> CriteoRows:
        """All rows of a line range in memory (small inputs)."""
        return CriteoRows.concat(list(self.rows(line_start, line_end)))


def require_samples(source: str, reader: CriteoReader) -> None:
    """Refuse input that holds no sample after a full read.

    Why: an empty file, or one whose every line `bad_line_policy=skip` dropped, would
    otherwise train nothing or write an empty preprocessed copy. Training and `ndp-data
    preprocess` both refuse it with this one message (`require_lines_kept`).

    Args:
        source: the input as the user named it (data.path, --input).
        reader: a reader whose lines have all been parsed (so `skipped` is complete).

    Raises:
        DataError: naming `source`, and the first malformed line if all were skipped.
    """
    first_skipped = next(iter(reader.skipped.items()), None)
    require_lines_kept(source, reader.total_lines, reader.skipped_lines, first_skipped)


def require_lines_kept(
    source: str,
    total_lines: int,
    skipped_lines: int,
    first_skipped: tuple[tuple[str, int], str] | None,
) -> None:
    """`require_samples` from counts: `first_skipped` is ((file, line), problem) or None."""
    if total_lines == 0:
        raise DataError(f"{source}: holds no lines (empty input); there is nothing to read")
    if skipped_lines < total_lines:
        return
    assert first_skipped is not None, "every line skipped, so one was"
    (file, line), problem = first_skipped
    raise DataError(
        f"{source}: all {total_lines} lines are malformed and were skipped "
        f"(data.bad_line_policy=skip), leaving no samples; the first: {file}:{line}: {problem}"
    )


def split_line(total_lines: int, val_fraction: float) -> int:
    """First global line of the validation holdout: the last `val_fraction` of the lines."""
    return total_lines - int(total_lines * val_fraction)
