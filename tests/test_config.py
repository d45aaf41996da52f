"""Config validation: one test per rule, each naming the dotted path and what is allowed.

Rules shared with docs/bad_input.md (unknown key, wrong type, dim % 4, zero rows, negative
cache, missing file) are specified in tests/faults/test_bad_config.py; this file holds the
rest of the issue's rules and the `--set` overrides.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from ndp.config import Config, config_from_dict, load_config
from ndp.config_loader import apply_overrides
from ndp.errors import ConfigError

TABLE = {"name": "t", "num_rows": 10, "embedding_dim": 8, "features": ["f"]}
MODEL = {"bottom_mlp": [8, 8], "top_mlp": [8, 1], "tables": [TABLE]}


def raw(**sections) -> dict:
    return copy.deepcopy({"model": MODEL, "data": {"source": "synthetic"}, **sections})


def test_every_section_of_a_run_exists_with_defaults():
    cfg = config_from_dict(raw())
    sections = {f.name for f in dataclasses.fields(Config)}
    assert sections == {
        "model",
        "data",
        "optimizer",
        "train",
        "cluster",
        "storage",
        "pipeline",
        "checkpoint",
        "logging",
    }
    assert all(dataclasses.is_dataclass(getattr(cfg, name)) for name in sections)


def test_config_is_frozen():
    cfg = config_from_dict(raw())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3  # type: ignore[misc]


def test_unknown_section_lists_the_sections():
    with pytest.raises(ConfigError, match=r"^trainer: unknown key; allowed keys here: .*train"):
        config_from_dict(raw(trainer={"steps": 1}))


def test_feature_mapped_to_two_tables_names_both_tables():
    tables = [TABLE, {**TABLE, "name": "u"}]
    with pytest.raises(
        ConfigError,
        match=r"model\.tables\[1\]\.features: feature 'f' is already mapped to table 't'",
    ):
        config_from_dict(raw(model={**MODEL, "tables": tables}))


def test_duplicate_table_name_is_refused():
    tables = [TABLE, {**TABLE, "features": ["g"]}]
    with pytest.raises(ConfigError, match=r"model\.tables\[1\]\.name: duplicate table name 't'"):
        config_from_dict(raw(model={**MODEL, "tables": tables}))


def test_embedding_dim_the_interaction_cannot_combine_names_the_table_and_bottom_mlp():
    tables = [TABLE, {"name": "u", "num_rows": 10, "embedding_dim": 12, "features": ["g"]}]
    with pytest.raises(
        ConfigError,
        match=r"model\.tables\[1\]\.embedding_dim: 12 cannot be combined by the dot "
        r"interaction .* must equal model\.bottom_mlp\[-1\]",
    ):
        config_from_dict(raw(model={**MODEL, "tables": tables}))


def test_top_mlp_must_end_in_one_logit():
    with pytest.raises(ConfigError, match=r"model\.top_mlp: last layer is 2, must be 1"):
        config_from_dict(raw(model={**MODEL, "top_mlp": [8, 2]}))


def test_table_without_features_is_refused():
    with pytest.raises(ConfigError, match=r"model\.tables\[0\]\.features: .*at least one"):
        config_from_dict(raw(model={**MODEL, "tables": [{**TABLE, "features": []}]}))


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"model": {**MODEL, "tables": [{**TABLE, "num_rows": -5}]}}, r"model\.tables\[0\]\.num_rows: -5 must be > 0"),
        ({"model": {**MODEL, "bottom_mlp": [-8, 8]}}, r"model\.bottom_mlp\[0\]: -8 must be > 0"),
        ({"data": {"source": "synthetic", "synthetic": {"num_samples": -1}}}, r"data\.synthetic\.num_samples: -1 must be > 0"),
        ({"data": {"source": "synthetic", "val_fraction": 1.5}}, r"data\.val_fraction: 1\.5 must be in \[0, 1\)"),
        ({"optimizer": {"sparse": {"lr": -0.1}}}, r"optimizer\.sparse\.lr: -0\.1 must be > 0"),
        ({"optimizer": {"dense": {"eps": 0}}}, r"optimizer\.dense\.eps: 0\.0 must be > 0"),
        ({"train": {"batch_size": -1}}, r"train\.batch_size: -1 must be > 0"),
        ({"train": {"eval_interval_steps": 0}}, r"train\.eval_interval_steps: 0 must be > 0"),
        ({"cluster": {"num_storage_nodes": 0}}, r"cluster\.num_storage_nodes: 0 must be > 0"),
        ({"storage": {"page_bytes": 1000}}, r"storage\.page_bytes: 1000 must be a multiple of 512"),
        ({"storage": {"io_merge_gap_bytes": -1}}, r"storage\.io_merge_gap_bytes: -1 must be >= 0"),
        ({"storage": {"update_threads": 0}}, r"storage\.update_threads: 0 must be > 0"),
        ({"pipeline": {"lookahead_depth": -1}}, r"pipeline\.lookahead_depth: -1 must be >= 0"),
        ({"checkpoint": {"keep_last": 0}}, r"checkpoint\.keep_last: 0 must be > 0"),
        ({"logging": {"interval_steps": 0}}, r"logging\.interval_steps: 0 must be > 0"),
    ],
    ids=[
        "negative-rows", "negative-layer", "negative-samples", "val-fraction", "sparse-lr",
        "dense-eps", "batch-size", "eval-interval", "storage-nodes", "page-bytes",
        "merge-gap", "update-threads", "lookahead", "keep-last", "log-interval",
    ],
)  # fmt: skip
def test_impossible_value_in_every_section_names_the_field(sections, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        config_from_dict(raw(**sections))


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"optimizer": {"dense": {"name": "rowwise_adagrad"}}}, r"optimizer\.dense\.name: 'rowwise_adagrad' is not allowed; allowed values: 'sgd' \| 'adagrad' \| 'adam'"),
        ({"optimizer": {"sparse": {"name": "ftrl"}}}, r"optimizer\.sparse\.name: 'ftrl' is not allowed; allowed values: 'sgd' \| 'adagrad' \| 'rowwise_adagrad' \| 'adam'"),
        ({"model": {**MODEL, "tables": [{**TABLE, "pooling": "max"}]}}, r"model\.tables\[0\]\.pooling: 'max' is not allowed; allowed values: 'sum' \| 'mean'"),
        ({"model": {**MODEL, "interaction": "cat"}}, r"model\.interaction: 'cat' is not allowed; allowed values: 'dot'"),
    ],
    ids=["dense-optimizer", "sparse-optimizer", "pooling", "interaction"],
)  # fmt: skip
def test_value_outside_a_choice_lists_the_allowed_values(sections, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        config_from_dict(raw(**sections))


def test_every_optimizer_the_issue_names_is_accepted():
    for dense in ("sgd", "adagrad", "adam"):
        for sparse in ("sgd", "adagrad", "rowwise_adagrad", "adam"):
            cfg = config_from_dict(
                raw(optimizer={"dense": {"name": dense}, "sparse": {"name": sparse}})
            )
            assert (cfg.optimizer.dense.name, cfg.optimizer.sparse.name) == (dense, sparse)


def test_missing_required_field_is_named():
    table = {k: v for k, v in TABLE.items() if k != "num_rows"}
    with pytest.raises(
        ConfigError, match=r"^model\.tables\[0\]\.num_rows: required field is missing"
    ):
        config_from_dict(raw(model={**MODEL, "tables": [table]}))


def test_null_for_a_non_optional_field_is_refused():
    with pytest.raises(ConfigError, match=r"^train\.seed: expected an integer, got NoneType"):
        config_from_dict(raw(train={"seed": None}))


def test_bool_is_not_taken_for_an_integer():
    with pytest.raises(ConfigError, match=r"^train\.steps: expected an integer, got bool True"):
        config_from_dict(raw(train={"steps": True}))


def test_train_needs_steps_or_epochs():
    with pytest.raises(ConfigError, match=r"^train\.steps: set train\.steps or train\.epochs"):
        config_from_dict(raw(train={"steps": None, "epochs": None}))


def test_criteo_source_needs_a_path():
    with pytest.raises(ConfigError, match=r"^data\.path: required when data\.source is 'criteo'"):
        config_from_dict(raw(data={"source": "criteo"}))


def test_missing_data_path_names_the_field(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw(data={"source": "criteo", "path": "absent.tsv"})))
    with pytest.raises(ConfigError, match=r"^data\.path: file or directory not found: absent\.tsv"):
        load_config(path)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(path)


# --------------------------------------------------------------------------- --set


def test_set_overrides_a_nested_key_with_a_yaml_value():
    out = apply_overrides(
        raw(), ["train.steps=7", "logging.progress_bar=false", "model.bottom_mlp=[4, 8]"]
    )
    assert out["train"]["steps"] == 7
    assert out["logging"]["progress_bar"] is False
    assert out["model"]["bottom_mlp"] == [4, 8]


def test_set_indexes_into_lists_in_both_spellings():
    for key in ("model.tables[0].num_rows", "model.tables.0.num_rows"):
        cfg = config_from_dict(apply_overrides(raw(), [f"{key}=99"]))
        assert cfg.model.tables[0].num_rows == 99


def test_set_of_an_unknown_key_fails_at_validation_naming_it():
    with pytest.raises(ConfigError, match=r"^storage\.cache_byte: unknown key"):
        config_from_dict(apply_overrides(raw(), ["storage.cache_byte=1"]))


def test_set_without_equals_is_refused():
    with pytest.raises(ConfigError, match=r"--set 'train\.steps': expected KEY=VALUE"):
        apply_overrides(raw(), ["train.steps"])


def test_set_index_out_of_range_names_the_list():
    with pytest.raises(ConfigError, match=r"model\.tables\.3 is not an index of a list of 1 items"):
        apply_overrides(raw(), ["model.tables[3].num_rows=5"])


def test_set_below_a_scalar_is_refused():
    with pytest.raises(ConfigError, match=r"--set train\.steps\.x: train\.steps is not a section"):
        apply_overrides(raw(train={"steps": 3}), ["train.steps.x=1"])


def test_set_applies_before_validation(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw()))
    with pytest.raises(ConfigError, match=r"^train\.batch_size: -2 must be > 0"):
        load_config(path, ["train.batch_size=-2"])
    assert load_config(path, ["train.batch_size=16"]).train.batch_size == 16
