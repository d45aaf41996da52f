"""`ndp-train` in its default (ndp) mode, and the engine's clean shutdown."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from test_equivalence import tiny_config
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ndp.coordinator import NdpEngine
from ndp.data.batch import Batch
from ndp.data.loader import build_datasets
from ndp.errors import DataError, StorageNodeError
from ndp.train_loop import run_training

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
NDP_TRAIN = Path(sys.executable).with_name("ndp-train")


def test_ndp_train_runs_the_default_config_on_storage_nodes_and_writes_its_outputs(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    result = subprocess.run(
        [
            str(NDP_TRAIN),
            "--config",
            str(REPO / "configs" / "dlrm.yaml"),
            "--set",
            "train.steps=6",
            "--set",
            "train.batch_size=64",
            "--set",
            "train.eval_batches=2",
            "--set",
            "logging.interval_steps=1",
            "--set",
            "logging.progress_bar=false",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation AUC" in result.stdout

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["type"] == "train"]
    assert [line["step"] for line in train_lines] == list(range(6))
    breakdown = ("data_s", "lookup_wait_s", "dense_compute_s", "gradient_push_s", "push_wait_s")
    assert all(line[phase] >= 0 for line in train_lines for phase in breakdown)
    assert all(line["link_bytes_in"] > 0 and line["link_bytes_out"] > 0 for line in train_lines)
    assert all(0.0 <= line["node0_cache_hit_rate"] <= 1.0 for line in train_lines)
    assert train_lines[-1]["node1_cache_hit_rate"] > 0.0  # rows come back: the cache works
    eval_lines = [line for line in lines if line["type"] == "eval"]
    assert eval_lines and 0.0 <= eval_lines[-1]["auc"] <= 1.0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "ndp" and summary["steps"] == 6
    plan = json.loads((out / "plan.json").read_text())
    assert plan["num_nodes"] == 2
    # link bytes are whole messages measured on the wire: in, one pooled vector per sample
    # and table piece plus protobuf framing; out, the lookups' bags plus, from the second
    # step on, the previous step's gradients of the same size riding on them
    config = yaml.safe_load((out / "config.yaml").read_text())
    dims = {t["name"]: t["embedding_dim"] for t in config["model"]["tables"]}
    pooled_bytes = sum(4 * dims[piece["table_name"]] for piece in plan["placements"])
    for line in train_lines:
        samples = (line["link_bytes_in"] + line["link_bytes_out"]) / line["link_bytes_per_sample"]
        assert pooled_bytes < line["link_bytes_in"] / samples < 1.1 * pooled_bytes
        if line["step"] > 0:
            assert line["link_bytes_out"] / samples > pooled_bytes
    assert "train:" in (out / "config.yaml").read_text()


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path):
    result = subprocess.run(
        [
            str(NDP_TRAIN),
            "--config",
            str(REPO / "configs" / "dlrm.yaml"),
            "--dry-run",
            "--output-dir",
            str(tmp_path / "never"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "t_cat_25" in result.stdout and "imbalance" in result.stdout
    assert not (tmp_path / "never").exists()


def test_dry_run_of_a_plan_that_cannot_fit_says_how_much_is_missing():
    result = subprocess.run(
        [
            str(NDP_TRAIN),
            "--config",
            str(REPO / "configs" / "dlrm.yaml"),
            "--dry-run",
            "--set",
            "cluster.node_capacity_bytes=1000000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "missing" in result.stderr and "Traceback" not in result.stderr


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, int(port))) == 0


def _ndp_actor_names(ray) -> list[str]:
    return [n for n in ray.util.list_named_actors() if n.startswith("ndp-")]


# the names the Ray dashboard lists the actors of a 2-node, 2-worker job under
ACTOR_NAMES = ["ndp-gpu-worker-0", "ndp-gpu-worker-1", "ndp-storage-node-0", "ndp-storage-node-1"]


def test_close_after_a_run_leaves_no_actors_or_listening_ports(ray_session, tmp_path):
    cfg = tiny_config("sgd")
    cfg = replace(cfg, train=replace(cfg.train, steps=3))
    train_data, val_data = build_datasets(cfg)
    engine = NdpEngine(cfg)
    addresses = [a["tcp"] for a in engine.node_addresses]
    assert sorted(_ndp_actor_names(ray_session)) == ACTOR_NAMES
    try:
        summary = run_training(cfg, engine, tmp_path, train_data=train_data, val_data=val_data)
    finally:
        engine.close()
    assert summary["steps"] == 3

    assert _ndp_actor_names(ray_session) == []
    assert not any(_listening(a) for a in addresses)


def test_gpu_workers_run_with_the_configured_environment_on_top_of_the_default(ray_session):
    import os

    cfg = tiny_config("sgd")
    given = {"NDP_TEST_PROBE": "worker-env"}
    cfg = replace(cfg, cluster=replace(cfg.cluster, gpu_worker_env=given))
    expected = {"OMP_WAIT_POLICY": "PASSIVE", "NDP_TEST_PROBE": "worker-env"}
    with NdpEngine(cfg) as engine:
        for rank in range(engine.num_workers):
            worker = ray_session.get_actor(f"ndp-gpu-worker-{rank}")
            seen = ray_session.get(
                worker.__ray_call__.remote(lambda _self: {k: os.environ.get(k) for k in expected})
            )
            assert seen == expected


def test_a_configured_worker_variable_overrides_the_default_one():
    from gpu_worker.actor import worker_env

    cfg = tiny_config("sgd")
    assert worker_env(cfg) == {"OMP_WAIT_POLICY": "PASSIVE"}
    cfg = replace(cfg, cluster=replace(cfg.cluster, gpu_worker_env={"OMP_WAIT_POLICY": "ACTIVE"}))
    assert worker_env(cfg) == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_close_leaves_no_actors_or_listening_ports_even_after_a_worker_error(ray_session):
    cfg = tiny_config("sgd")
    batch = next(iter(build_datasets(cfg)[0].batches(cfg.train.batch_size)))
    engine = NdpEngine(cfg)
    addresses = [a["tcp"] for a in engine.node_addresses]
    assert all(_listening(a) for a in addresses)
    assert sorted(_ndp_actor_names(ray_session)) == ACTOR_NAMES

    engine.train_step(0, batch)
    engine.flush()  # step 0 applied on every node: its repeat is refused whatever comes first
    with pytest.raises(StorageNodeError):
        engine.train_step(0, batch)  # step 0 again: the nodes refuse it inside the workers
    engine.close()

    assert _ndp_actor_names(ray_session) == []
    assert not any(_listening(a) for a in addresses)


def _with_bad_index_in_second_half(batch: Batch) -> Batch:
    """`batch` with one row index of a sample in its second half (worker 1's share of two)
    far outside its table."""
    kjt = batch.sparse
    size = batch.labels.numel()
    lengths, offsets = kjt.lengths(), kjt.offsets()
    values = kjt.values().clone()
    bag = next(
        f * size + b
        for f in range(len(kjt.keys()))
        for b in range(size // 2, size)
        if lengths[f * size + b] > 0
    )
    values[offsets[bag]] = 10**9
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=values, lengths=lengths)
    return Batch(dense=batch.dense, sparse=sparse, labels=batch.labels)


def test_a_bad_index_in_one_workers_share_is_refused_before_any_worker_starts(ray_session):
    """The coordinator checks the whole batch before splitting it: no worker trains its
    share and waits in the all-reduce for the one that refuses, so the same step can be
    taken again with good data."""
    cfg = tiny_config("sgd")
    batches = build_datasets(cfg)[0].batches(cfg.train.batch_size)
    first, second = next(iter(batches)), next(iter(batches))
    with NdpEngine(cfg) as engine:
        engine.train_step(0, first)
        with pytest.raises(DataError, match=r"feature '\w+': index 1000000000 outside"):
            engine.train_step(1, _with_bad_index_in_second_half(second))
        started = time.monotonic()
        engine.train_step(1, second)
        engine.flush()
        assert time.monotonic() - started < 60  # nobody was left waiting for a peer


def test_close_is_prompt_when_a_peer_is_left_blocked_in_the_all_reduce(ray_session):
    """Worker 1 refuses its share (a bad index) while worker 0 trains its share and waits in
    the dense all-reduce for a peer that never comes: close kills it instead of flushing it
    (which would wait cluster.step_timeout_s, 10 minutes by default). The shares go to the
    workers directly: the coordinator's own check refuses such a batch before any worker
    starts, so this stands for any failure of one worker inside a step."""
    cfg = tiny_config("sgd")
    batch = next(iter(build_datasets(cfg)[0].batches(cfg.train.batch_size)))
    engine = NdpEngine(cfg)
    addresses = [a["tcp"] for a in engine.node_addresses]
    engine.train_step(0, batch)
    shares = _with_bad_index_in_second_half(batch).split(2)
    refs = [
        w.train_step.remote(1, share, []) for w, share in zip(engine._workers, shares, strict=True)
    ]
    with pytest.raises(DataError, match="outside"):
        engine._wait(refs)

    started = time.monotonic()
    engine.close()
    assert time.monotonic() - started < 60
    assert cfg.cluster.step_timeout_s >= 600  # what a flush of the blocked worker would wait

    assert _ndp_actor_names(ray_session) == []
    assert not any(_listening(a) for a in addresses)
