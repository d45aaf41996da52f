"""Which files a data path reads, and how: plain or gzip TSV, a BOM, directories, empty input.

Specifications of issue 21 ("nothing silently wrong") for data inputs: every file of a data
directory is either read, ignored by a documented rule (and logged), or refused by name.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from criteo_lines import tsv_line

from ndp.cli.data import main
from ndp.data.criteo import CriteoReader, tsv_files
from ndp.data.dataset import CriteoStreamDataset
from ndp.data.loader import build_datasets, open_tsv
from ndp.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
UTF8_BOM = b"\xef\xbb\xbf"


def tsv_bytes(labels: str) -> bytes:
    """Criteo lines, one per label character, as the bytes of a TSV file."""
    return "".join(tsv_line(label) + "\n" for label in labels).encode()


def write_gzip(path: Path, data: bytes) -> Path:
    with gzip.open(path, "wb") as handle:
        handle.write(data)
    return path


def labels_of(files: list[Path], **policies) -> list[float]:
    return CriteoReader(files, **policies).read_all().labels.tolist()


# --------------------------------------------------------------------------- gzip


def test_a_directory_reads_gzip_files_beside_plain_ones(tmp_path):
    write_gzip(tmp_path / "part0.tsv.gz", tsv_bytes("01"))
    (tmp_path / "part1.tsv").write_bytes(tsv_bytes("1"))
    files = tsv_files(tmp_path)
    assert [f.name for f in files] == ["part0.tsv.gz", "part1.tsv"]
    assert labels_of(files) == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("name", ["day_0.gz", "x.tsv.gz", "train.txt.gz"])
def test_a_gzip_file_as_data_path_trains_on_the_same_samples_as_its_plain_text(
    tmp_path, criteo_config, criteo_sample, name
):
    compressed = write_gzip(tmp_path / name, criteo_sample.read_bytes())
    plain_train, plain_val = build_datasets(criteo_config(criteo_sample))
    train, val = build_datasets(criteo_config(compressed, bad_line_policy="skip"))
    assert (train.num_samples, val.num_samples) == (plain_train.num_samples, plain_val.num_samples)
    assert train.skipped_lines == 0
    np.testing.assert_array_equal(train.rows.cat_ids, plain_train.rows.cat_ids)
    np.testing.assert_array_equal(val.rows.dense, plain_val.rows.dense)


def test_gzip_input_is_streamed_in_chunks_like_plain_text(tmp_path, criteo_config, criteo_sample):
    compressed = write_gzip(tmp_path / "day_0.gz", criteo_sample.read_bytes())
    cfg = criteo_config(compressed)
    streamed, _ = open_tsv(compressed, cfg, holdout=True, in_memory_max_bytes=0)
    in_memory, _ = open_tsv(criteo_sample, cfg, holdout=True)
    batch_size = 1000
    for got, want in zip(streamed.batches(batch_size), in_memory.batches(batch_size), strict=True):
        assert got.labels.tolist() == want.labels.tolist()


def test_the_in_memory_limit_counts_decompressed_bytes(tmp_path, criteo_config, criteo_sample):
    """A gzip file 4x smaller than its text must not slip under the in-memory limit."""
    compressed = write_gzip(tmp_path / "day_0.gz", criteo_sample.read_bytes())
    text_bytes = criteo_sample.stat().st_size
    assert compressed.stat().st_size < text_bytes // 2
    assert CriteoReader([compressed]).text_bytes == text_bytes
    train, _ = open_tsv(
        compressed, criteo_config(compressed), holdout=True, in_memory_max_bytes=text_bytes - 1
    )
    assert isinstance(train, CriteoStreamDataset)


def test_errors_in_gzip_input_name_the_decompressed_line(tmp_path):
    path = write_gzip(tmp_path / "day_0.gz", tsv_bytes("01") + b"garbage\n" + tsv_bytes("1"))
    with pytest.raises(DataError, match=r"day_0\.gz:3: has 1 tab-separated fields"):
        CriteoReader([path], chunk_lines=2).read_all()
    reader = CriteoReader([path], bad_line_policy="skip", chunk_lines=2)
    assert reader.read_all().labels.tolist() == [0.0, 1.0, 1.0]
    assert list(reader.skipped) == [(str(path), 3)]


def test_a_truncated_gzip_file_is_an_error_naming_it(tmp_path):
    whole = write_gzip(tmp_path / "whole.gz", tsv_bytes("0101" * 100)).read_bytes()
    truncated = tmp_path / "day_0.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"day_0\.gz: .*corrupt or truncated"):
        CriteoReader([truncated]).read_all()


def test_a_file_named_gz_that_is_not_gzip_is_an_error_naming_it(tmp_path):
    path = tmp_path / "day_0.gz"
    path.write_bytes(tsv_bytes("01"))
    with pytest.raises(DataError, match=r"day_0\.gz: named \.gz but not gzip-compressed"):
        CriteoReader([path])


def test_other_compressions_are_refused_naming_the_format(tmp_path):
    path = tmp_path / "day_0.bz2"
    path.write_bytes(bz2.compress(tsv_bytes("01")))
    with pytest.raises(DataError, match=r"day_0\.bz2: is bzip2-compressed"):
        CriteoReader([path])


# --------------------------------------------------------------------------- BOM


def test_a_utf8_bom_before_the_first_line_is_skipped(tmp_path):
    plain = tmp_path / "bom.tsv"
    plain.write_bytes(UTF8_BOM + tsv_bytes("10"))
    compressed = write_gzip(tmp_path / "bom.tsv.gz", UTF8_BOM + tsv_bytes("10"))
    for path in (plain, compressed):
        reader = CriteoReader([path])
        assert reader.total_lines == 2
        assert reader.read_all().labels.tolist() == [1.0, 0.0]
        assert reader.read_all(1, 2).labels.tolist() == [0.0]


# --------------------------------------------------------------------------- directories


def test_an_unsupported_file_in_a_data_directory_is_an_error_naming_it(tmp_path):
    (tmp_path / "part0.tsv").write_bytes(tsv_bytes("0"))
    (tmp_path / "part1.csv").write_bytes(tsv_bytes("1"))
    with pytest.raises(DataError, match=r"part1\.csv: not a supported input"):
        tsv_files(tmp_path)


def test_a_subdirectory_of_a_data_directory_is_an_error_naming_it(tmp_path):
    (tmp_path / "part0.tsv").write_bytes(tsv_bytes("0"))
    (tmp_path / "more").mkdir()
    with pytest.raises(DataError, match=r"more: is a directory"):
        tsv_files(tmp_path)


def test_hidden_documentation_and_checksum_files_are_ignored_and_logged(tmp_path, caplog):
    for name in (".DS_Store", "README.md", "README", "LICENSE.txt", "SHA256SUMS", "a.md5"):
        (tmp_path / name).write_text("not data\n")
    (tmp_path / ".cache").mkdir()
    (tmp_path / "day_0").write_bytes(tsv_bytes("1"))
    with caplog.at_level(logging.INFO, logger="ndp.data"):
        files = tsv_files(tmp_path)
    assert [f.name for f in files] == ["day_0"]
    assert "README.md" in caplog.text and "SHA256SUMS" in caplog.text


def test_the_shipped_data_directories_load(criteo_config):
    for directory in (REPO_ROOT / "data", Path("/work/shared/data")):
        if not directory.is_dir():
            continue
        assert [f.name for f in tsv_files(directory)] == ["criteo_day0_sample.tsv"]
    train, val = build_datasets(criteo_config(REPO_ROOT / "data"))
    assert (train.num_samples, val.num_samples) == (7200, 800)


def test_directory_files_are_read_in_natural_order_day_2_before_day_10(tmp_path):
    for day in (10, 2, 1):
        (tmp_path / f"day_{day}").write_bytes(tsv_bytes("1" if day == 10 else "0"))
    assert [f.name for f in tsv_files(tmp_path)] == ["day_1", "day_2", "day_10"]


# --------------------------------------------------------------------------- preprocess


def preprocess(*args: str) -> int:
    return main(["preprocess", *args])


def test_preprocess_reads_gzip_input_like_its_plain_text(tmp_path, criteo_sample, capsys):
    compressed = write_gzip(tmp_path / "day_0.gz", criteo_sample.read_bytes())
    status = preprocess("--input", str(compressed), "--output", str(tmp_path / "out"))
    assert status == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["train"], report["val"], report["skipped_lines"]) == (7200, 800, 0)


def test_preprocess_of_an_empty_file_exits_2_naming_it(tmp_path, capsys):
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    status = preprocess("--input", str(empty), "--output", str(tmp_path / "out"))
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1
    assert "empty.tsv: holds no lines" in err
    assert not (tmp_path / "out").exists()


def test_preprocess_of_an_all_bad_file_under_skip_exits_2_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("garbage\nmore garbage\n")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(_criteo_config_raw(bad, bad_line_policy="skip")))
    out = tmp_path / "out"
    status = preprocess("--input", str(bad), "--output", str(out), "--config", str(config))
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1
    assert "bad.tsv: all 2 lines are malformed" in err
    assert "bad.tsv:1:" in err
    assert not out.exists(), "no half-written output is left behind"


def test_training_refuses_an_empty_file_naming_it(tmp_path, criteo_config):
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.tsv: holds no lines"):
        build_datasets(criteo_config(empty))


def test_training_refuses_an_all_bad_file_under_skip_naming_it(tmp_path, criteo_config):
    bad = tmp_path / "bad.tsv"
    bad.write_text("garbage\nmore garbage\n")
    with pytest.raises(DataError, match=r"bad\.tsv: all 2 lines are malformed"):
        build_datasets(criteo_config(bad, bad_line_policy="skip"))


def test_preprocess_input_overrides_a_missing_data_path_of_the_config(
    tmp_path, criteo_sample, capsys
):
    config = tmp_path / "cfg.yaml"
    raw = _criteo_config_raw(tmp_path / "gone.tsv", val_fraction=0.25)
    raw["data"]["val_path"] = str(tmp_path / "gone_too.tsv")
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    status = preprocess(
        "--input", str(criteo_sample), "--output", str(out), "--config", str(config)
    )
    assert status == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["train"], report["val"]) == (6000, 2000)


def test_preprocess_of_a_missing_input_names_the_input(tmp_path, capsys):
    status = preprocess("--input", str(tmp_path / "gone.tsv"), "--output", str(tmp_path / "o"))
    assert status == 2
    assert "gone.tsv: no such file or directory" in capsys.readouterr().err


def test_preprocess_of_a_directory_with_gzip_and_plain_parts_reads_both(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_gzip(data / "part0.tsv.gz", tsv_bytes("0110"))
    (data / "part1.tsv").write_bytes(tsv_bytes("10"))
    status = preprocess(
        "--input", str(data), "--output", str(tmp_path / "out"), "--val-fraction", "0.5"
    )
    assert status == 0
    assert np.load(tmp_path / "out" / "train" / "labels.npy").tolist() == [0.0, 1.0, 1.0]
    assert np.load(tmp_path / "out" / "val" / "labels.npy").tolist() == [0.0, 1.0, 0.0]


def _criteo_config_raw(path: Path, **data) -> dict:
    return {
        "model": {
            "bottom_mlp": [8, 4],
            "tables": [{"name": "t", "num_rows": 100, "embedding_dim": 4, "features": ["cat_0"]}],
        },
        "data": {"source": "criteo", "path": str(path), **data},
    }
