"""A storage node under 8 concurrent clients keeps answering, keeps its cache budget, loses no update."""

from __future__ import annotations

import json

import numpy as np
import torch

from ndp.bench.load import LoadOptions, client_traffic, expected_row_sums, run_load
from ndp.cli.bench import main as bench_main

SMALL = LoadOptions(
    num_clients=8, steps=125, batch_size=16, pooling_factor=4, num_rows=2_000, embedding_dim=8
)


def test_eight_clients_a_thousand_lookups_and_pushes_each_answered_in_budget_none_lost():
    result = run_load(SMALL)
    calls = SMALL.num_clients * SMALL.steps
    assert calls == 1000  # lookups, and as many pushes
    assert result.lookup_latency_s.shape == result.push_latency_s.shape == (calls,)
    assert (result.lookup_latency_s > 0).all() and (result.push_latency_s > 0).all()
    assert result.stats_samples >= 2
    assert 0 < result.max_cached_rows <= result.capacity_rows < SMALL.num_rows
    assert result.mismatched_rows == 0
    assert result.max_abs_error < 1e-3  # float32 rounding of initial + integer sums only


def test_expected_sums_count_every_client_and_step_once():
    options = LoadOptions(
        num_clients=2, steps=3, batch_size=2, pooling_factor=2, num_rows=5, embedding_dim=4
    )
    by_hand = torch.zeros(5, 4, dtype=torch.float64)
    for step in range(3):
        for worker in range(2):
            indices, grads = client_traffic(options, step, worker)
            for position, row in enumerate(indices.tolist()):
                by_hand[row] += grads[position // 2].double()
    assert torch.equal(expected_row_sums(options), by_hand)
    assert by_hand.abs().sum() > 0


def test_traffic_gradients_are_small_integers():
    _, grads = client_traffic(SMALL, step=3, worker=5)
    assert torch.equal(grads, grads.round()) and grads.abs().max() <= 3


def test_ndp_bench_load_writes_percentiles_to_the_three_result_files(tmp_path, capsys):
    out = tmp_path / "load"
    assert bench_main(["load", "--quick", "--output-dir", str(out), "--scale", "0.2"]) == 0
    results = json.loads((out / "results.json").read_text())
    for call in ("lookup", "push"):
        figures = results["latency"][call]
        assert figures["p50_ms"] <= figures["p90_ms"] <= figures["p99_ms"] <= figures["max_ms"]
        assert np.isfinite(list(figures.values())).all()
    assert results["mismatched_rows"] == 0
    assert results["max_cached_rows"] <= results["capacity_rows"]
    assert "p99" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 0
    assert "lookup: p50" in capsys.readouterr().out
