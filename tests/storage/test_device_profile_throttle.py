"""A device profile's link and flash limits hold under load: the bytes/s a served node moves
stay within 10% of them (never faster, and the bound one not much slower).

Small size: the profile's bandwidths scaled by `SCALE` (a 2-core test machine cannot reach
GB/s through loopback gRPC), so the emulation and not the machine is what limits a run;
the per-batch latencies are left out, the figures tested are the bandwidths.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from ndp.config import Config, config_from_dict
from ndp.device_profiles import load_profile
from ndp.plan import Bags
from ndp.planner import shards_for
from storage_node.actor import StorageNodeActor
from storage_node.client import StorageClient

PROFILE = "pcie_gen3_x4_csd"
SCALE = 1 / 400
TOKEN = "throttle-test-token"
ROWS, DIM, FEATURES = 20_000, 16, ("f0", "f1")
CLIENTS = 4
LOAD_S = 2.0


def profile_config(cache_bytes: int) -> Config:
    """Two tables on one node, the profile's bandwidths scaled down, no latencies."""
    emulation = load_profile(PROFILE)["storage"]["emulation"]
    scaled = {k: v * SCALE for k, v in emulation.items() if k.endswith("bandwidth_mbps")}
    return config_from_dict(
        {
            "model": {
                "bottom_mlp": [8, DIM],
                "top_mlp": [8, 1],
                "tables": [
                    {"name": f"t{i}", "num_rows": ROWS, "embedding_dim": DIM, "features": [f]}
                    for i, f in enumerate(FEATURES)
                ],
            },
            "data": {"source": "synthetic"},
            "optimizer": {"sparse": {"name": "sgd", "lr": 0.1}},
            "storage": {
                "device_profile": PROFILE,
                "cache_bytes": cache_bytes,
                "io_threads": 2,
                "emulation": {
                    **scaled,
                    "flash_read_latency_us": None,
                    "flash_write_latency_us": None,
                },
            },
        }
    )


@pytest.fixture()
def served(tmp_path) -> Iterator:
    """Starts a storage node as its Ray actor runs it, in this process (the actor is a plain
    class): lookups over its gRPC data plane, counters from its control plane (`stats`)."""
    started: list[StorageNodeActor] = []

    def start(cfg: Config) -> StorageNodeActor:
        cfg = replace(cfg, storage=replace(cfg.storage, flash_dir=str(tmp_path)))
        node = StorageNodeActor("0", shards_for(cfg, 0, ["t0", "t1"]), cfg, TOKEN, num_workers=1)
        started.append(node)
        node.start()
        return node

    yield start
    for node in started:
        node.shutdown()


def client_of(node: StorageNodeActor) -> StorageClient:
    return StorageClient(node.addresses()["tcp"], token=TOKEN, timeout_s=60.0)


def bags(batch_size: int, seed: int) -> dict[str, Bags]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f: Bags(
            indices=torch.randint(0, ROWS, (batch_size,), generator=gen),
            offsets=torch.arange(batch_size + 1, dtype=torch.int64),
        )
        for f in FEATURES
    }


def rates_under_load(node: StorageNodeActor, batch_size: int) -> dict[str, float]:
    """Bytes/s of flash reads and of the link while CLIENTS threads look up for LOAD_S."""
    clients = [client_of(node) for _ in range(CLIENTS)]
    before = node.stats()
    start = time.monotonic()

    def load(index: int) -> None:
        seed = index * 100_000
        while time.monotonic() - start < LOAD_S:
            clients[index].lookup(0, 0, bags(batch_size, seed), train=False)
            seed += 1

    threads = [threading.Thread(target=load, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    after = node.stats()
    for client in clients:
        client.close()
    return {
        "flash_read": (after["flash"]["bytes_read"] - before["flash"]["bytes_read"]) / elapsed,
        "link": (after["link"]["bytes_carried"] - before["link"]["bytes_carried"]) / elapsed,
    }


@pytest.mark.slow
def test_flash_bound_load_reads_at_the_profiles_flash_bandwidth(served):
    cfg = profile_config(cache_bytes=64 << 10)  # almost every row comes from flash
    node = served(cfg)
    limits = cfg.storage.emulation
    rates = rates_under_load(node, 256)
    flash_limit = limits.flash_read_bandwidth_mbps * 1e6
    assert 0.9 * flash_limit <= rates["flash_read"] <= 1.1 * flash_limit, rates
    assert rates["link"] <= 1.1 * limits.link_bandwidth_mbps * 1e6, rates


@pytest.mark.slow
def test_link_bound_load_moves_the_profiles_link_bandwidth(served):
    cfg = profile_config(cache_bytes=16 << 20)  # every row fits: no flash after warm-up
    node = served(cfg)
    with client_of(node) as first:
        first.lookup(0, 0, {f: Bags(torch.arange(ROWS), torch.arange(ROWS + 1)) for f in FEATURES})
    limits = cfg.storage.emulation
    rates = rates_under_load(node, 4096)
    link_limit = limits.link_bandwidth_mbps * 1e6
    assert 0.9 * link_limit <= rates["link"] <= 1.1 * link_limit, rates
    assert rates["flash_read"] <= 1.1 * limits.flash_read_bandwidth_mbps * 1e6, rates
