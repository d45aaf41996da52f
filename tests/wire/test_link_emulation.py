"""storage.emulation.link_bandwidth_mbps: every data RPC's bytes cross one emulated link."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ndp.config import Config
from ndp.planner import shards_for
from storage_node.actor import StorageNodeActor
from storage_node.client import StorageClient
from storage_node.link import EmulatedLink
from wire.tiny_node import TOKEN, random_bags, random_grads, tiny_config


def test_link_is_free_when_not_emulated():
    link = EmulatedLink(None)
    link.transfer(10**9)
    assert (link.bytes_carried, link.delay_s) == (0, 0.0)


def test_concurrent_transfers_queue_behind_each_other_on_one_link():
    link = EmulatedLink(bandwidth_mbps=10.0)  # 1 MB takes 0.1 s
    start = time.monotonic()
    threads = [threading.Thread(target=link.transfer, args=(1_000_000,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert link.bytes_carried == 2_000_000
    # Sharing one link, the two megabytes need 0.2 s together, not 0.1 s side by side
    # (a lower bound: sleeping never ends early).
    assert time.monotonic() - start >= 0.2


@contextmanager
def started_node(cfg: Config) -> Iterator[tuple[StorageNodeActor, StorageClient]]:
    """A node as its Ray actor runs it, in this process (the actor is a plain class): its
    gRPC data plane, and its control plane (`stats`) called directly."""
    node = StorageNodeActor("0", shards_for(cfg, 0, ["t0", "t1"]), cfg, TOKEN, num_workers=1)
    try:
        address = node.start()
        with StorageClient(address, token=TOKEN, timeout_s=30) as client:
            yield node, client
    finally:
        node.shutdown()


def test_node_counts_the_bytes_of_lookups_and_pushes_on_its_link():
    with started_node(tiny_config(emulation={"link_bandwidth_mbps": 1000.0})) as (node, client):
        client.lookup(0, 0, random_bags(8, seed=1))
        client.push_gradients(0, 0, random_grads(8, seed=1))
        link = node.stats()["link"]
    pooled_and_grad_bytes = 2 * 3 * 8 * 16 * 4  # lookup reply + push request, fp32
    assert link["bandwidth_mbps"] == 1000.0
    assert link["bytes_carried"] > pooled_and_grad_bytes
    assert link["emulated_delay_s"] > 0


def test_without_emulation_the_node_reports_an_idle_link():
    with started_node(tiny_config()) as (node, client):
        client.lookup(0, 0, random_bags(8, seed=1))
        assert node.stats()["link"]["bytes_carried"] == 0
