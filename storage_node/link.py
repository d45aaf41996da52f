"""Emulated link between a storage node and its clients (`storage.emulation.link_bandwidth_mbps`).

Why a shared clock and not a sleep per call: a device's link is one pipe. Transfers that
overlap in time queue behind each other, so N concurrent clients together get the emulated
bandwidth, not N times it. Each transfer reserves the interval after the link's current
`busy_until` and the calling RPC thread sleeps until its interval ends.
"""

from __future__ import annotations

import threading
import time

from storage_node.stats import transfer_delay_s


class EmulatedLink:
    """Serialises the bytes of every RPC through one link of `bandwidth_mbps` (None: off)."""

    def __init__(self, bandwidth_mbps: float | None) -> None:
        self.bandwidth_mbps = bandwidth_mbps
        self._lock = threading.Lock()
        self._busy_until = 0.0
        self.bytes_carried = 0
        self.delay_s = 0.0

    def transfer(self, num_bytes: int) -> None:
        """Block the caller until `num_bytes` have crossed the link (no-op when off)."""
        if self.bandwidth_mbps is None:
            return
        duration = transfer_delay_s(num_bytes, self.bandwidth_mbps, None)
        with self._lock:
            now = time.monotonic()
            start = max(now, self._busy_until)
            self._busy_until = start + duration
            wait = self._busy_until - now
            self.bytes_carried += num_bytes
            self.delay_s += wait
        time.sleep(wait)

    def stats(self) -> dict:
        """{"bandwidth_mbps", "bytes_carried", "emulated_delay_s"}: what the node's `stats()`
        reports under "link" (`storage_node.actor.StorageNodeActor.stats`)."""
        with self._lock:
            return {
                "bandwidth_mbps": self.bandwidth_mbps,
                "bytes_carried": self.bytes_carried,
                "emulated_delay_s": self.delay_s,
            }
