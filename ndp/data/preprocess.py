"""Criteo TSV -> the columnar format (`ndp.data.columnar`, layout `criteo_raw`), on every core.

Why: parsing text is the slow part of reading Criteo; done once, training reads
memory-mapped arrays. Raw 32-bit categorical ids are kept (not rows), so one preprocessed
copy serves every table size and `max_rows_per_table`.

How the work is spread (`ndp.data.pieces`)::

    inputs --plan_pieces--> pieces (byte ranges of plain files at line boundaries,
                                    gzip files whole)
           --parse_piece--> part files, one per piece, in parallel: local worker
                            processes, or Ray tasks across a cluster (`run_tasks`)
           --_write_splits-> train/ and val/ (rows of the parts copied in input order),
                            meta.json; the parts are removed

Lines are parsed by pyarrow's CSV reader (`ndp.data.tsv_arrow`); a block holding anything
but clean Criteo lines is parsed by `ndp.data.criteo.parse_lines`, which also describes
malformed lines, so the output and every error are those of the one-process reader the
training loader uses (`CriteoReader`).

The split is by line position over the input files in order: the last `val_fraction` of the
lines (`ndp.data.criteo.split_line`) go to `val/`, the rest to `train/` -- the same rule the
loader applies to TSV input, so both paths give the same samples. A malformed line under
`bad_line_policy=fail` is reported as `file:line` counted from the start of its file, the
first one in input order however the pieces finish. Inputs are chosen and opened as for
training (`ndp.data.inputs`: plain or gzip-compressed TSV, a UTF-8 BOM skipped).

Input that yields no sample (empty, or every line dropped under `bad_line_policy=skip`) is
refused like training refuses it (`criteo.require_lines_kept`), and whatever was written for
it is removed: a failed run leaves `--output` as it found it.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

from ndp.config import NUM_DENSE_FEATURES, DataConfig
from ndp.data.columnar import SPLITS, NpyAppender, load_array, write_meta
from ndp.data.criteo import require_lines_kept, split_line, tsv_files
from ndp.data.pieces import (
    PART_ARRAYS,
    PIECE_BYTES,
    Piece,
    PieceResult,
    parse_piece,
    plan_pieces,
)
from ndp.data.progress import Progress
from ndp.errors import DataError

log = logging.getLogger("ndp.data")

T = TypeVar("T")
R = TypeVar("R")
RunTasks = Callable[[Callable[[T], R], Sequence[T]], Iterator[tuple[int, R]]]
"""Runs `fn` on every item somewhere and yields (item index, result) as each finishes;
closing the iterator early cancels what has not run. `local_tasks` runs them in worker
processes, `ndp.ray_local.ray_tasks` as Ray tasks."""

PARTS_DIR = "parts.tmp"
"""Where pieces write their rows inside --output; removed when the splits are written."""
_MIN_PIECE_BYTES = 1 << 20
_COPY_ROWS = 1 << 18  # rows copied from a part at once


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
    workers: int | None = None,
    run_tasks: RunTasks | None = None,
    progress: bool | None = None,
    piece_bytes: int = PIECE_BYTES,
) -> dict[str, Any]:
    """Parse TSV files (or directories of them) into train/ and val/ columnar splits.

    Args:
        inputs: TSV files (plain or gzip) or directories of them (`ndp.data.inputs`), read in
            this order.
        data: supplies `bad_line_policy` and `nan_policy`.
        val_fraction: fraction of lines (the last ones) written to val/.
        workers: local worker processes (default: every core); 1 parses in this process.
        run_tasks: where pieces run instead of local processes (`ndp.ray_local.ray_tasks`);
            inputs and `output_dir` must then be on a file system every node sees.
        progress: report lines, MB/s and ETA on stderr; None: when stderr is a terminal.
        piece_bytes: largest byte range of a plain file parsed as one task.

    Returns:
        The content of the written meta.json.

    Raises:
        DataError: an input is missing or unsupported, a line is malformed (under `fail`), or
            the input holds no sample; nothing is left in `output_dir` then.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if workers is not None and workers < 1:
        raise DataError(f"--workers {workers}: must be >= 1")
    files = [f for path in inputs for f in tsv_files(path)]
    workers = workers or _cpu_count()
    total_bytes = sum(f.stat().st_size for f in files)
    # several pieces per worker, so that a slow piece does not leave cores idle
    piece_bytes = max(_MIN_PIECE_BYTES, min(piece_bytes, total_bytes // (4 * workers) + 1))
    pieces = plan_pieces(files, piece_bytes)
    source = " ".join(str(path) for path in inputs)
    output_existed = Path(output_dir).exists()
    output = prepare_output_dir(output_dir)
    parts = output / PARTS_DIR
    try:
        if run_tasks is None:
            run_tasks = partial(local_tasks, workers=workers)
        report = Progress(total_bytes, label="preprocess", enabled=progress)
        parse = partial(
            parse_piece,
            parts_dir=parts.resolve(),
            bad_line_policy=data.bad_line_policy,
            nan_policy=data.nan_policy,
        )
        results = _parse_pieces(pieces, parse, run_tasks, report)
        report.close()
        total_lines = sum(r.num_lines for r in results)
        skipped_lines = sum(len(r.skipped) for r in results)
        skipped = _first_problems(pieces, results)
        _log_skipped(skipped, skipped_lines)
        require_lines_kept(source, total_lines, skipped_lines, next(iter(skipped), None))
        splits = _write_splits(results, parts, output, split_line(total_lines, val_fraction))
    except BaseException:
        _remove_written(output, keep_dir=output_existed)
        raise
    shutil.rmtree(parts)
    meta = {
        "layout": "criteo_raw",
        "num_dense_features": NUM_DENSE_FEATURES,
        "splits": splits,
        "source": "criteo",
        "source_files": [str(f.resolve()) for f in files],
        "total_lines": total_lines,
        "skipped_lines": skipped_lines,
        "val_fraction": val_fraction,
        "bad_line_policy": data.bad_line_policy,
        "nan_policy": data.nan_policy,
    }
    # written last: a directory without meta.json is never taken for data
    return write_meta(output, meta)


def local_tasks(
    fn: Callable[[T], R], items: Sequence[T], *, workers: int
) -> Iterator[tuple[int, R]]:
    """`RunTasks` on this machine: `workers` processes, or this process when 1 is enough."""
    if min(workers, len(items)) <= 1:
        for index, item in enumerate(items):
            yield index, fn(item)
        return
    # spawn, not fork: the caller may hold threads (pyarrow's, Ray's) that fork would copy
    context = get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(items)), mp_context=context) as pool:
        futures = {pool.submit(fn, item): index for index, item in enumerate(items)}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield futures[future], future.result()
        finally:
            for future in futures:
                future.cancel()


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _parse_pieces(
    pieces: list[Piece],
    parse: Callable[[Piece], PieceResult],
    run_tasks: RunTasks,
    report: Progress,
) -> list[PieceResult]:
    """Every piece's result in piece order.

    Raises:
        DataError: `file:line: problem` of the first malformed line in input order under
            `fail`, as soon as every piece before it has been parsed.
    """
    results: dict[int, PieceResult] = {}
    first_failed = len(pieces)
    tasks = run_tasks(parse, pieces)
    try:
        for index, result in tasks:
            results[index] = result
            report.update(lines=result.num_lines, input_bytes=pieces[index].input_bytes)
            if result.failed:
                first_failed = min(first_failed, index)
            if first_failed < len(pieces) and all(i in results for i in range(first_failed)):
                _raise_malformed(pieces, results, first_failed)
    finally:
        tasks.close()  # type: ignore[attr-defined]  # a generator: cancels what is left
    return [results[i] for i in range(len(pieces))]


