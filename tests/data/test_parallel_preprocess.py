"""`ndp-data preprocess` on many cores: the same output and the same errors as one process.

The reference is the current one-process reader (`CriteoReader`, the parser the training
loader uses) written the way `ndp-data preprocess` wrote it before it ran in pieces; the
parallel run must give byte-identical .npy files. Small pieces (`piece_bytes`) make a
small file into several pieces, so that piece boundaries fall inside the data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from criteo_lines import tsv_line

from ndp.config import NUM_DENSE_FEATURES, DataConfig
from ndp.data.columnar import NpyAppender
from ndp.data.criteo import NUM_CATEGORICAL_FEATURES, CriteoReader, split_line, tsv_files
from ndp.data.pieces import plan_pieces
from ndp.data.preprocess import preprocess_criteo
from ndp.errors import DataError

ARRAYS = ("labels.npy", "dense.npy", "cat_ids.npy")


def reference_preprocess(inputs: list[Path], output: Path, data: DataConfig, val_fraction: float):
    """The one-process preprocess as it was before issue 18 (CriteoReader, in order)."""
    files = [f for path in inputs for f in tsv_files(path)]
    reader = CriteoReader(files, bad_line_policy=data.bad_line_policy, nan_policy=data.nan_policy)
    first_val_line = split_line(reader.total_lines, val_fraction)
    ranges = {"train": (0, first_val_line), "val": (first_val_line, reader.total_lines)}
    for split, (lo, hi) in ranges.items():
        labels = NpyAppender(output / split / "labels.npy", np.float32)
        dense = NpyAppender(output / split / "dense.npy", np.float32, (NUM_DENSE_FEATURES,))
        cat_ids = NpyAppender(
            output / split / "cat_ids.npy", np.uint32, (NUM_CATEGORICAL_FEATURES,)
        )
        for rows in reader.rows(lo, hi):
            labels.append(rows.labels)
            dense.append(rows.dense)
            cat_ids.append(rows.cat_ids)
        for appender in (labels, dense, cat_ids):
            appender.close()
    return reader


def assert_same_files(expected: Path, actual: Path) -> None:
    for split in ("train", "val"):
        for name in ARRAYS:
            assert (actual / split / name).read_bytes() == (expected / split / name).read_bytes(), (
                f"{split}/{name} differs"
            )


def messy_lines() -> list[str]:
    """Clean lines with the forms Criteo has (empty fields, short hex, upper case, negative
    dense) and the ones only the line parser decides (+5, NaN, 18-digit values)."""
    lines = []
    for i in range(300):
        dense = [str((i * 7 + j) % 50 - 3) for j in range(13)]
        cats = [f"{(i * 2654435761 + k) % (1 << 32):08x}" for k in range(26)]
        if i % 3 == 0:
            dense[i % 13] = ""
            cats[i % 26] = ""
        if i % 5 == 0:
            cats[(i + 1) % 26] = "A1b"
        lines.append(tsv_line(str(i % 2), dense, cats))
    lines[40] = tsv_line("1", ["+5"] + ["1"] * 12)
    lines[41] = tsv_line("0", ["999999999999999999"] + ["1"] * 12)
    lines[250] = tsv_line("0", ["nan"] + ["1"] * 12)
    return lines


def test_several_pieces_give_byte_identical_output_to_the_one_process_reader(tmp_path):
    tsv = tmp_path / "day.tsv"
    tsv.write_text("".join(line + "\n" for line in messy_lines()))
    data = DataConfig(nan_policy="zero")
    assert len(plan_pieces([tsv], piece_bytes=4096)) > 5, "pieces end inside the file"
    meta = preprocess_criteo(
        [tsv], tmp_path / "parallel", data=data, val_fraction=0.3, workers=2, piece_bytes=4096
    )
    reader = reference_preprocess([tsv], tmp_path / "reference", data, 0.3)
    assert_same_files(tmp_path / "reference", tmp_path / "parallel")
    assert meta["total_lines"] == reader.total_lines == 300
    assert meta["splits"]["train"]["lines"] == [0, 210]
    assert not (tmp_path / "parallel" / "parts.tmp").exists()


def test_a_line_spanning_a_piece_boundary_is_read_once_and_whole(tmp_path):
    lines = [tsv_line(str(i % 2), [f"{i:02d}"] * 13) for i in range(20)]  # equal lengths
    tsv = tmp_path / "day.tsv"
    tsv.write_text("".join(line + "\n" for line in lines))
    line_bytes = len(lines[0]) + 1
    pieces = plan_pieces([tsv], piece_bytes=line_bytes * 3 + line_bytes // 2)
    assert all(p.start % line_bytes == 0 for p in pieces), "pieces start at line starts"
    preprocess_criteo(
        [tsv],
        tmp_path / "out",
        data=DataConfig(),
        val_fraction=0.0,
        workers=1,
        piece_bytes=line_bytes * 3 + line_bytes // 2,
    )
    dense = np.load(tmp_path / "out" / "train" / "dense.npy")
    np.testing.assert_array_equal(dense[:, 0], np.log1p(np.arange(20)).astype(np.float32))


def test_gzip_and_plain_files_with_a_bom_and_no_last_newline_match_the_reference(tmp_path):
    import gzip

    directory = tmp_path / "days"
    directory.mkdir()
    lines = messy_lines()
    (directory / "day_1.tsv").write_bytes(
        b"\xef\xbb\xbf" + "\n".join(lines[:150]).encode()  # BOM, no newline at the end
    )
    with gzip.open(directory / "day_2.tsv.gz", "wt") as handle:
        handle.write("".join(line + "\n" for line in lines[150:]))
    data = DataConfig(nan_policy="zero")
    preprocess_criteo(
        [directory],
        tmp_path / "parallel",
        data=data,
        val_fraction=0.5,
        workers=2,
        piece_bytes=2048,
    )
    reference_preprocess([directory], tmp_path / "reference", data, 0.5)
    assert_same_files(tmp_path / "reference", tmp_path / "parallel")


def test_skipped_lines_in_several_pieces_are_counted_and_the_split_stays_by_line(tmp_path):
    lines = messy_lines()
    for i in (3, 100, 101, 220, 299):
        lines[i] = "garbage"
    tsv = tmp_path / "day.tsv"
    tsv.write_text("".join(line + "\n" for line in lines))
    data = DataConfig(bad_line_policy="skip", nan_policy="zero")
    meta = preprocess_criteo(
        [tsv], tmp_path / "parallel", data=data, val_fraction=0.25, workers=2, piece_bytes=4096
    )
    reader = reference_preprocess([tsv], tmp_path / "reference", data, 0.25)
    assert_same_files(tmp_path / "reference", tmp_path / "parallel")
    assert meta["skipped_lines"] == reader.skipped_lines == 5


def test_a_malformed_line_in_a_later_piece_is_named_by_its_line_in_the_file(tmp_path):
    lines = [tsv_line()] * 200
    lines[137] = tsv_line(cats=["xyz"] + ["1"] * 25)
    lines[190] = "garbage"
    tsv = tmp_path / "day.tsv"
    tsv.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(DataError) as parallel:
        preprocess_criteo(
            [tsv],
            tmp_path / "out",
            data=DataConfig(),
            val_fraction=0.1,
            workers=2,
            piece_bytes=2048,
        )
    with pytest.raises(DataError) as reference:
        reference_preprocess([tsv], tmp_path / "reference", DataConfig(), 0.1)
    assert str(parallel.value) == str(reference.value)
    assert f"{tsv}:138: field 15 (categorical C1, feature cat_0)" in str(parallel.value)
    assert not (tmp_path / "out").exists()


def test_cli_workers_and_progress_flags(tmp_path, criteo_sample, capsys):
    from ndp.cli.data import main

    output = tmp_path / "out"
    status = main(
        [
            "preprocess",
            "--input",
            str(criteo_sample),
            "--output",
            str(output),
            "--val-fraction",
            "0.25",
            "--workers",
            "2",
            "--progress",
        ]
    )
    assert status == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["train"] == 6000
    assert (
        main(
            [
                "preprocess",
                "--input",
                str(criteo_sample),
                "--output",
                str(tmp_path / "o2"),
                "--workers",
                "0",
            ]
        )
        == 2
    )
    assert "--workers 0: must be >= 1" in capsys.readouterr().err


@pytest.mark.ray
def test_ray_tasks_write_the_same_output_as_local_processes(tmp_path, ray_session):
    from ndp.ray_local import ray_tasks

    tsv = tmp_path / "day.tsv"
    tsv.write_text("".join(line + "\n" for line in messy_lines()))
    data = DataConfig(nan_policy="zero")
    preprocess_criteo(
        [tsv],
        tmp_path / "ray",
        data=data,
        val_fraction=0.2,
        run_tasks=ray_tasks,
        piece_bytes=8192,
    )
    reference_preprocess([tsv], tmp_path / "reference", data, 0.2)
    assert_same_files(tmp_path / "reference", tmp_path / "ray")
