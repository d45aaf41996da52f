"""The energy model (`ndp.energy`) and the energy report of `ndp-bench train`.

Unit tests price hand-made counters; the end-to-end test runs a tiny benchmark and fails
when a counter the model prices stops being measured by any system.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ndp.bench.energy import (
    CounterNotMeasured,
    baseline_counters,
    energy_lines,
    ndp_counters,
    price_runs,
    row_traffic_bytes,
)
from ndp.bench.train import BenchOptions, scenario_config
from ndp.cli.bench import main
from ndp.config import EnergyConfig, config_from_dict
from ndp.data.batch import Batch
from ndp.energy import TERMS, EnergyCounters, energy_terms, shares

COUNTERS = EnergyCounters(
    dram_bytes=1000,
    flash_bytes_read=2000,
    flash_bytes_written=300,
    flash_pages_read=5,
    flash_pages_written=1,
    link_bytes=700,
    cpu_busy_s=0.25,
    device_busy_s=0.5,
)
NODE = {
    "dram_bytes": 10,
    "flash_bytes_read": 8192,
    "flash_bytes_written": 4096,
    "flash_pages_read": 2,
    "flash_pages_written": 1,
}
CPU_RUN = {"cpu_per_step": {"per_process_s": {"coordinator": 0.01, "storage-node-0": 0.02}}}


def test_each_term_is_its_counter_times_its_constant():
    constants = EnergyConfig(
        dram_pj_per_byte=1.0,
        flash_read_pj_per_byte=2.0,
        flash_write_pj_per_byte=3.0,
        flash_pj_per_page=4.0,
        link_pj_per_byte=5.0,
        cpu_busy_watts=6.0,
        device_busy_watts=0.5,
    )
    terms = energy_terms(COUNTERS, constants)
    assert tuple(terms) == TERMS
    assert terms == pytest.approx(
        {
            "dram": 1000e-12,
            "flash_read": 4000e-12,
            "flash_write": 900e-12,
            "flash_pages": 24e-12,
            "link": 3500e-12,
            "cpu": 1.5,
            "device": 0.25,
        }
    )


def test_shares_sum_to_one_and_zero_energy_has_zero_shares():
    assert sum(shares(energy_terms(COUNTERS, EnergyConfig())).values()) == pytest.approx(1.0)
    assert set(shares(dict.fromkeys(TERMS, 0.0)).values()) == {0.0}


def test_a_negative_count_is_refused():
    with pytest.raises(AssertionError, match="link_bytes"):
        EnergyCounters(**{**COUNTERS.scaled(1), "link_bytes": -1})


def test_a_negative_constant_names_the_field():
    raw = scenario_config(BenchOptions(), "fits_in_dram")
    raw["storage"]["energy"] = {"cpu_busy_watts": -1}
    with pytest.raises(Exception, match=r"storage\.energy\.cpu_busy_watts"):
        config_from_dict(raw)


def test_ndp_counters_sum_the_nodes_and_the_message_bytes_only():
    wire = {"Lookup.sent": 100, "Lookup.received": 400, "Lookup.received.float_data": 300}
    counters = ndp_counters([NODE, NODE], wire, CPU_RUN, steps=10)
    assert counters.dram_bytes == 20
    assert counters.flash_pages_read == 4 and counters.flash_bytes_written == 8192
    assert counters.link_bytes == 500  # framing included, the float_data part not twice
    assert counters.cpu_busy_s == pytest.approx(0.1)  # the coordinator's
    assert counters.device_busy_s == pytest.approx(0.2)  # the storage node's


@pytest.mark.parametrize("counter", sorted(NODE))
def test_ndp_counters_fail_when_a_node_counter_is_not_measured(counter):
    node = {k: v for k, v in NODE.items() if k != counter}
    with pytest.raises(CounterNotMeasured, match=counter):
        ndp_counters([NODE, node], {"Lookup.sent": 1}, CPU_RUN, steps=1)


def test_ndp_counters_fail_without_link_bytes():
    with pytest.raises(CounterNotMeasured, match="link"):
        ndp_counters([NODE], {}, CPU_RUN, steps=1)


def test_ndp_counters_fail_without_the_storage_nodes_cpu_time():
    run = {"cpu_per_step": {"per_process_s": {"coordinator": 0.01}}}
    with pytest.raises(CounterNotMeasured, match="storage nodes"):
        ndp_counters([NODE], {"Lookup.sent": 1}, run, steps=1)


def test_cpu_time_not_measured_is_an_error_not_zero():
    run = {"cpu_per_step": {"per_process_s": {"bench_process": None}}}
    with pytest.raises(CounterNotMeasured, match="CPU"):
        ndp_counters([NODE], {"Lookup.sent": 1}, run, steps=1)


def test_os_paged_without_flash_bytes_is_an_error():
    cfg = config_from_dict(scenario_config(BenchOptions().scaled(0.01), "fits_in_dram"))
    with pytest.raises(CounterNotMeasured, match="flash"):
        baseline_counters("os_paged", CPU_RUN, [], cfg, steps=1)


def _one_feature_batch(cfg, rows: list[int]) -> Batch:
    """One lookup per sample of the first feature's table; no lookups in the others."""
    keys = [f for t in cfg.model.effective_tables() for f in t.features]
    batch_size = len(rows)
    lengths = torch.tensor([1] * batch_size + [0] * (batch_size * (len(keys) - 1)))
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor(rows), lengths=lengths
    )
    return Batch(dense=torch.zeros(batch_size, 13), sparse=sparse, labels=torch.zeros(batch_size))


