"""`storage.device_profile`: named devices of configs/devices/ under the config's own keys."""

from __future__ import annotations

import pytest

import ndp.device_profiles as device_profiles
from ndp.bench.train import BenchOptions, scenario_config
from ndp.cli.train import build_parser, resolve_config
from ndp.config import config_from_dict
from ndp.device_profiles import load_profile, profile_names
from ndp.errors import ConfigError

SHIPPED = ("cxl_memory_expander", "nvme_gen4_ssd", "pcie_gen3_x4_csd")


def raw_with(**storage) -> dict:
    raw = scenario_config(BenchOptions().scaled(0.01), "fits_in_dram")
    raw["storage"].update(storage)
    return raw


def test_the_three_device_classes_ship():
    assert set(SHIPPED) <= set(profile_names())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_cites_sources_and_sets_link_and_flash_limits(name):
    profile = load_profile(name)
    assert profile["description"] and len(profile["sources"]) >= 2
    storage = config_from_dict(raw_with(device_profile=name)).storage
    assert storage.device_profile == name
    emulation = storage.emulation
    assert emulation.link_bandwidth_mbps and emulation.flash_read_bandwidth_mbps
    assert emulation.flash_write_bandwidth_mbps and emulation.flash_read_latency_us
    assert storage.energy.link_pj_per_byte > 0


def test_the_configs_own_keys_win_over_the_profile():
    storage = config_from_dict(
        raw_with(
            device_profile="pcie_gen3_x4_csd",
            cache_bytes=8192,
            emulation={"flash_read_latency_us": 5.0},
            energy={"dram_pj_per_byte": 1.0},
        )
    ).storage
    assert storage.cache_bytes == 8192  # not the profile's 4 GiB
    assert storage.emulation.flash_read_latency_us == 5.0
    assert storage.emulation.flash_read_bandwidth_mbps == 3200.0  # the profile's
    assert storage.energy.dram_pj_per_byte == 1.0
    assert storage.energy.flash_read_pj_per_byte == 1500.0


def test_the_profile_sets_what_the_config_leaves_out():
    raw = raw_with(device_profile="pcie_gen3_x4_csd")
    del raw["storage"]["cache_bytes"]
    assert config_from_dict(raw).storage.cache_bytes == 4 << 30


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"storage\.device_profile: .*'ssd9'.*pcie_gen3_x4_csd"):
        config_from_dict(raw_with(device_profile="ssd9"))


def test_a_profile_key_outside_storage_emulation_energy_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(device_profiles, "DEVICES_DIR", tmp_path)
    (tmp_path / "odd.yaml").write_text("sources: [x]\nstorage:\n  io_threads: 3\n")
    with pytest.raises(ConfigError, match=r"odd\.yaml: storage: unknown keys \['io_threads'\]"):
        load_profile("odd")


def test_a_profile_without_sources_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(device_profiles, "DEVICES_DIR", tmp_path)
    (tmp_path / "bare.yaml").write_text("storage:\n  emulation: {link_bandwidth_mbps: 1.0}\n")
    with pytest.raises(ConfigError, match="sources"):
        load_profile("bare")


def test_a_wrong_value_in_a_profile_fails_at_its_dotted_path(tmp_path, monkeypatch):
    monkeypatch.setattr(device_profiles, "DEVICES_DIR", tmp_path)
    (tmp_path / "neg.yaml").write_text(
        "sources: [x]\nstorage:\n  emulation: {link_bandwidth_mbps: -1.0}\n"
    )
    with pytest.raises(ConfigError, match=r"storage\.emulation\.link_bandwidth_mbps"):
        config_from_dict(raw_with(device_profile="neg"))


def test_ndp_train_device_profile_flag_sets_storage_device_profile():
    args = build_parser().parse_args(["--device-profile", "nvme_gen4_ssd"])
    storage = resolve_config(args).storage
    assert storage.device_profile == "nvme_gen4_ssd"
    assert storage.emulation.flash_read_bandwidth_mbps == 7000.0
