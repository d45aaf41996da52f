"""`ndp-bench train` at a tiny scale writes the three result files with every system."""

from __future__ import annotations

import json

import pytest

from ndp.cli.bench import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_tiny_train_bench_writes_results_for_all_five_systems(ray_session, tmp_path, capsys):
    status = main(["train", "--quick", "--scale", "0.06", "--output-dir", str(tmp_path)])
    assert status == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"results.json", "results.md", "results.png"}
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["systems"]) == {"all_gpu", "hybrid", "os_paged", "ndp", "ndp_lookahead"}
    for system, runs in results["systems"].items():
        assert {"fits_in_dram", "large_zipf", "cache_5pct", "multihot"} <= set(runs), system
        for run in runs.values():
            assert run["samples_per_s"] > 0
    large = results["systems"]["ndp"]["large_zipf"]
    assert large["embedding_state_bytes"] >= 4 * large["node_cache_budget_bytes"]
    assert results["systems"]["ndp"]["fits_in_dram"]["link_bytes_per_sample"]["link_bytes_in"] == (
        26 * 16 * 4
    )
    out = capsys.readouterr().out
    assert "1. fits in DRAM" in out and "4. link bytes per sample" in out
