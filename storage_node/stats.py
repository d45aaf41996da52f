"""Per-tier counters of a storage node and the energy estimate built from them.

Every tier counts what it served so that a step can report where its bytes came from:

- `cache` (DRAM): hits/misses are rows looked up, bytes are row records copied in or out,
  evictions are rows dropped to make room, write-backs are dirty rows written to flash.
- `hot`: the pinned hot set inside the cache under `hot+lfu` (hits on rows that were hot).
- `flash`: bytes and pages actually read/written by pread/pwrite (whole pages, so a read of
  one row costs a page), the number of I/O batches and of requests (preads/pwrites).

The energy estimate is `bytes * pJ/byte` per tier plus `pages * pJ/page` for flash, with the
constants from `storage.energy` (order-of-magnitude literature figures, see the config).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ndp.config import EmulationConfig, EnergyConfig


@dataclass
class CacheCounters:
    """DRAM row cache."""

    hits: int = 0
    """Row accesses the cache served: lookups, update reads and prefetch staging."""
    misses: int = 0
    """Row accesses that went to flash (the same three kinds)."""
    staged_hits: int = 0
    """Of `hits`: rows a prefetch found already cached."""
    staged_misses: int = 0
    """Of `misses`: rows a prefetch read from flash to stage them."""
    hot_hits: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    write_backs: int = 0

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


@dataclass
class FlashCounters:
    """Flash file I/O, counted in whole pages as the device would."""

    bytes_read: int = 0
    bytes_written: int = 0
    pages_read: int = 0
    pages_written: int = 0
    read_batches: int = 0
    write_batches: int = 0
    read_requests: int = 0
    """pread calls (a batch is coalesced into runs; each run is one request)."""
    write_requests: int = 0
    blocks_from_held: int = 0
    """Blocks a write took from the bytes of a read or write held in the same operation
    (`FlashStore.holding_reads`) instead of reading them from the device again."""
    emulated_delay_s: float = 0.0
    read_seconds: float = 0.0
    """Wall seconds spent issuing reads (the batch's runs in flight), device emulation not
    included: `read_requests / read_seconds` is the rate the I/O path reached."""
    read_depth_sum: int = 0
    """Sum over read requests of the requests in flight beside it (its batch's runs, at most
    `io_threads`): `/ read_requests` is the mean queue depth the reads ran at."""
    init_bytes_written: int = 0
    """Bytes written to initialise new shard files (not counted in `bytes_written`)."""
    init_seconds: float = 0.0
    files_initialised: int = 0
    files_reused: int = 0
    """Shard files found complete (same shape, seed and table) and opened as they were."""


def energy_pj(cache: CacheCounters, flash: FlashCounters, energy: EnergyConfig) -> float:
    """Estimated energy of the traffic counted so far, in picojoules."""
    return (
        (cache.bytes_read + cache.bytes_written) * energy.dram_pj_per_byte
        + flash.bytes_read * energy.flash_read_pj_per_byte
        + flash.bytes_written * energy.flash_write_pj_per_byte
        + (flash.pages_read + flash.pages_written) * energy.flash_pj_per_page
    )


def summarize(cache: CacheCounters, flash: FlashCounters, energy: EnergyConfig) -> dict:
    """Plain-dict view of the counters (what `StorageNodeCore.stats` reports per tier)."""
    return {
        "cache": {**asdict(cache), "hit_rate": cache.hit_rate},
        "flash": asdict(flash),
        "energy_pj": energy_pj(cache, flash, energy),
    }


def add_counters(total: dict, part: dict) -> dict:
    """Sum two `summarize` dicts (nodes with several shards report one total)."""
    out: dict = dict(total)
    for key, value in part.items():
        if isinstance(value, dict):
            out[key] = add_counters(total.get(key, {}), value)
        else:
            out[key] = total.get(key, 0) + value
    return out


def transfer_delay_s(
    num_bytes: int, bandwidth_mbps: float | None, latency_us: float | None
) -> float:
    """Seconds a device with this bandwidth (MB/s, 1e6 bytes) and latency takes for `num_bytes`.

    None for either knob means "not emulated" (contributes 0).
    """
    delay = 0.0
    if latency_us is not None:
        delay += latency_us * 1e-6
    if bandwidth_mbps is not None:
        delay += num_bytes / (bandwidth_mbps * 1e6)
    return delay


def link_delay_s(emulation: EmulationConfig, num_bytes: int) -> float:
    """Delay the wire layer should add for `num_bytes` crossing the node's emulated link."""
    return transfer_delay_s(num_bytes, emulation.link_bandwidth_mbps, None)
