"""Pieces of Criteo input that processes parse independently, each into its own part files.

Why pieces: one process parses about 250k lines/s; Criteo 1TB has 4.4 billion lines. A plain
file is cut into byte ranges at line boundaries, a gzip file (which cannot be entered
mid-stream) is one piece, and any process -- a local worker or a Ray task on another node
-- parses a piece alone. A piece does not know the line number it starts at: it counts its
lines and reports problems by line number *within the piece*; the driver
(`ndp.data.preprocess`) adds the lines of the pieces before it.

A piece writes every row it keeps, in order, to::

    <parts dir>/<index>/labels.npy    float32 [rows]
                        dense.npy     float32 [rows, 13]
                        cat_ids.npy   uint32  [rows, 26]

and the driver copies row ranges of the parts into the train/ and val/ splits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

from ndp.config import NUM_DENSE_FEATURES
from ndp.data.columnar import NpyAppender
from ndp.data.criteo import NUM_CATEGORICAL_FEATURES
from ndp.data.inputs import UTF8_BOM, is_gzip, open_input
from ndp.data.tsv_arrow import count_lines, parse_block

PIECE_BYTES = 32 << 20
"""Target size of a byte range of a plain file: large enough to amortise a task, small
enough that a file gives every worker several pieces."""
BLOCK_BYTES = 8 << 20
"""Text parsed at once inside a piece (whole lines)."""
MAX_PROBLEMS_KEPT = 5
"""Problems a piece describes in full under `skip` (for logs); all are counted."""
PART_ARRAYS = {
    "labels": (np.float32, ()),
    "dense": (np.float32, (NUM_DENSE_FEATURES,)),
    "cat_ids": (np.uint32, (NUM_CATEGORICAL_FEATURES,)),
}
"""Array name -> (dtype, row shape) of a part, as in a split of the columnar format."""


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of one input file (a gzip file: all of it, `end` None)."""

    index: int
    path: Path
    """Absolute, so that a task on another node opens the same (shared) file."""
    source: str
    """The file as named to the user, for messages."""
    start: int
    end: int | None
    compressed: bool
    input_bytes: int
    """Bytes of the file this piece covers on disk (progress)."""


@dataclass
class PieceResult:
    """What parsing a piece found; line numbers are 1-based within the piece."""

    index: int
    num_lines: int = 0
    num_rows: int = 0
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """0-based line numbers within the piece of the dropped lines, ascending."""
    problems: dict[int, str] = field(default_factory=dict)
    """{1-based line within the piece: problem} of the first dropped lines, or of the
    malformed line that stopped the piece under `fail`."""
    failed: bool = False
    """A malformed line under `fail`: parsing stopped there; `problems` holds it."""


def plan_pieces(files: list[Path], piece_bytes: int = PIECE_BYTES) -> list[Piece]:
    """Cut files into pieces at line boundaries (gzip files whole), in input order.

    Raises:
        DataError: a file is compressed other than with gzip (`inputs.is_gzip`).
    """
    pieces: list[Piece] = []
    for path in files:
        absolute = path.resolve()
        size = absolute.stat().st_size
        if is_gzip(path):
            pieces.append(Piece(len(pieces), absolute, str(path), 0, None, True, size))
            continue
        with open(absolute, "rb") as handle:
            start = len(UTF8_BOM) if handle.read(len(UTF8_BOM)) == UTF8_BOM else 0
            while start < size:
                end = _line_boundary_after(handle, start + piece_bytes, size)
                pieces.append(
                    Piece(len(pieces), absolute, str(path), start, end, False, end - start)
                )
                start = end
    return pieces


def _line_boundary_after(handle: BinaryIO, position: int, size: int) -> int:
    """The offset just past the first newline at or after `position` (or the file's end)."""
    if position >= size:
        return size
    handle.seek(position - 1)  # a newline right before `position` ends a line there
    handle.readline()
    return min(handle.tell(), size)


def parse_piece(
    piece: Piece,
    parts_dir: Path,
    bad_line_policy: Literal["fail", "skip"],
    nan_policy: Literal["fail", "zero"],
) -> PieceResult:
    """Parse a piece into its part files (a picklable top-level function: it runs in other
    processes and as a Ray task)."""
    result = PieceResult(piece.index)
    directory = parts_dir / f"{piece.index:06d}"
    appenders = {
        name: NpyAppender(directory / f"{name}.npy", dtype, shape)
        for name, (dtype, shape) in PART_ARRAYS.items()
    }
    skipped: list[np.ndarray] = []
    try:
        for text in _blocks(piece):
            rows, problems = parse_block(
                text,
                source=piece.source,
                first_line=result.num_lines + 1,
                bad_line_policy="skip",  # described here, raised by the driver (line numbers)
                nan_policy=nan_policy,
            )
            if problems and bad_line_policy == "fail":
                first = min(problems)
                result.problems, result.failed = {first: problems[first]}, True
                break
            for line in sorted(problems):
                if len(result.problems) < MAX_PROBLEMS_KEPT:
                    result.problems[line] = problems[line]
            skipped.append(np.array(sorted(problems), np.int64) - 1)
            result.num_lines += count_lines(text)
            result.num_rows += len(rows)
            appenders["labels"].append(rows.labels)
            appenders["dense"].append(rows.dense)
            appenders["cat_ids"].append(rows.cat_ids)
    finally:
        for appender in appenders.values():
            appender.close()
    if skipped:
        result.skipped = np.concatenate(skipped)
    return result


def _blocks(piece: Piece) -> Iterator[bytes]:
    """The piece's text in blocks of whole lines (the last may lack its newline)."""
    with _open_piece(piece) as handle:
        remaining = None if piece.end is None else piece.end - piece.start
        carry = b""
        while True:
            size = BLOCK_BYTES if remaining is None else min(BLOCK_BYTES, remaining)
            data = handle.read(size) if size else b""
            if remaining is not None:
                remaining -= len(data)
            if not data:
                if carry:
                    yield carry
                return
            data = carry + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data
                continue
            carry = data[cut:]
            yield data[:cut]


@contextmanager
def _open_piece(piece: Piece) -> Iterator[BinaryIO]:
    """The piece's bytes as a stream: a plain file seeked to `start`, or a whole gzip file."""
    if piece.compressed:
        with open_input(piece.path) as handle:
            yield handle
        return
    with open(piece.path, "rb") as handle:
        handle.seek(piece.start)
        yield handle
