"""Nothing silently wrong in a config file (issue 21): each rule below once let a config load
while it meant something other than what it said.

Every test loads YAML text the way `ndp-train --config` does (`load_config`, plus `--set`
overrides where named), because the problems live in how the YAML is read, not only in the
dataclasses. Rows in docs/bad_input.md ("## Config") name these tests.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import replace
from pathlib import Path
from typing import Union, get_args, get_origin

import pytest

from ndp.config import Config, load_config
from ndp.errors import ConfigError

BASE = """\
model:
  bottom_mlp: [8, 8]
  top_mlp: [8, 1]
  tables:
    - name: t
      num_rows: 10
      embedding_dim: 8
      features: [f]
data:
  source: synthetic
"""


def load(tmp_path: Path, text: str = BASE, *overrides: str) -> Config:
    """`load_config` of `text` written to a file, as `ndp-train --config FILE --set ...`."""
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return load_config(path, list(overrides))


# --------------------------------------------------------------------------- duplicate keys


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        (BASE + "train:\n  steps: 5\n  batch_size: 8\n  steps: 50\n", r"train\.steps", (12, 14)),
        (BASE + "train:\n  steps: 5\nlogging:\n  progress_bar: false\ntrain:\n  steps: 50\n", "train", (11, 15)),
        (BASE.replace("      num_rows: 10\n", "      num_rows: 10\n      num_rows: 99\n"), r"model\.tables\[0\]\.num_rows", (6, 7)),
        (BASE.replace("  source: synthetic\n", "  source: synthetic\n  source: criteo\n"), r"data\.source", (10, 11)),
    ],
    ids=["key-in-a-section", "section-twice", "key-in-a-list-item", "last-would-fail-too"],
)  # fmt: skip
def test_a_duplicate_key_names_its_dotted_path_and_both_lines(tmp_path, text, key, lines):
    first, second = lines
    with pytest.raises(
        ConfigError, match=rf"^{key}: duplicate key, lines {first} and {second} of .*job\.yaml"
    ):
        load(tmp_path, text)


def test_a_duplicate_key_inside_a_set_value_names_the_overridden_path(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.steps: duplicate key.*--set train="):
        load(tmp_path, BASE, "train={steps: 5, steps: 50}")


def test_a_set_value_that_is_not_yaml_is_a_one_line_config_error(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^--set 'train.steps=\[1': the value is not valid YAML"
    ) as err:
        load(tmp_path, BASE, "train.steps=[1")
    assert "\n" not in str(err.value)


def test_the_same_key_in_two_sections_is_not_a_duplicate(tmp_path):
    text = BASE + "train:\n  steps: 5\nlogging:\n  interval_steps: 2\n"
    cfg = load(tmp_path, text + "checkpoint:\n  enabled: true\n  interval_steps: 3\n")
    assert (cfg.train.steps, cfg.logging.interval_steps, cfg.checkpoint.interval_steps) == (5, 2, 3)


def test_a_key_merged_from_an_anchor_may_be_overridden(tmp_path):
    """`<<: *base` then a key of its own is YAML's way to override, not a duplicate."""
    text = BASE + "optimizer:\n  dense: {<<: {name: adam, lr: 0.01}, lr: 0.03}\n"
    assert load(tmp_path, text).optimizer.dense.lr == 0.03


# --------------------------------------------------------------------------- NaN and infinity


def float_fields(cls: type = Config, path: str = "") -> list[tuple[str, str]]:
    """(the `--set` text that puts NaN into a float field, the dotted path the error names)
    for every float of the config tree, a float list's items and a float map's values."""
    found = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        where = f"{path}.{field.name}" if path else field.name
        tp = hints[field.name]
        options = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
        if dataclasses.is_dataclass(tp):
            found += float_fields(tp, where)
        elif float in options:
            found.append((f"{where}=.nan", where))
        elif any(get_origin(o) is list and get_args(o) == (float,) for o in options):
            found.append((f"{where}=[.nan]", f"{where}[0]"))
        elif any(get_origin(o) is dict and get_args(o)[1] is float for o in options):
            found.append((f"{where}={{CPU: .nan}}", f"{where}.CPU"))
    return found


FLOAT_FIELDS = float_fields()


def test_the_float_field_list_covers_every_section_with_floats():
    paths = {where for _, where in FLOAT_FIELDS}
    assert {"optimizer.dense.lr", "optimizer.sparse.eps", "optimizer.dense.betas[0]"} <= paths
    assert {"checkpoint.interval_minutes", "storage.emulation.flash_read_latency_us"} <= paths
    assert {"cluster.storage_node_resources.CPU", "data.synthetic.zipf_exponent"} <= paths
    assert len(paths) >= 25


@pytest.mark.parametrize("spelling", [".nan", ".inf", "-.inf", "1e999"])
@pytest.mark.parametrize(("override", "where"), FLOAT_FIELDS, ids=[w for _, w in FLOAT_FIELDS])
def test_nan_or_infinity_in_any_float_field_is_refused_naming_the_field(
    tmp_path, override, where, spelling
):
    with pytest.raises(ConfigError, match=rf"^{re.escape(where)}: .* is not a finite number"):
        load(tmp_path, BASE, override.replace(".nan", spelling))


