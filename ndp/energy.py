"""One energy model for every system: measured counters priced by `storage.energy` constants.

Why one model: a near-data design is argued in joules as much as in seconds, and a
comparison is only fair when every system is priced by the same constants from the same
kinds of counters. Each system reports what it measured over a window (`EnergyCounters`);
`energy_terms` turns them into joules per term. Nothing here is measured or assumed about a
particular system: the caller says where each counter came from (docs/energy.md).

    term         counter                                  constant (storage.energy)
    dram         bytes read + written in DRAM             dram_pj_per_byte
    flash_read   bytes read from flash                    flash_read_pj_per_byte
    flash_write  bytes programmed to flash                flash_write_pj_per_byte
    flash_pages  pages read + written                     flash_pj_per_page
    link         bytes over the host link or network      link_pj_per_byte
    cpu          host busy CPU-seconds (all cores)        cpu_busy_watts (per busy core)
    device       storage nodes' busy CPU-seconds          device_busy_watts

Not modelled: the accelerator's energy (the dense half is the same work in every system),
idle and static power (a run's power while nothing is busy), cooling.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ndp.config import EnergyConfig

PJ = 1e-12
TERMS = ("dram", "flash_read", "flash_write", "flash_pages", "link", "cpu", "device")
"""The model's terms, in report order."""


@dataclass(frozen=True, kw_only=True)
class EnergyCounters:
    """What one system measured over a window (totals, not rates)."""

    dram_bytes: int
    """Bytes of embedding rows read and written in DRAM (caches, page cache, host tables)."""
    flash_bytes_read: int
    """Bytes the flash device read (whole pages)."""
    flash_bytes_written: int
    """Bytes the flash device programmed (whole pages)."""
    flash_pages_read: int
    """Flash pages read."""
    flash_pages_written: int
    """Flash pages written."""
    link_bytes: int
    """Bytes that crossed the host link or network, both directions."""
    cpu_busy_s: float
    """CPU-seconds the system's host processes were busy, summed over cores."""
    device_busy_s: float = 0.0
    """CPU-seconds of the processes that emulate a device's compute (ndp's storage nodes):
    priced apart because a real device does that work on its own, slower, cores or FPGA."""

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            assert value is not None and value >= 0, f"{item.name}: {value} (a count is >= 0)"

    def scaled(self, factor: float) -> dict[str, float]:
        """Every counter times `factor` (e.g. 1 / steps: per iteration)."""
        return {item.name: getattr(self, item.name) * factor for item in fields(self)}


def energy_terms(counters: EnergyCounters, constants: EnergyConfig) -> dict[str, float]:
    """Joules per term (`TERMS`) of the window the counters cover."""
    return {
        "dram": counters.dram_bytes * constants.dram_pj_per_byte * PJ,
        "flash_read": counters.flash_bytes_read * constants.flash_read_pj_per_byte * PJ,
        "flash_write": counters.flash_bytes_written * constants.flash_write_pj_per_byte * PJ,
        "flash_pages": (counters.flash_pages_read + counters.flash_pages_written)
        * constants.flash_pj_per_page
        * PJ,
        "link": counters.link_bytes * constants.link_pj_per_byte * PJ,
        "cpu": counters.cpu_busy_s * constants.cpu_busy_watts,
        "device": counters.device_busy_s * constants.device_busy_watts,
    }


def shares(terms: dict[str, float]) -> dict[str, float]:
    """Each term's fraction of the total (all 0 when the total is 0)."""
    total = sum(terms.values())
    return {name: (value / total if total else 0.0) for name, value in terms.items()}
