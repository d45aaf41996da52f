"""`ndp-storage-node`: what it serves and how it takes its token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ndp.cli import storage_node as cli
from ndp.errors import ConfigError
from ndp.planner import shards_for
from storage_node.client import StorageClient
from wire.tiny_node import random_bags, tiny_config

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_tables_flag_serves_whole_tables():
    shards = shards_for(tiny_config(), 0, ["t1"])
    assert [(s.table_name, s.row_start, s.row_end, s.features) for s in shards] == [
        ("t1", 0, 25, ("f2",))
    ]
    assert shards[0].pooling == "mean"


def test_unknown_table_names_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown table.*nope.*tables: t0, t1"):
        shards_for(tiny_config(), 0, ["nope"])


def test_without_tables_the_plan_decides():
    cfg = tiny_config()
    pieces = shards_for(cfg, 0, None) + shards_for(cfg, 1, None)
    assert sorted(s.table_name for s in pieces) == ["t0", "t1"]


def test_token_comes_from_the_file_first_line(tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cret\nignored\n")
    assert cli.read_token(str(path)) == "s3cret"


def test_missing_token_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match="--token-file"):
        cli.read_token(None)


def test_wildcard_host_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(cli.TOKEN_ENV, "t")
    config = tmp_path / "c.yaml"
    config.write_text(tiny_config().to_yaml())
    assert cli.main(["--config", str(config), "--host", "0.0.0.0", "--tables", "t0"]) == 2
    assert "every interface" in capsys.readouterr().err


def test_cli_serves_until_sigterm_and_removes_its_socket(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(tiny_config().to_yaml())
    token_file = tmp_path / "token"
    token_file.write_text("cli-token\n")
    command = [sys.executable, "-m", "ndp.cli.storage_node", "--config", str(config)]
    command += ["--tables", "t0,t1", "--token-file", str(token_file)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(process.stdout.readline())
        assert info["address"].startswith("127.0.0.1:")
        assert info["node_id"] == "0"
        with StorageClient(info["address"], token="cli-token", timeout_s=30) as client:
            pooled = client.lookup(0, 0, random_bags(2, seed=0), train=False)
        assert {feature: vectors.shape[0] for feature, vectors in pooled.items()} == {
            "f0": 2,
            "f1": 2,
            "f2": 2,
        }
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert not os.path.exists(info["unix_address"].removeprefix("unix:"))
