"""Prefetch pinning, checkpoints, counters and the Adam step counter of `StorageNodeCore`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ndp.config import EnergyConfig
from ndp.plan import Bags
from storage_node.errors import ShardFileError

from .conftest import shard

ALL_ROWS = torch.arange(40)


def one_hot(rows: list[int]) -> Bags:
    return Bags(torch.tensor(rows), torch.arange(len(rows) + 1))


def train_step(node, step: int, rows: list[int]) -> None:
    node.lookup(step, 0, {"f_t0": one_hot(rows)})
    grad = torch.full((len(rows), 8), 0.1 * (step + 1))
    node.push_gradients(step, 0, {"f_t0": grad})


def test_prefetched_rows_stay_pinned_under_pressure_until_their_step_applies(make_node):
    node = make_node(cache_rows=4, cache_policy="lru")
    node.prefetch(1, {"f_t0": torch.tensor([30, 31])})
    cache = node._pieces["t0"].cache
    train_step(node, 0, list(range(10)))  # 10 rows through a 4-row cache
    assert {30, 31} <= set(cache.cached_rows().tolist())
    assert sorted(cache.pinned_rows().tolist()) == [30, 31]
    misses = node.stats()["cache"]["misses"]
    train_step(node, 1, [30, 31])
    assert node.stats()["cache"]["misses"] == misses  # served from the cache
    assert cache.pinned_rows().size == 0  # released when step 1 applied


def test_prefetch_of_an_applied_step_pins_nothing(make_node):
    node = make_node()
    train_step(node, 0, [1])
    node.prefetch(0, {"f_t0": torch.tensor([5])})
    assert node.stats()["cache"]["pinned_rows"] == 0


def test_checkpoint_restore_round_trip(make_node, tmp_path):
    node = make_node(optimizer="adam", cache_rows=3)
    for step in range(2):
        train_step(node, step, [1, 2, 3, 4, step + 5])
    saved = node.read_rows("t0", ALL_ROWS)
    manifest = node.checkpoint(tmp_path / "ckpt")
    assert manifest["applied_step"] == 1 and manifest["optimizer_step"] == 2
    on_disk = json.loads((tmp_path / "ckpt" / "n0.manifest.json").read_text())
    assert on_disk == manifest and len(on_disk["shards"][0]["sha256"]) == 64
    for step in range(2, 4):
        train_step(node, step, [1, 2, 6])
    node.restore(tmp_path / "ckpt")
    assert node.applied_step == 1 and node.optimizer_step == 2
    for x, y in zip(node.read_rows("t0", ALL_ROWS), saved, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # a fresh node on another flash dir restores the same state and continues identically
    fresh = make_node(optimizer="adam", cache_rows=3, flash_dir=tmp_path / "other")
    fresh.restore(tmp_path / "ckpt")
    train_step(node, 2, [1, 7])
    train_step(fresh, 2, [1, 7])
    for x, y in zip(node.read_rows("t0", ALL_ROWS), fresh.read_rows("t0", ALL_ROWS), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_restore_refuses_a_corrupt_checkpoint_and_keeps_its_state(make_node, tmp_path):
    node = make_node()
    train_step(node, 0, [1, 2])
    manifest = node.checkpoint(tmp_path / "ckpt")
    train_step(node, 1, [1])
    current = node.read_rows("t0", ALL_ROWS)
    with open(tmp_path / "ckpt" / manifest["shards"][0]["file"], "r+b") as f:
        f.seek(600)
        f.write(b"garbage")
    with pytest.raises(ShardFileError, match="corrupt"):
        node.restore(tmp_path / "ckpt")
    assert node.applied_step == 1
    for x, y in zip(node.read_rows("t0", ALL_ROWS), current, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _two_table_step(node, step: int) -> None:
    for feature in ("f_t0", "f_t1"):
        node.lookup(step, 0, {feature: one_hot([1, 2, step + 3])})
    grad = torch.full((3, 8), 0.1 * (step + 1))
    node.push_gradients(step, 0, {"f_t0": grad, "f_t1": grad})


def _all_rows(node) -> list[torch.Tensor]:
    return [part for table in ("t0", "t1") for part in node.read_rows(table, ALL_ROWS)]


def test_a_restore_that_fails_staging_its_second_file_changes_no_piece(
    make_node, tmp_path, monkeypatch
):
    """Every file is staged before any live file is replaced: an I/O error half way (here: a
    full disk while copying the second table) leaves the node exactly as it was."""
    import storage_node.shard_files as node_module

    node = make_node([shard("t0"), shard("t1")])
    _two_table_step(node, 0)
    node.checkpoint(tmp_path / "ckpt")
    _two_table_step(node, 1)
    current = _all_rows(node)
    copies = []
    real_copy = node_module.copy_with_sha256

    def copy_then_fail(src, dst):
        copies.append(dst)
        if len(copies) == 2:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(node_module, "copy_with_sha256", copy_then_fail)
    with pytest.raises(OSError, match="No space left"):
        node.restore(tmp_path / "ckpt")
    assert node.applied_step == 1
    for x, y in zip(_all_rows(node), current, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert not [p.name for p in (tmp_path / "flash").iterdir() if not p.name.endswith(".shard")]
    _two_table_step(node, 2)  # and it trains on
    monkeypatch.setattr(node_module, "copy_with_sha256", real_copy)
    node.restore(tmp_path / "ckpt")
    assert node.applied_step == 0


def test_a_consuming_restore_moves_the_verified_files_and_keeps_the_checkpoint_readable(
    make_node, tmp_path
):
    """The actor's private restore directory is consumed (renamed into place, no copy); a
    plain restore copies, so the checkpoint directory stays whole."""
    import shutil

    node = make_node([shard("t0"), shard("t1")])
    _two_table_step(node, 0)
    manifest = node.checkpoint(tmp_path / "ckpt")
    saved = _all_rows(node)
    _two_table_step(node, 1)
    private = tmp_path / "flash" / "restore-dir"
    shutil.copytree(tmp_path / "ckpt", private)
    node.restore_verified(private, node.verify_restore(private), consume=True)
    for x, y in zip(_all_rows(node), saved, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert sorted(p.name for p in private.iterdir()) == ["n0.manifest.json"]
    _two_table_step(node, 1)
    node.restore(tmp_path / "ckpt")
    assert all((tmp_path / "ckpt" / entry["file"]).is_file() for entry in manifest["shards"])


def test_restore_refuses_a_checkpoint_of_another_optimizer(make_node, tmp_path):
    make_node(optimizer="sgd", node_id="a", flash_dir=tmp_path / "a").checkpoint(tmp_path / "c")
    node = make_node(optimizer="adagrad", node_id="a", flash_dir=tmp_path / "b")
    with pytest.raises(ShardFileError, match="optimizer.sparse.name"):
        node.restore(tmp_path / "c")


def test_shard_contents_survive_close_and_reopen_of_the_node(make_node, tmp_path):
    node = make_node(flash_dir=tmp_path / "f")
    train_step(node, 0, [1, 2, 3])
    trained = node.read_rows("t0", ALL_ROWS)
    node.close()  # flushes dirty cached rows
    reopened = make_node(flash_dir=tmp_path / "f")
    for x, y in zip(reopened.read_rows("t0", ALL_ROWS), trained, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_counters_move_as_rows_hit_miss_and_evict(make_node):
    node = make_node(cache_rows=2, cache_policy="lru")
    node.lookup(0, 0, {"f_t0": one_hot([1, 2])}, train=False)
    cache = node.stats()["cache"]
    assert (cache["hits"], cache["misses"], cache["evictions"]) == (0, 2, 0)
    node.lookup(0, 0, {"f_t0": one_hot([1, 2, 2])}, train=False)
    cache = node.stats()["cache"]
    assert (cache["hits"], cache["misses"]) == (2, 2) and cache["hit_rate"] == 0.5
    node.lookup(0, 0, {"f_t0": one_hot([3])}, train=False)
    stats = node.stats()
    assert stats["cache"]["evictions"] == 1 and stats["cache"]["write_backs"] == 0
    assert stats["flash"]["bytes_read"] == 2 * 512 and stats["flash"]["pages_read"] == 2
    energy = EnergyConfig()
    expected = (
        (stats["cache"]["bytes_read"] + stats["cache"]["bytes_written"]) * energy.dram_pj_per_byte
        + stats["flash"]["bytes_read"] * energy.flash_read_pj_per_byte
        + stats["flash"]["pages_read"] * energy.flash_pj_per_page
    )
    assert stats["energy_pj"] == pytest.approx(expected)
    assert stats["applied_step"] == -1


def test_adam_uses_the_global_step_counter_for_bias_correction(make_node):
    """Row 2 is first touched at step 1, so its update is bias-corrected with t = 2."""
    node = make_node(optimizer="adam")
    train_step(node, 0, [1])
    w0, _ = node.read_rows("t0", torch.tensor([2]))
    train_step(node, 1, [2])
    w1, state = node.read_rows("t0", torch.tensor([2]))
    g = np.float64(0.2)
    b1, b2, lr, eps, t = 0.9, 0.999, 0.05, 1e-8, 2
    m, v = (1 - b1) * g, (1 - b2) * g * g
    step = lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    torch.testing.assert_close(
        w1, w0 - torch.tensor(step, dtype=torch.float32), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(
        state, torch.tensor([[m] * 8 + [v] * 8], dtype=torch.float32), rtol=1e-6, atol=1e-9
    )


def test_two_tables_on_one_node_split_the_cache_and_update_independently(make_node):
    node = make_node([shard("t0"), shard("t1", num_rows=20, features=("f_t1", "g_t1"))])
    before_t0 = node.read_rows("t0", ALL_ROWS)
    node.lookup(0, 0, {"f_t1": one_hot([3]), "g_t1": one_hot([3])})
    node.push_gradients(0, 0, {"f_t1": torch.ones(1, 8), "g_t1": torch.ones(1, 8)})
    _, state = node.read_rows("t1", torch.tensor([3]))
    torch.testing.assert_close(state, torch.tensor([[4.0]]))  # rowwise: mean((1+1)^2)
    for x, y in zip(node.read_rows("t0", ALL_ROWS), before_t0, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_tables_of_one_dim_share_one_cache_and_a_tiny_hot_table_stays_cached(make_node):
    """One arena, one eviction policy over every piece: the 3 rows of a tiny table read every
    step keep their slots while a large table streams 60 rows through the same 10-slot cache
    (a fixed split by bytes gave the tiny table 1 slot of 40 and it missed on 2 of 3)."""
    node = make_node(
        [shard("t0", num_rows=400), shard("tiny", num_rows=3)], cache_rows=5, cache_policy="lru"
    )  # budget: 10 slots, shared
    tiny, large = node._pieces["tiny"], node._pieces["t0"]
    assert tiny.cache is large.cache and tiny.cache.capacity_rows == 10
    for step in range(20):
        rows = [3 * step % 60, (3 * step + 1) % 60, (3 * step + 2) % 60]
        node.lookup(step, 0, {"f_tiny": one_hot([0, 1, 2]), "f_t0": one_hot(rows)})
        node.push_gradients(step, 0, {"f_tiny": torch.ones(3, 8), "f_t0": torch.ones(3, 8)})
    assert node.stats()["tables"]["tiny"]["cache"]["cached_rows"] == 3
    misses = node.stats()["cache"]["misses"]
    node.lookup(20, 0, {"f_tiny": one_hot([0, 1, 2])})
    assert node.stats()["cache"]["misses"] == misses  # every tiny row still a hit


def _run_with_reference(make_node, rows_of_step):
    """Train the same steps on a node without prefetch: the exact answer for comparison."""
    reference = make_node(cache_rows=2, cache_policy="lru", node_id="reference")
    pooled = []
    for step, rows in enumerate(rows_of_step):
        pooled.append(reference.lookup(step, 0, {"f_t0": one_hot(rows)})["f_t0"])
        reference.push_gradients(step, 0, {"f_t0": torch.full((len(rows), 8), 0.1 * (step + 1))})
    return pooled


def test_a_prefetch_reads_flash_without_the_node_lock_and_rereads_rows_written_meanwhile(
    make_node, monkeypatch
):
    """The staging read of step 1's rows runs while step 0 trains (its update writes some of
    those rows); the rows written meanwhile are not staged from the old bytes."""
    import threading

    from storage_node.flash import FlashStore

    read_done, resume = threading.Event(), threading.Event()
    flagged: list[np.ndarray] = []
    original_read, original_finish = FlashStore._read_detached, FlashStore._finish_detached

    def slow_read(self, rows):
        records = original_read(self, rows)  # the bytes as they were before step 0's update
        read_done.set()
        resume.wait(30)
        return records

    def spy_finish(self, mark, rows):
        flagged.append(original_finish(self, mark, rows))
        return flagged[-1]

    monkeypatch.setattr(FlashStore, "_read_detached", slow_read)
    monkeypatch.setattr(FlashStore, "_finish_detached", spy_finish)
    step0 = [30, 31, *range(10)]
    step1 = [30, 31, 32]
    node = make_node(cache_rows=2, cache_policy="lru")
    prefetch = threading.Thread(target=node.prefetch, args=(1, {"f_t0": torch.tensor(step1)}))
    prefetch.start()
    assert read_done.wait(30)
    assert node._lock.acquire(timeout=10), "the prefetch holds the node lock while reading"
    node._lock.release()
    pooled0 = node.lookup(0, 0, {"f_t0": one_hot(step0)})["f_t0"]
    node.push_gradients(0, 0, {"f_t0": torch.full((len(step0), 8), 0.1)})
    resume.set()
    prefetch.join(30)
    assert not prefetch.is_alive()
    assert flagged and flagged[0].any(), "step 0's update wrote none of the staged rows"
    pinned = node._pieces["t0"].cache.pinned_rows()
    assert set(pinned.tolist()) <= set(step1) and pinned.size > 0
    pooled1 = node.lookup(1, 0, {"f_t0": one_hot(step1)})["f_t0"]
    expected0, expected1 = _run_with_reference(make_node, [step0, step1])
    torch.testing.assert_close(pooled0, expected0, rtol=0, atol=0)
    torch.testing.assert_close(pooled1, expected1, rtol=0, atol=0)
