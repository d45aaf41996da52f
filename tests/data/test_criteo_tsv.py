"""Specification of the Criteo TSV reader: values, missing fields, the categorical hash."""

from __future__ import annotations

import math

import numpy as np
import pytest
from criteo_lines import SAMPLE_CATS, tsv_line

from ndp.config import config_from_dict
from ndp.data.criteo import (
    CriteoReader,
    criteo_features,
    hash_to_rows,
    parse_lines,
    split_line,
    tsv_files,
)
from ndp.errors import ConfigError, DataError


def parse_one(line: str, **policies):
    rows, skipped = parse_lines([line.encode() + b"\n"], source="t.tsv", first_line=1, **policies)
    return rows, skipped


def test_a_normal_line_gives_label_log1p_dense_and_raw_hex_ids():
    dense = ["0", "1", "2", "3", "10", "100", "1000", "7", "0", "5", "6", "8", "9"]
    rows, skipped = parse_one(tsv_line("1", dense))
    assert skipped == {}
    assert rows.labels.tolist() == [1.0]
    assert rows.labels.dtype == np.float32 and rows.dense.dtype == np.float32
    np.testing.assert_allclose(rows.dense[0], [math.log1p(int(x)) for x in dense], rtol=1e-6)
    assert rows.cat_ids.dtype == np.uint32
    assert rows.cat_ids[0].tolist() == [int(c, 16) for c in SAMPLE_CATS]


def test_missing_dense_is_zero_before_log1p():
    dense = ["", "4", *[""] * 11]
    rows, _ = parse_one(tsv_line("0", dense))
    assert rows.dense[0, 0] == 0.0
    assert rows.dense[0, 1] == pytest.approx(math.log1p(4))
    assert (rows.dense[0, 2:] == 0).all()


def test_negative_dense_is_clamped_to_zero_before_log1p():
    rows, _ = parse_one(tsv_line("0", ["-1", "-3", "+2", *["0"] * 10]))
    assert rows.dense[0, :3].tolist() == pytest.approx([0.0, 0.0, math.log1p(2)])


def test_empty_categorical_is_raw_id_zero_and_row_zero():
    cats = ["", *SAMPLE_CATS[1:]]
    rows, _ = parse_one(tsv_line("0", cats=cats))
    assert rows.cat_ids[0, 0] == 0
    assert hash_to_rows(rows.cat_ids[:, 0], 1460).tolist() == [0]


def test_hex_is_case_insensitive_and_may_be_shorter_than_8_digits():
    cats = ["FF", "ff", "0", "ffffffff", *SAMPLE_CATS[4:]]
    rows, _ = parse_one(tsv_line("0", cats=cats))
    assert rows.cat_ids[0, :4].tolist() == [255, 255, 0, 0xFFFFFFFF]


def test_hash_is_hex_value_mod_num_rows_with_fixed_expected_rows():
    # int('62770d79', 16) = 1651969401 = 1131485 * 1460 + 1301
    # int('e21f5d58', 16) = 3793706328 = 2598428 * 1460 + 1448
    # int('ffffffff', 16) = 4294967295 = 2941758 * 1460 + 615
    raw = np.array([0x62770D79, 0xE21F5D58, 0xFFFFFFFF, 0], dtype=np.uint32)
    assert hash_to_rows(raw, 1460).tolist() == [1301, 1448, 615, 0]
    assert hash_to_rows(raw[:1], 20000).tolist() == [9401]
    assert hash_to_rows(raw[1:2], 583).tolist() == [566]
    assert hash_to_rows(raw[2:3], 7).tolist() == [3]


def test_reader_hashes_the_shipped_sample_first_line_as_documented(criteo_sample):
    reader = CriteoReader(tsv_files(criteo_sample), chunk_lines=1000)
    rows = next(reader.rows(0, 1))
    assert len(rows) == 1
    assert rows.labels.tolist() == [1.0]
    assert rows.cat_ids[0, 0] == 0x62770D79
    assert rows.dense[0, 0] == pytest.approx(math.log1p(5))
    assert rows.dense[0, 2] == 0.0  # third dense field of line 1 is empty


def test_reader_reads_the_whole_sample_in_chunks_identically(criteo_sample):
    files = tsv_files(criteo_sample)
    whole = CriteoReader(files).read_all()
    chunked = CriteoReader(files, chunk_lines=777).read_all()
    assert len(whole) == 8000
    np.testing.assert_array_equal(whole.cat_ids, chunked.cat_ids)
    np.testing.assert_array_equal(whole.dense, chunked.dense)
    assert 0.01 < whole.labels.mean() < 0.05  # the sample is about 2.7 % positive


def test_directory_input_reads_tsv_and_txt_files_in_sorted_order(tmp_path):
    (tmp_path / "b.tsv").write_text(tsv_line("1") + "\n")
    (tmp_path / "a.txt").write_text(tsv_line("0") + "\n" + tsv_line("0") + "\n")
    (tmp_path / "notes.md").write_text("not data\n")
    files = tsv_files(tmp_path)
    assert [f.name for f in files] == ["a.txt", "b.tsv"]
    assert CriteoReader(files).read_all().labels.tolist() == [0.0, 0.0, 1.0]


def test_line_range_spans_files_as_one_sequence(tmp_path):
    for name, labels in (("0.tsv", "0011"), ("1.tsv", "10")):
        (tmp_path / name).write_text("".join(tsv_line(x) + "\n" for x in labels))
    reader = CriteoReader(tsv_files(tmp_path), chunk_lines=2)
    assert reader.total_lines == 6
    assert reader.read_all(3, 5).labels.tolist() == [1.0, 1.0]


def test_empty_directory_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no \\*.tsv"):
        tsv_files(tmp_path)


def test_split_line_holds_out_the_last_fraction_of_lines():
    assert split_line(8000, 0.125) == 7000
    assert split_line(10, 0.0) == 10
    assert split_line(10, 0.25) == 8


def test_features_map_cat_i_to_column_i_and_use_effective_rows():
    raw = {
        "model": {
            "max_rows_per_table": 100,
            "bottom_mlp": [4],
            "tables": [
                {"name": "a", "num_rows": 1000, "embedding_dim": 4, "features": ["cat_25"]},
                {"name": "b", "num_rows": 10, "embedding_dim": 4, "features": ["cat_3", "cat_0"]},
            ],
        },
        "data": {"path": "x.tsv"},
    }
    features = criteo_features(config_from_dict(raw).model)
    assert [(f.name, f.column, f.num_rows) for f in features] == [
        ("cat_25", 25, 100),
        ("cat_3", 3, 10),
        ("cat_0", 0, 10),
    ]


@pytest.mark.parametrize("name", ["cat_26", "user_id", "cat_-1", "cat_1x"])
def test_feature_not_named_cat_0_to_25_is_a_config_error_naming_it(name, criteo_config):
    cfg = criteo_config("x.tsv", {name: 10})
    with pytest.raises(ConfigError, match=f"{name}.*cat_0 .. cat_25"):
        criteo_features(cfg.model)