def test_nan_learning_rate_in_the_file_is_refused(tmp_path):
    text = BASE + "optimizer:\n  dense:\n    lr: .nan\n"
    with pytest.raises(ConfigError, match=r"^optimizer\.dense\.lr: nan is not a finite number"):
        load(tmp_path, text)


# --------------------------------------------------------------------------- number spellings


@pytest.mark.parametrize(
    ("spelling", "value"),
    [("1e-3", 1e-3), ("1E5", 1e5), (".5", 0.5), ("+2.5e-3", 2.5e-3), ("1.0e5", 1e5), ("3", 3.0)],
)
def test_a_float_field_reads_every_yaml_number_spelling_as_a_number(tmp_path, spelling, value):
    cfg = load(tmp_path, BASE + f"optimizer:\n  sparse:\n    lr: {spelling}\n")
    assert cfg.optimizer.sparse.lr == value and type(cfg.optimizer.sparse.lr) is float


def test_a_negative_learning_rate_in_exponent_notation_is_refused_as_a_number(tmp_path):
    with pytest.raises(ConfigError, match=r"^optimizer\.dense\.lr: -1000000000\.0 must be > 0"):
        load(tmp_path, BASE + "optimizer:\n  dense:\n    lr: -1e9\n")
    with pytest.raises(ConfigError, match=r"^optimizer\.dense\.lr: -0\.5 must be > 0"):
        load(tmp_path, BASE, "optimizer.dense.lr=-.5")


def test_a_set_override_reads_exponent_notation_as_a_number(tmp_path):
    assert load(tmp_path, BASE, "optimizer.dense.lr=1e-3").optimizer.dense.lr == 1e-3


def test_an_int_field_takes_an_exponent_only_when_it_is_a_whole_number(tmp_path):
    text = BASE.replace(
        "  source: synthetic\n", "  source: synthetic\n  synthetic: {num_samples: 1e6}\n"
    )
    cfg = load(tmp_path, text)
    assert cfg.data.synthetic.num_samples == 1_000_000
    assert type(cfg.data.synthetic.num_samples) is int
    with pytest.raises(ConfigError, match=r"^train\.steps: expected an integer, got float 2\.5"):
        load(tmp_path, BASE, "train.steps=2.5e0")
    with pytest.raises(ConfigError, match=r"^train\.steps: expected an integer, got float 1e\+20"):
        load(tmp_path, BASE, "train.steps=1e20")  # past 2**53 a float is no exact integer


def test_a_quoted_number_is_a_string(tmp_path):
    with pytest.raises(ConfigError, match=r"^optimizer\.dense\.lr: expected a number, got str"):
        load(tmp_path, BASE + "optimizer:\n  dense:\n    lr: '1e-3'\n")
    quoted_name = BASE.replace("name: t", "name: '1e5'")
    assert load(tmp_path, quoted_name).model.tables[0].name == "1e5"


def test_a_string_that_looks_like_a_number_survives_a_save_and_reload(tmp_path):
    cfg = load(tmp_path, BASE)
    table = replace(cfg.model.tables[0], name="1e5")
    cfg = replace(cfg, model=replace(cfg.model, tables=[table]))
    assert load(tmp_path, cfg.to_yaml()) == cfg


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("enabled", ["  enabled: false\n", ""], ids=["disabled", "not-enabled"])
@pytest.mark.parametrize("setting", ["interval_steps: 5", "interval_minutes: 1.5", "dir: ckpt"])
def test_a_checkpoint_setting_without_checkpoints_enabled_says_to_enable_them(
    tmp_path, setting, enabled
):
    name = setting.split(":")[0]
    text = BASE + f"checkpoint:\n{enabled}  {setting}\n"
    with pytest.raises(
        ConfigError,
        match=rf"^checkpoint\.{name}: .*no checkpoint would be written; set "
        r"checkpoint\.enabled: true",
    ):
        load(tmp_path, text)


def test_a_checkpoint_interval_set_on_the_command_line_needs_enabled_too(tmp_path):
    with pytest.raises(ConfigError, match=r"^checkpoint\.interval_steps: .*enabled: true"):
        load(tmp_path, BASE, "checkpoint.interval_steps=5")
    cfg = load(tmp_path, BASE, "checkpoint.enabled=true", "checkpoint.interval_steps=5")
    assert cfg.checkpoint.enabled and cfg.checkpoint.interval_steps == 5


def test_checkpoint_settings_with_checkpoints_enabled_load(tmp_path):
    text = BASE + "checkpoint:\n  enabled: true\n  dir: ckpt\n  interval_minutes: 1.5\n"
    section = load(tmp_path, text).checkpoint
    assert (section.enabled, section.dir, section.interval_minutes) == (True, "ckpt", 1.5)


def test_a_saved_run_config_loads_again(tmp_path):
    """config.yaml of a run lists every field, unset ones as null: null is not 'set'."""
    cfg = load(tmp_path, BASE + "train:\n  steps: 3\n")
    assert "interval_steps: null" in cfg.to_yaml()
    reloaded = load(tmp_path, cfg.to_yaml())
    assert reloaded == cfg
