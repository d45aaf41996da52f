"""The ready-made configs: their reference shapes, and a few reference steps at laptop scale."""

from __future__ import annotations

from pathlib import Path

import pytest

from ndp.config import load_config
from ndp.data.loader import build_datasets
from ndp.reference import ReferenceEngine
from ndp.train_loop import run_training

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
KAGGLE_ROWS = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
"""Criteo Kaggle cardinalities of the 26 tables (facebookresearch/dlrm)."""
MLPERF_MULTI_HOT = [
    3,
    2,
    1,
    2,
    6,
    1,
    1,
    1,
    1,
    7,
    3,
    8,
    1,
    6,
    9,
    5,
    1,
    1,
    1,
    12,
    100,
    27,
    10,
    3,
    1,
    1,
]
"""MLPerf DLRMv2 multi-hot sizes per feature."""
LAPTOP = [
    "model.max_rows_per_table=2000",
    "train.steps=2",
    "train.batch_size=64",
    "train.eval_batches=1",
    "train.device=cpu",
    "data.synthetic.num_samples=256",
    "data.synthetic.num_val_samples=128",
    "logging.progress_bar=false",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_criteo_kaggle_has_the_26_kaggle_tables_dim_16_and_the_dlrm_mlps():
    cfg = load_config(CONFIGS / "criteo_kaggle.yaml")
    assert [t.num_rows for t in cfg.model.tables] == KAGGLE_ROWS
    assert {t.embedding_dim for t in cfg.model.tables} == {16}
    assert cfg.model.dense_in_features == 13
    assert cfg.model.bottom_mlp == [512, 256, 64, 16]
    assert cfg.model.top_mlp == [512, 256, 1]
    assert cfg.model.interaction == "dot"
    assert cfg.data.source == "synthetic"
    assert 1.0 < cfg.data.synthetic.zipf_exponent < 1.3
    assert cfg.data.synthetic.pooling_factor == 1.0  # one-hot lookups


def test_dlrmv2_multihot_has_dim_128_multi_hot_bags_and_adagrad():
    cfg = load_config(CONFIGS / "dlrmv2_multihot.yaml")
    assert len(cfg.model.tables) == 26
    assert {t.embedding_dim for t in cfg.model.tables} == {128}
    assert cfg.model.bottom_mlp == [512, 256, 128]
    assert cfg.model.top_mlp == [1024, 1024, 512, 256, 1]
    assert cfg.data.source == "synthetic"
    assert cfg.data.synthetic.pooling_factor == MLPERF_MULTI_HOT
    assert cfg.optimizer.dense.name == "adagrad"
    assert cfg.optimizer.sparse.name == "rowwise_adagrad"


def test_default_config_trains_on_the_shipped_criteo_sample():
    cfg = load_config(CONFIGS / "dlrm.yaml")
    assert cfg.data.source == "criteo"
    assert Path(cfg.data.path) == CONFIGS.parent / "data" / "criteo_day0_sample.tsv"


@pytest.mark.parametrize("name", ["criteo_kaggle.yaml", "dlrmv2_multihot.yaml"])
def test_ready_made_config_trains_a_few_reference_steps_at_reduced_rows(name, tmp_path):
    cfg = load_config(CONFIGS / name, LAPTOP)
    assert max(t.num_rows for t in cfg.model.effective_tables()) == 2000
    train, val = build_datasets(cfg)
    batch = next(train.batches(64))
    assert batch.sparse.keys() == cfg.model.feature_names

    summary = run_training(cfg, ReferenceEngine(cfg), tmp_path, train_data=train, val_data=val)

    assert summary["steps"] == 2 and not summary["interrupted"]
    assert summary["final_train_loss"] > 0
    assert 0 <= summary["final_eval"]["auc"] <= 1
    assert summary["final_eval"]["num_samples"] == 64
