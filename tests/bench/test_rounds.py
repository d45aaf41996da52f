"""Interleaved rounds: every system measured in turn, forward then backward, figures the
median of the rounds, so that a machine whose speed drifts moves every system alike."""

from __future__ import annotations

import pytest

from ndp.bench.rounds import (
    interleaved_order,
    median_of_rounds,
    rounds_line,
    rounds_table,
    run_interleaved,
    spread,
)


def test_rounds_alternate_direction_so_every_system_sits_at_the_same_mean_time():
    order = interleaved_order(["all_gpu", "hybrid", "ndp"], 4)
    assert order[:6] == [
        (0, "all_gpu"), (0, "hybrid"), (0, "ndp"), (1, "ndp"), (1, "hybrid"), (1, "all_gpu"),
    ]  # fmt: skip
    mean_position = {
        name: sum(i for i, (_, n) in enumerate(order) if n == name) / 4
        for name in ("all_gpu", "hybrid", "ndp")
    }
    assert len(set(mean_position.values())) == 1
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        interleaved_order(["ndp"], 0)


def test_a_linear_drift_of_the_machine_cancels_out_of_the_ratio_of_medians():
    """The machine slows by 5% per measurement; two systems whose true ratio is 0.5."""
    clock = {"slots": 0}

    def job(true_rate: float):
        def measure():
            slowdown = 1.0 - 0.05 * clock["slots"]
            clock["slots"] += 1
            return {"samples_per_s": true_rate * slowdown}

        return measure

    jobs = {"fast": job(1000.0), "slow": job(500.0)}
    single = run_interleaved(jobs, 1, headline=dict)
    clock["slots"] = 0
    both = run_interleaved(jobs, 2, headline=dict)
    assert single["slow"]["samples_per_s"] / single["fast"]["samples_per_s"] == pytest.approx(
        0.5 * 0.95
    )
    assert both["slow"]["samples_per_s"] / both["fast"]["samples_per_s"] == pytest.approx(0.5)
    assert [r["samples_per_s"] for r in both["fast"]["rounds"]] == pytest.approx([1000.0, 850.0])


def test_every_number_is_the_median_of_its_rounds_and_peaks_the_largest():
    rounds = [
        {"samples_per_s": 10.0, "cache_hit_rate": [0.5, 1.0], "note": "first", "steps": 3,
         "cpu_per_step": {"per_process_s": {"node-0": 0.1, "node-1": None}},
         "peak_rss_bytes": {"node-0": 100}, "applied": True},
        {"samples_per_s": 30.0, "cache_hit_rate": [0.7, 1.0], "note": "second", "steps": 3,
         "cpu_per_step": {"per_process_s": {"node-0": 0.3, "node-1": None}},
         "peak_rss_bytes": {"node-0": 300}, "applied": False},
        {"samples_per_s": 20.0, "cache_hit_rate": [0.6, 1.0], "note": "third", "steps": 3,
         "cpu_per_step": {"per_process_s": {"node-0": 0.2, "node-1": None}},
         "peak_rss_bytes": {"node-0": 200}, "applied": True},
    ]  # fmt: skip
    combined = median_of_rounds(rounds)
    assert combined["samples_per_s"] == 20.0
    assert combined["cache_hit_rate"] == [0.6, 1.0]
    assert combined["cpu_per_step"]["per_process_s"] == {"node-0": 0.2, "node-1": None}
    assert combined["peak_rss_bytes"] == {"node-0": 300}
    assert combined["steps"] == 3 and isinstance(combined["steps"], int)
    # what is not a number is the first round's: a flag is not averaged into a number
    assert combined["note"] == "first" and combined["applied"] is True


def test_the_report_shows_each_round_and_the_largest_spread():
    run = {"rounds": [{"samples_per_s": 90.0, "machine_cpu_us_per_sample": 10.0},
                      {"samples_per_s": 110.0, "machine_cpu_us_per_sample": 12.0}]}  # fmt: skip
    steady = {"rounds": [{"samples_per_s": 100.0, "machine_cpu_us_per_sample": None}] * 2}
    systems = {"all_gpu": {"fits_in_dram": run}, "ndp": {"fits_in_dram": steady}}
    assert spread(run) == pytest.approx(0.2)
    assert spread({"rounds": [{"samples_per_s": 1.0}]}) is None
    line = rounds_line(systems, 2)
    assert "median of 2 interleaved round(s)" in line
    assert "largest 20.0% (all_gpu/fits_in_dram)" in line
    table = rounds_table(systems)
    assert table["rows"][0] == ["all_gpu", "fits_in_dram", "90 / 110", "10 / 12", "20.0%"]
    assert table["rows"][1][3] == "- / -"
