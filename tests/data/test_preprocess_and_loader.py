"""Preprocessed columnar format and `build_datasets`: same samples as TSV, fixed split,
KJT keys in model order, index policy on stored rows."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from criteo_lines import tsv_line

from ndp.config import DataConfig
from ndp.data.columnar import read_meta
from ndp.data.dataset import apply_index_policy
from ndp.data.loader import build_datasets, open_tsv
from ndp.data.preprocess import preprocess_criteo
from ndp.data.synthetic import write_synthetic
from ndp.errors import DataError

FEATURES = {"cat_3": 97, "cat_0": 1460, "cat_25": 7}


def all_batches(dataset, batch_size, start_batch=0):
    return list(dataset.batches(batch_size, start_batch=start_batch))


def assert_same_batches(left, right):
    assert len(left) == len(right) > 0
    for a, b in zip(left, right, strict=True):
        torch.testing.assert_close(a.dense, b.dense)
        torch.testing.assert_close(a.labels, b.labels)
        assert a.sparse.keys() == b.sparse.keys()
        torch.testing.assert_close(a.sparse.values(), b.sparse.values())
        torch.testing.assert_close(a.sparse.lengths(), b.sparse.lengths())


def test_preprocess_round_trip_equals_direct_tsv_reading(tmp_path, criteo_sample, criteo_config):
    preprocess_criteo([criteo_sample], tmp_path / "pre", data=DataConfig(), val_fraction=0.125)
    direct = build_datasets(criteo_config(criteo_sample, FEATURES, val_fraction=0.125))
    loaded = build_datasets(criteo_config(tmp_path / "pre", FEATURES))
    assert [d.num_samples for d in direct] == [d.num_samples for d in loaded] == [7000, 1000]
    for a, b in zip(direct, loaded, strict=True):
        assert_same_batches(all_batches(a, 256), all_batches(b, 256))


def test_preprocessed_arrays_have_the_documented_dtypes_and_meta(tmp_path, criteo_sample):
    meta = preprocess_criteo(
        [criteo_sample], tmp_path / "pre", data=DataConfig(), val_fraction=0.25
    )
    assert meta == read_meta(tmp_path / "pre")
    assert meta["layout"] == "criteo_raw" and meta["format_version"] == 1
    assert meta["splits"]["train"]["num_samples"] == 6000
    assert meta["splits"]["val"] == {"num_samples": 2000, "lines": [6000, 8000]}
    train = tmp_path / "pre" / "train"
    assert np.load(train / "dense.npy").dtype == np.float32
    assert np.load(train / "dense.npy").shape == (6000, 13)
    assert np.load(train / "labels.npy").dtype == np.float32
    assert np.load(train / "cat_ids.npy").dtype == np.uint32
    assert np.load(train / "cat_ids.npy")[0, 0] == 0x62770D79


def test_split_is_deterministic_and_takes_the_last_lines(tmp_path, make_tsv, criteo_config):
    path = make_tsv([tsv_line(str(i % 2), [str(i), *["0"] * 12]) for i in range(10)])
    first, second = (
        build_datasets(criteo_config(path, FEATURES, val_fraction=0.3)) for _ in range(2)
    )
    val_dense = next(first[1].batches(3)).dense[:, 0]
    assert torch.equal(val_dense, torch.log1p(torch.tensor([7.0, 8.0, 9.0])))
    assert_same_batches(all_batches(first[0], 7), all_batches(second[0], 7))
    assert first[0].num_samples == 7


def test_skip_policy_keeps_lines_in_their_split_and_reports_the_count(
    tmp_path, make_tsv, criteo_config
):
    lines = [tsv_line("0") for _ in range(10)]
    lines[8] = "garbage"
    cfg = criteo_config(make_tsv(lines), FEATURES, val_fraction=0.3, bad_line_policy="skip")
    train, val = build_datasets(cfg)
    assert (train.num_samples, val.num_samples) == (7, 2)
    assert train.skipped_lines == 1
    meta = preprocess_criteo([cfg.data.path], tmp_path / "pre", data=cfg.data, val_fraction=0.3)
    assert meta["skipped_lines"] == 1 and meta["splits"]["val"]["num_samples"] == 2


def test_batches_have_model_feature_keys_in_model_order(criteo_sample, criteo_config):
    train, _ = build_datasets(criteo_config(criteo_sample, FEATURES))
    batch = next(train.batches(64))
    assert batch.sparse.keys() == ["cat_3", "cat_0", "cat_25"]
    assert batch.dense.shape == (64, 13) and batch.labels.shape == (64,)
    assert batch.sparse.lengths().tolist() == [1] * (3 * 64)
    rows = batch.sparse.to_dict()
    for name, num_rows in FEATURES.items():
        assert 0 <= int(rows[name].values().min()) and int(rows[name].values().max()) < num_rows


def test_batches_drop_the_partial_last_batch_and_honour_start_batch(criteo_sample, criteo_config):
    train, _ = build_datasets(criteo_config(criteo_sample, FEATURES, val_fraction=0.125))
    batches = all_batches(train, 1000 - 1)
    assert len(batches) == 7000 // 999
    assert_same_batches(all_batches(train, 999, start_batch=5), batches[5:])


def test_streamed_tsv_gives_the_same_batches_as_in_memory(criteo_sample, criteo_config):
    cfg = criteo_config(criteo_sample, FEATURES, val_fraction=0.125)
    in_memory = open_tsv(criteo_sample, cfg, holdout=True)
    streamed = open_tsv(criteo_sample, cfg, holdout=True, in_memory_max_bytes=0)
    for a, b in zip(in_memory, streamed, strict=True):
        assert a.num_samples == b.num_samples
        assert_same_batches(all_batches(a, 250, start_batch=3), all_batches(b, 250, start_batch=3))


def test_streamed_tsv_under_skip_counts_samples_not_lines(make_tsv, criteo_config):
    lines = [tsv_line(str(i % 2), [str(i), *["0"] * 12]) for i in range(12)]
    lines[1] = "bad"
    cfg = criteo_config(make_tsv(lines), FEATURES, val_fraction=0.0, bad_line_policy="skip")
    train, _ = open_tsv(cfg.data.path, cfg, holdout=True, in_memory_max_bytes=0)
    assert train.num_samples == 11
    second = next(train.batches(4, start_batch=1))
    assert second.dense[:, 0].tolist() == pytest.approx(np.log1p([5, 6, 7, 8]).tolist())


def test_val_path_replaces_the_holdout(tmp_path, make_tsv, criteo_config):
    train_path = make_tsv([tsv_line("0")] * 8, name="train.tsv")
    val_path = make_tsv([tsv_line("1")] * 4, name="val.tsv")
    train, val = build_datasets(criteo_config(train_path, FEATURES, val_path=str(val_path)))
    assert (train.num_samples, val.num_samples) == (8, 4)
    assert next(val.batches(4)).labels.tolist() == [1.0] * 4


def test_preprocessed_val_path_with_empty_val_split_serves_its_train_split(
    tmp_path, make_tsv, criteo_config
):
    val_tsv = make_tsv([tsv_line("1")] * 4, name="val.tsv")
    preprocess_criteo([val_tsv], tmp_path / "valdir", data=DataConfig(), val_fraction=0.0)
    train_tsv = make_tsv([tsv_line("0")] * 8, name="train.tsv")
    cfg = criteo_config(train_tsv, FEATURES, val_path=str(tmp_path / "valdir"))
    assert build_datasets(cfg)[1].num_samples == 4


def test_truncated_preprocessed_directory_is_a_data_error(tmp_path, criteo_sample, criteo_config):
    preprocess_criteo([criteo_sample], tmp_path / "pre", data=DataConfig(), val_fraction=0.1)
    meta_path = tmp_path / "pre" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["splits"]["train"]["num_samples"] += 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="incomplete"):
        build_datasets(criteo_config(tmp_path / "pre", FEATURES))


def test_preprocess_refuses_a_non_empty_output_directory(tmp_path, criteo_sample):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not an empty directory"):
        preprocess_criteo([criteo_sample], tmp_path / "out", data=DataConfig(), val_fraction=0.1)


# --------------------------------------------------------------------------- jagged layout


@pytest.fixture()
def synth_dir(tmp_path, synthetic_config):
    """Synthetic data written for tables of 1000 and 50000 rows."""
    cfg = synthetic_config(
        num_samples=600, num_val_samples=100, pooling_factor=3.0, pooling_distribution="poisson"
    )
    write_synthetic(cfg, tmp_path / "syn")
    return tmp_path / "syn"


def jagged_config(criteo_config, synth_dir, rows_f1, policy):
    cfg = criteo_config(synth_dir, {"f0": 1000, "f1": rows_f1}, index_policy=policy)
    return cfg


def test_written_synthetic_data_loads_equal_to_generated(synth_dir, synthetic_config):
    cfg = synthetic_config(
        num_samples=600, num_val_samples=100, pooling_factor=3.0, pooling_distribution="poisson"
    )
    generated = build_datasets(cfg)
    loaded = build_datasets(
        replace(cfg, data=replace(cfg.data, source="criteo", path=str(synth_dir)))
    )
    for a, b in zip(generated, loaded, strict=True):
        assert_same_batches(all_batches(a, 50, start_batch=1), all_batches(b, 50, start_batch=1))


def test_index_policy_fail_names_table_feature_value_and_range(synth_dir, criteo_config):
    train, _ = build_datasets(jagged_config(criteo_config, synth_dir, 10, "fail"))
    with pytest.raises(
        DataError, match=r"feature 'f1': index \d+ is out of range \[0, 10\) of table 't_f1'"
    ):
        all_batches(train, 100)


@pytest.mark.parametrize("policy", ["hash", "clamp"])
def test_index_policy_hash_and_clamp_bring_rows_into_the_table(policy, synth_dir, criteo_config):
    big, _ = build_datasets(jagged_config(criteo_config, synth_dir, 50_000, "fail"))
    small, _ = build_datasets(jagged_config(criteo_config, synth_dir, 10, policy))
    stored = next(big.batches(100)).sparse["f1"].values()
    got = next(small.batches(100)).sparse["f1"].values()
    expected = stored % 10 if policy == "hash" else stored.clamp(max=9)
    assert torch.equal(got, expected)
    assert torch.equal(
        next(small.batches(100)).sparse["f0"].values(), next(big.batches(100)).sparse["f0"].values()
    )


def test_negative_index_fails_naming_table_feature_and_value():
    rows = np.array([3, -2, 12], dtype=np.int64)
    with pytest.raises(
        DataError, match=r"feature 'f1': index -2 is out of range \[0, 10\) of table 't_f1'"
    ):
        apply_index_policy(rows, num_rows=10, policy="fail", table="t_f1", feature="f1")


@pytest.mark.parametrize(("policy", "expected"), [("hash", [3, 8, 2]), ("clamp", [3, 0, 9])])
def test_index_policy_hash_and_clamp_bring_negative_rows_into_the_table(policy, expected):
    rows = np.array([3, -2, 12], dtype=np.int64)
    got = apply_index_policy(rows, num_rows=10, policy=policy, table="t_f1", feature="f1")
    assert got.tolist() == expected


def test_model_feature_missing_from_preprocessed_data_is_a_data_error(synth_dir, criteo_config):
    cfg = criteo_config(synth_dir, {"f0": 1000, "f9": 10})
    with pytest.raises(DataError, match="no feature 'f9'.*holds f0, f1"):
        build_datasets(cfg)


def test_shipped_default_config_builds_the_sample_split():
    from pathlib import Path

    from ndp.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "dlrm.yaml")
    train, val = build_datasets(cfg)
    assert (train.num_samples, val.num_samples) == (7000, 1000)
    batch = next(train.batches(cfg.train.batch_size))
    assert batch.sparse.keys() == cfg.model.feature_names
    capped = {t.features[0]: t.num_rows for t in cfg.model.effective_tables()}
    for name, jagged in batch.sparse.to_dict().items():
        assert int(jagged.values().max()) < capped[name]
