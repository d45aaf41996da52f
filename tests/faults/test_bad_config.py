"""Bad config input fails at load with the dotted path and what is allowed (docs/bad_input.md)."""

from __future__ import annotations

import pytest

from ndp.config import config_from_dict, load_config
from ndp.errors import ConfigError

TABLE = {"name": "t", "num_rows": 10, "embedding_dim": 8, "features": ["f"]}
MODEL = {"bottom_mlp": [8, 8], "top_mlp": [8, 1], "tables": [TABLE]}


def raw(**sections) -> dict:
    return {"model": MODEL, "data": {"source": "synthetic"}, **sections}


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"train\.stepz: unknown key; allowed .*steps"):
        config_from_dict(raw(train={"stepz": 3}))


def test_wrong_type_names_the_field_and_the_expected_type():
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected an integer, got str"):
        config_from_dict(raw(train={"batch_size": "big"}))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"embedding_dim": 6}, r"tables\[0\]\.embedding_dim: 6 is not a multiple of 4"),
        ({"num_rows": 0}, r"tables\[0\]\.num_rows: 0 must be > 0"),
    ],
    ids=["dim-not-multiple-of-4", "zero-rows"],
)
def test_impossible_table_size_names_the_table_field(table, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw(model={**MODEL, "tables": [{**TABLE, **table}]}))


def test_negative_cache_budget_is_refused():
    with pytest.raises(ConfigError, match=r"storage\.cache_bytes: -1 must be > 0"):
        config_from_dict(raw(storage={"cache_bytes": -1}))


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="file not found: .*absent.yaml"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]"])
def test_bind_host_on_every_interface_is_refused(host):
    with pytest.raises(ConfigError, match=r"cluster\.bind_host: binding to all interfaces"):
        config_from_dict(raw(cluster={"bind_host": host}))