def _raise_malformed(pieces: list[Piece], results: dict[int, PieceResult], index: int) -> None:
    ((line, problem),) = results[index].problems.items()
    path = pieces[index].path  # line numbers count from the start of the file
    line += sum(results[i].num_lines for i in range(index) if pieces[i].path == path)
    raise DataError(
        f"{pieces[index].source}:{line}: {problem} "
        "(set data.bad_line_policy=skip to skip malformed lines)"
    )


def _first_problems(
    pieces: list[Piece], results: list[PieceResult]
) -> list[tuple[tuple[str, int], str]]:
    """((file, line), problem) of the first dropped lines kept by the pieces, in input order."""
    problems = []
    lines_before: dict[Path, int] = {}  # lines of each file in the pieces so far
    for piece, result in zip(pieces, results, strict=True):
        first_line = lines_before.get(piece.path, 0)
        lines_before[piece.path] = first_line + result.num_lines
        for line, problem in result.problems.items():
            problems.append(((piece.source, first_line + line), problem))
    return problems


def _log_skipped(skipped: list[tuple[tuple[str, int], str]], skipped_lines: int) -> None:
    for (file, line), problem in skipped[:5]:
        log.warning("skipping %s:%d: %s", file, line, problem)
    if skipped_lines:
        log.warning("skipped %d malformed lines (data.bad_line_policy=skip)", skipped_lines)


def _write_splits(
    results: list[PieceResult], parts: Path, output: Path, first_val_line: int
) -> dict[str, Any]:
    """Copy the parts' rows into output/train (lines before `first_val_line`) and output/val,
    in input order; their meta entries."""
    total_lines = sum(r.num_lines for r in results)
    appenders = {
        split: {
            name: NpyAppender(output / split / f"{name}.npy", dtype, shape)
            for name, (dtype, shape) in PART_ARRAYS.items()
        }
        for split in SPLITS
    }
    piece_first_line = 0
    for result in results:
        train_lines = min(max(first_val_line - piece_first_line, 0), result.num_lines)
        train_rows = train_lines - int(
            (result.skipped < train_lines).sum()
        )  # dropped lines have no row
        piece_first_line += result.num_lines
        if result.num_rows == 0:
            continue
        directory = parts / f"{result.index:06d}"
        for name in PART_ARRAYS:
            rows = load_array(directory / f"{name}.npy")
            for split, (lo, hi) in zip(
                SPLITS, [(0, train_rows), (train_rows, result.num_rows)], strict=True
            ):
                for start in range(lo, hi, _COPY_ROWS):
                    appenders[split][name].append(rows[start : min(start + _COPY_ROWS, hi)])
    for split_appenders in appenders.values():
        for appender in split_appenders.values():
            appender.close()
    lines = {"train": [0, first_val_line], "val": [first_val_line, total_lines]}
    return {
        split: {"num_samples": appenders[split]["labels"].length, "lines": lines[split]}
        for split in SPLITS
    }


def _remove_written(output: Path, *, keep_dir: bool) -> None:
    """Undo a failed preprocess: its splits, and `output` itself if this run created it."""
    if not keep_dir:
        shutil.rmtree(output, ignore_errors=True)
        return
    for written in (*SPLITS, PARTS_DIR):
        shutil.rmtree(output / written, ignore_errors=True)
