"""`ndp-train` as a user runs it: a real subprocess of the venv's console script."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ndp.cli.train import DEFAULT_CONFIG, main
from ndp.config import load_config
from ndp.metrics import read_metrics
from ndp.run_dir import make_run_dir

NDP_TRAIN = Path(sys.executable).parent / "ndp-train"
TINY = [
    "--set", "train.steps=5",
    "--set", "train.batch_size=64",
    "--set", "train.eval_batches=2",
    "--set", "logging.interval_steps=1",
    "--set", "logging.progress_bar=false",
    "--set", "model.max_rows_per_table=500",
]  # fmt: skip


def _ndp_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [str(NDP_TRAIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_reference_run_on_the_default_config_writes_config_metrics_and_summary(tmp_path):
    run_dir = tmp_path / "run"
    result = _ndp_train("--mode", "reference", *TINY, "--output-dir", str(run_dir), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 5
    assert resolved["model"]["max_rows_per_table"] == 500
    assert resolved["data"]["path"].endswith("criteo_day0_sample.tsv")

    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r["type"] == "train"] == [0, 1, 2, 3, 4]
    (final_eval,) = [r for r in records if r["type"] == "eval"]
    assert final_eval["num_samples"] == 2 * 64

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mode"] == "reference"
    assert summary["steps"] == 5 and summary["samples"] == 5 * 64
    assert summary["interrupted"] is False
    assert summary["final_eval"]["auc"] == final_eval["auc"]
    assert "5 steps" in result.stdout and "validation AUC" in result.stdout


def test_bad_set_exits_2_with_one_line_naming_the_field(tmp_path):
    result = _ndp_train("--mode", "reference", "--set", "train.stepz=5", cwd=tmp_path)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "train.stepz" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_config_file_exits_2_with_one_line_naming_the_file(tmp_path):
    result = _ndp_train("--config", "nowhere.yaml", "--mode", "reference", cwd=tmp_path)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "nowhere.yaml" in lines[0] and "Traceback" not in result.stderr


def test_default_config_is_the_repositorys_configs_dlrm_yaml():
    assert DEFAULT_CONFIG == Path(__file__).resolve().parent.parent / "configs" / "dlrm.yaml"
    assert load_config(DEFAULT_CONFIG).model.tables


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resume"], "no checkpoint in"),
        (["--resume", "ckpt/step_10"], "no checkpoint in"),
        (["--mode", "reference", "--resume"], "only --mode ndp writes checkpoints"),
        (["--mode", "reference", "--address", "auto"], "--address"),
    ],
)
def test_unavailable_or_mismatched_flags_exit_2_with_a_message(tmp_path, capsys, flags, message):
    status = main([*flags, "--output-dir", str(tmp_path / "run")])

    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_output_dir_holding_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{}")

    status = main(["--mode", "reference", "--output-dir", str(tmp_path)])

    assert status == 2
    assert "--output-dir" in capsys.readouterr().err


def test_without_output_dir_a_run_writes_into_runs_timestamp(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    status = main(["--config", str(DEFAULT_CONFIG), "--mode", "reference", *TINY])

    assert status == 0, capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}", run_dir.name)
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= {p.name for p in run_dir.iterdir()}
    assert "validation AUC" in capsys.readouterr().out


def test_default_run_dirs_of_the_same_second_do_not_collide(tmp_path):
    first = make_run_dir(None, root=tmp_path / "runs")
    second = make_run_dir(None, root=tmp_path / "runs")
    assert first != second and second.name.startswith(first.name)
