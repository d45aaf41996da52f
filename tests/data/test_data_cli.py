"""`ndp-data` and the shared exit-code rule: 0 success, 2 user error (one line), 1 bug."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from criteo_lines import tsv_line

from ndp.cli import run_cli
from ndp.cli.data import main
from ndp.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
SYNTH_CONFIG = {
    "model": {
        "bottom_mlp": [8, 4],
        "tables": [{"name": "t", "num_rows": 100, "embedding_dim": 4, "features": ["f0"]}],
    },
    "data": {"source": "synthetic", "synthetic": {"num_samples": 300, "num_val_samples": 50}},
}


def test_preprocess_exits_0_and_writes_the_splits(tmp_path, criteo_sample, capsys):
    status = main(
        [
            "preprocess",
            "--input",
            str(criteo_sample),
            "--output",
            str(tmp_path / "out"),
            "--val-fraction",
            "0.25",
        ]
    )
    assert status == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["train"], report["val"], report["skipped_lines"]) == (6000, 2000, 0)
    assert np.load(tmp_path / "out" / "val" / "labels.npy").shape == (2000,)


def test_preprocess_takes_policies_and_val_fraction_from_the_config(tmp_path, make_tsv, capsys):
    tsv = make_tsv([tsv_line("0"), "garbage", tsv_line("1"), tsv_line("1")])
    config = tmp_path / "cfg.yaml"
    raw = {
        **SYNTH_CONFIG,
        "data": {"path": str(tsv), "bad_line_policy": "skip", "val_fraction": 0.5},
    }
    raw["model"] = {
        **raw["model"],
        "tables": [{"name": "t", "num_rows": 100, "embedding_dim": 4, "features": ["cat_0"]}],
    }
    config.write_text(yaml.safe_dump(raw))
    status = main(
        [
            "preprocess",
            "--input",
            str(tsv),
            "--output",
            str(tmp_path / "o"),
            "--config",
            str(config),
        ]
    )
    assert status == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["train"], report["val"], report["skipped_lines"]) == (1, 2, 1)


def test_malformed_input_exits_2_with_file_and_line_on_one_line(tmp_path, make_tsv, capsys):
    tsv = make_tsv([tsv_line("0"), tsv_line("7")])
    status = main(["preprocess", "--input", str(tsv), "--output", str(tmp_path / "out")])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "day.tsv:2:" in err and "Traceback" not in err


def test_synth_exits_0_and_writes_loadable_jagged_data(tmp_path, capsys):
    config = tmp_path / "synth.yaml"
    config.write_text(yaml.safe_dump(SYNTH_CONFIG))
    assert main(["synth", "--config", str(config), "--output", str(tmp_path / "syn")]) == 0
    meta = json.loads((tmp_path / "syn" / "meta.json").read_text())
    assert meta["layout"] == "jagged_indices"
    assert meta["features"] == [{"name": "f0", "table": "t", "num_rows": 100}]
    assert np.load(tmp_path / "syn" / "train" / "sparse" / "0.lengths.npy").shape == (300,)


def test_synth_with_missing_config_exits_2(tmp_path, capsys):
    status = main(["synth", "--config", str(tmp_path / "nope.yaml"), "--output", str(tmp_path)])
    assert status == 2
    assert "file not found" in capsys.readouterr().err


def test_missing_arguments_exit_2_via_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        main(["preprocess", "--output", "x"])
    assert info.value.code == 2


def test_run_cli_maps_user_errors_to_2_and_bugs_to_1(capsys):
    def user_error():
        raise DataError("bad.tsv:3: label is 'x'\nexpected 0 or 1")

    def bug():
        raise RuntimeError("oops")

    assert run_cli(user_error, prog="ndp-x") == 2
    assert capsys.readouterr().err == "ndp-x: error: bad.tsv:3: label is 'x' expected 0 or 1\n"
    assert run_cli(bug, prog="ndp-x") == 1
    assert "Traceback" in capsys.readouterr().err
    assert run_cli(lambda: None, prog="ndp-x") == 0


def test_console_process_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ndp.cli.data",
            "preprocess",
            "--input",
            str(tmp_path / "missing.tsv"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 2
    assert "missing.tsv: no such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_preprocess_reads_several_inputs_in_the_order_given(tmp_path, make_tsv, capsys):
    first = make_tsv([tsv_line("0")] * 3, name="b.tsv")
    second = make_tsv([tsv_line("1")] * 1, name="a.tsv")
    out = tmp_path / "out"
    argv = ["preprocess", "--input", str(first), str(second), "--output", str(out)]
    assert main([*argv, "--val-fraction", "0.25"]) == 0
    assert np.load(out / "train" / "labels.npy").tolist() == [0.0, 0.0, 0.0]
    assert np.load(out / "val" / "labels.npy").tolist() == [1.0]
    meta = json.loads((out / "meta.json").read_text())
    assert [Path(f).name for f in meta["source_files"]] == ["b.tsv", "a.tsv"]
