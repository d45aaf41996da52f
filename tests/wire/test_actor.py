"""The storage node as a Ray actor on the session's local Ray instance."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace

import pytest
import torch

from ndp.planner import shards_for
from storage_node.actor import launch_storage_node, node_bind_host
from storage_node.client import StorageClient, pick_address
from wire.tiny_node import TOKEN, random_bags, tiny_config

pytestmark = pytest.mark.ray


def port_is_listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex((host, int(port))) == 0


def test_actor_serves_on_loopback_and_shutdown_leaves_no_listener(ray_session, make_core):
    ray = ray_session
    cfg = tiny_config()
    shards = shards_for(cfg, 0, ["t0", "t1"])
    actor = launch_storage_node(cfg, 0, shards, TOKEN, num_workers=1, name="ndp-storage-node-test0")
    try:
        address = ray.get(actor.start.remote(), timeout=120)
        assert address.startswith("127.0.0.1:")
        addresses = ray.get(actor.addresses.remote())
        assert addresses["tcp"] == address
        assert pick_address(addresses) == addresses["unix"], "same machine: prefer the socket"
        assert ray.get_actor("ndp-storage-node-test0") is not None

        bags = random_bags(4, seed=0)
        expected = make_core(cfg).lookup(0, 0, bags)
        for dial in (addresses["unix"], address):
            with StorageClient(dial, token=TOKEN, timeout_s=30) as client:
                pooled = client.lookup(0, 0, bags, train=False)
            for feature in bags:
                assert torch.equal(pooled[feature], expected[feature])
        assert isinstance(ray.get(actor.stats.remote()), dict)
        assert port_is_listening(address)
    finally:
        ray.get(actor.shutdown.remote(), timeout=60)
        ray.kill(actor)
    assert not port_is_listening(address)
    assert not os.path.exists(addresses["unix"].removeprefix("unix:"))


def test_actor_holds_the_configured_ray_resources_while_it_lives(ray_session):
    ray = ray_session
    base = tiny_config()
    cfg = replace(base, cluster=replace(base.cluster, storage_node_resources={"storage_node": 3}))

    def held() -> float:
        return ray.cluster_resources()["storage_node"] - ray.available_resources().get(
            "storage_node", 0.0
        )

    shards = shards_for(cfg, 1, ["t0"])
    actor = launch_storage_node(cfg, 1, shards, TOKEN, num_workers=1, name="ndp-storage-node-test1")
    try:
        ray.get(actor.start.remote(), timeout=120)
        deadline = time.monotonic() + 30  # the resource view is refreshed asynchronously
        while held() != 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert held() == 3
    finally:
        ray.get(actor.shutdown.remote(), timeout=60)
        ray.kill(actor)


def test_bind_host_outside_ray_or_on_a_loopback_ray_node_is_loopback(ray_session):
    assert node_bind_host(None) == "127.0.0.1"
    assert node_bind_host("10.1.2.3") == "10.1.2.3"


def test_bind_host_on_a_cluster_node_is_that_node_s_address_not_every_interface(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.1.2.3")
    assert node_bind_host(None) == "10.1.2.3"


def test_pick_address_falls_back_to_tcp_on_another_machine():
    addresses = {"tcp": "10.0.0.5:7000", "unix": "unix:/tmp/x.sock", "hostname": "elsewhere"}
    assert pick_address(addresses) == "10.0.0.5:7000"
    assert pick_address("10.0.0.5:7000") == "10.0.0.5:7000"