def test_row_traffic_reads_every_lookup_and_updates_unique_rows_once():
    cfg = config_from_dict(scenario_config(BenchOptions().scaled(0.01), "fits_in_dram"))
    row_bytes = cfg.model.effective_tables()[0].embedding_dim * 4
    batch = _one_feature_batch(cfg, [3, 3, 5, 7])  # 4 lookups, 3 distinct rows
    assert row_traffic_bytes([batch], cfg) == (4 + 2 * 3) * row_bytes
    assert row_traffic_bytes([batch, batch], cfg) == 2 * (4 + 2 * 3) * row_bytes


def test_report_prints_energy_per_iteration_and_ndp_over_hybrid():
    systems = {
        "hybrid": {"s": {"energy_counters": {**COUNTERS.scaled(1), "cpu_busy_s": 0.5}}},
        "ndp": {"s": {"energy_counters": {**COUNTERS.scaled(1), "cpu_busy_s": 0.25}}},
    }
    price_runs(systems, EnergyConfig(), steps=10, batch_size=4)
    hybrid, ndp = systems["hybrid"]["s"]["energy"], systems["ndp"]["s"]["energy"]
    assert ndp["per_sample_j"] == pytest.approx(ndp["per_iteration_j"] / 4)
    (line,) = energy_lines(systems)
    ratio = ndp["per_iteration_j"] / hybrid["per_iteration_j"]
    assert line.startswith("energy per iteration, s (mJ): hybrid ")
    assert line.endswith(f"ndp / hybrid = {ratio:.2f}x")


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_bench_prices_counters_every_system_measured(ray_session, tmp_path, capsys):
    status = main(
        ["train", "--quick", "--scale", "0.03", "--scenarios", "cache_5pct"]
        + ["--device-profile", "pcie_gen3_x4_csd", "--output-dir", str(tmp_path)]
    )
    assert status == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["energy_model"]["device_profile"] == "pcie_gen3_x4_csd"
    assert results["options"]["device_profile"] == "pcie_gen3_x4_csd"
    for system, runs in results["systems"].items():
        counters = runs["cache_5pct"]["energy_counters"]
        energy = runs["cache_5pct"]["energy"]
        assert counters["dram_bytes"] > 0, system
        assert counters["cpu_busy_s"] >= 0, system  # 10 ms clock ticks: 0 is a reading
        assert energy["per_iteration_j"] > 0 and math.isclose(sum(energy["shares"].values()), 1)
    for system in ("ndp", "ndp_lookahead"):
        counters = results["systems"][system]["cache_5pct"]["energy_counters"]
        # the cache holds 5% of the rows: the nodes read flash, and the link carries bags
        assert counters["flash_bytes_read"] > 0 and counters["flash_pages_read"] > 0, system
        assert counters["link_bytes"] > 0, system
    printed = capsys.readouterr().out
    assert "energy per iteration, cache_5pct (mJ): all_gpu " in printed
    assert "ndp / hybrid = " in printed
    assert "## energy per iteration" in (tmp_path / "results.md").read_text()
