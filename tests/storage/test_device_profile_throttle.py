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

import pytest
import torch

from ndp.config import Config, config_from_dict
from ndp.device_profiles import load_profile
from ndp.plan import Bags
from ndp.planner import shards_for
from storage_node.client import StorageClient
from storage_node.node import StorageNodeCore
from storage_node.server import serve

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
    started = []

    def start(cfg: Config) -> StorageClient:
        core = StorageNodeCore(
            node_id="0",
            shards=shards_for(cfg, 0, ["t0", "t1"]),
            storage=cfg.storage,
            optimizer=cfg.optimizer.sparse,
            seed=cfg.train.seed,
            num_workers=1,
            flash_dir=tmp_path,
        )
        server = serve(
            core,
            host="127.0.0.1",
            token=TOKEN,
            max_message_bytes=cfg.storage.max_message_bytes,
            step_wait_timeout_s=30.0,
        )
        started.append((core, server))
        return StorageClient(server.address, token=TOKEN, timeout_s=60.0)

    yield start
    for core, server in started:
        server.stop(grace_s=None)
        core.close()


def bags(batch_size: int, seed: int) -> dict[str, Bags]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f: Bags(
            indices=torch.randint(0, ROWS, (batch_size,), generator=gen),
            offsets=torch.arange(batch_size + 1, dtype=torch.int64),
        )
        for f in FEATURES
    }


def rates_under_load(client_factory, batch_size: int) -> dict[str, float]:
    """Bytes/s of flash reads and of the link while CLIENTS threads look up for LOAD_S."""
    clients = [client_factory() for _ in range(CLIENTS)]
    before = clients[0].stats()
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
    after = clients[0].stats()
    for client in clients:
        client.close()
    return {
        "flash_read": (after["flash"]["bytes_read"] - before["flash"]["bytes_read"]) / elapsed,
        "link": (after["link"]["bytes_carried"] - before["link"]["bytes_carried"]) / elapsed,
    }


@pytest.mark.slow
def test_flash_bound_load_reads_at_the_profiles_flash_bandwidth(served):
    cfg = profile_config(cache_bytes=64 << 10)  # almost every row comes from flash
    address_client = served(cfg)
    limits = cfg.storage.emulation
    rates = rates_under_load(
        lambda: StorageClient(address_client.address, token=TOKEN, timeout_s=60.0), 256
    )
    flash_limit = limits.flash_read_bandwidth_mbps * 1e6
    assert 0.9 * flash_limit <= rates["flash_read"] <= 1.1 * flash_limit, rates
    assert rates["link"] <= 1.1 * limits.link_bandwidth_mbps * 1e6, rates


@pytest.mark.slow
def test_link_bound_load_moves_the_profiles_link_bandwidth(served):
    cfg = profile_config(cache_bytes=16 << 20)  # every row fits: no flash after warm-up
    first = served(cfg)
    first.lookup(0, 0, {f: Bags(torch.arange(ROWS), torch.arange(ROWS + 1)) for f in FEATURES})
    limits = cfg.storage.emulation
    rates = rates_under_load(
        lambda: StorageClient(first.address, token=TOKEN, timeout_s=60.0), 4096
    )
    link_limit = limits.link_bandwidth_mbps * 1e6
    assert 0.9 * link_limit <= rates["link"] <= 1.1 * link_limit, rates
    assert rates["flash_read"] <= 1.1 * limits.flash_read_bandwidth_mbps * 1e6, rates
