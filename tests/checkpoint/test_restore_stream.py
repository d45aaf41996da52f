"""Restores streamed to a storage node: laid out on the node, verified before anything changes.

The node is the plain `StorageNodeActor` class (no Ray: its methods are called directly, as
Ray would call them), so these tests run in one process.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from jobs import tiny_job

from ndp.checkpoint import (
    Checkpoint,
    EngineState,
    TableChunk,
    node_restore_header,
    node_restore_rows,
    write_checkpoint,
)
from ndp.errors import StorageNodeError
from ndp.model.spec import optimizer_state_width
from ndp.planner import plan_shards
from storage_node.actor import StorageNodeActor
from storage_node.restore import RowsDigest

SMALL_CHUNK_BYTES = 40 * 4 * 16  # 40 adagrad rows (dim 8) per message: several per piece


def _checkpoint(tmp_path, sparse_optimizer: str = "adagrad") -> Checkpoint:
    """A checkpoint after step 5 whose records of row r are r + 0.25 (`big`), r + 0.5 (`small`)."""
    width = 8 + optimizer_state_width(sparse_optimizer, 8)

    def chunks():
        for lo, hi in [(0, 128), (128, 300)]:  # chunk borders unlike any node's pieces
            rows = np.arange(lo, hi, dtype=np.float32)[:, None]
            yield TableChunk("big", lo, hi, np.repeat(rows + 0.25, width, axis=1))
        yield TableChunk("small", 0, 40, np.repeat(np.arange(40.0)[:, None] + 0.5, width, 1))

    state = EngineState(
        dense_model={"w": torch.zeros(2)},
        dense_optimizer={"state": {}},
        tables=chunks(),
        sparse_optimizer_step=6,
    )
    cfg = tiny_job(sparse_optimizer=sparse_optimizer)
    return Checkpoint(write_checkpoint(tmp_path / "ckpt", state, next_step=6, cfg=cfg))


@pytest.fixture()
def checkpoint(tmp_path) -> Checkpoint:
    return _checkpoint(tmp_path)


def _node(
    tmp_path, *, num_nodes: int = 3, node: int = 0, sparse_optimizer: str = "adagrad"
) -> StorageNodeActor:
    """Node `node` of a `num_nodes`-node plan (the checkpoint was taken on two), started."""
    cfg = tiny_job(num_nodes=num_nodes, sparse_optimizer=sparse_optimizer)
    cfg = replace(cfg, storage=replace(cfg.storage, flash_dir=str(tmp_path / f"flash{node}")))
    shards = plan_shards(cfg).shards_for_node(node, cfg.model.effective_tables())
    actor = StorageNodeActor(node, shards, cfg, token="t", num_workers=1)
    actor.start()
    return actor


def _stream(actor: StorageNodeActor, checkpoint: Checkpoint, *, skip: int | None = None) -> dict:
    """Send the node's pieces as the coordinator does; returns the digests to finish with."""
    header = node_restore_header(checkpoint, actor.shards, actor.cfg)
    actor.restore_begin(header)
    digest = RowsDigest()
    for i, chunk in enumerate(node_restore_rows(checkpoint, header, chunk_bytes=SMALL_CHUNK_BYTES)):
        digest.update(chunk.table_name, chunk.records)
        if i != skip:
            actor.restore_rows(chunk.table_name, chunk.row_start, chunk.records)
    return digest.hexdigests()


def _rows(actor: StorageNodeActor) -> dict[str, np.ndarray]:
    """Every record the node holds: {table: float32 [rows, D + S]}."""
    out = {}
    for spec in actor.shards:
        weights, state = actor.read_rows(
            spec.table_name, torch.arange(spec.row_start, spec.row_end)
        )
        out[spec.table_name] = torch.cat([weights, state], dim=1).numpy()
    return out


def _assert_rows_unchanged(actor: StorageNodeActor, before: dict[str, np.ndarray]) -> None:
    """A refused restore left every record of the node as it was."""
    for name, records in _rows(actor).items():
        np.testing.assert_array_equal(records, before[name])


@pytest.mark.parametrize("sparse_optimizer", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_a_node_of_another_plan_is_restored_from_rows_streamed_in_small_chunks(
    tmp_path, sparse_optimizer
):
    checkpoint = _checkpoint(tmp_path, sparse_optimizer)
    actor = _node(tmp_path, num_nodes=3, node=1, sparse_optimizer=sparse_optimizer)
    try:
        spec = next(s for s in actor.shards if s.table_name == "big")
        assert (spec.row_start, spec.row_end) != (0, 300)  # a piece the checkpoint never had
        actor.restore_finish(_stream(actor, checkpoint))
        before = _rows(actor)  # verified, not committed: the node still holds its own rows
        assert actor.stats()["applied_step"] == -1
        actor.restore_commit()
        assert any(not np.array_equal(before[t], rows) for t, rows in _rows(actor).items()), (
            "the commit must replace the node's rows"
        )
        for spec in actor.shards:
            np.testing.assert_array_equal(
                _rows(actor)[spec.table_name],
                checkpoint.table_records(spec.table_name, spec.row_start, spec.row_end),
            )
        stats = actor.stats()
        assert (stats["applied_step"], stats["optimizer_step"]) == (5, 6)
        assert not list((tmp_path / "flash1").glob("ndp-restore-*"))
    finally:
        actor.shutdown()


def test_rows_altered_in_transit_are_refused_and_change_nothing(tmp_path, checkpoint):
    actor = _node(tmp_path)
    try:
        before = _rows(actor)
        digests = _stream(actor, checkpoint)
        table = next(iter(digests))
        with pytest.raises(StorageNodeError, match=f"{table!r} .*sha256 mismatch"):
            actor.restore_finish({**digests, table: "0" * 64})
        _assert_rows_unchanged(actor, before)
        assert actor.stats()["applied_step"] == -1
        assert not list((tmp_path / "flash0").glob("ndp-restore-*"))
    finally:
        actor.shutdown()


def test_rows_out_of_order_are_refused_and_the_restore_dropped(tmp_path, checkpoint):
    actor = _node(tmp_path)
    try:
        with pytest.raises(StorageNodeError, match="piece by piece, in order"):
            _stream(actor, checkpoint, skip=1)
        assert not list((tmp_path / "flash0").glob("ndp-restore-*"))
        with pytest.raises(RuntimeError, match="no restore open"):
            actor.restore_finish({})
    finally:
        actor.shutdown()


def test_a_stream_missing_its_last_rows_is_refused_and_changes_nothing(tmp_path, checkpoint):
    actor = _node(tmp_path)
    try:
        before = _rows(actor)
        header = node_restore_header(checkpoint, actor.shards, actor.cfg)
        chunks = list(node_restore_rows(checkpoint, header, chunk_bytes=SMALL_CHUNK_BYTES))
        digests = _stream(actor, checkpoint, skip=len(chunks) - 1)
        with pytest.raises(StorageNodeError, match="incomplete: rows of"):
            actor.restore_finish(digests)
        _assert_rows_unchanged(actor, before)
        assert not list((tmp_path / "flash0").glob("ndp-restore-*"))
    finally:
        actor.shutdown()


def test_pieces_of_another_node_are_refused_and_change_nothing(tmp_path, checkpoint):
    actor = _node(tmp_path, num_nodes=3, node=0)
    try:
        before = _rows(actor)
        cfg = actor.cfg
        other = plan_shards(cfg).shards_for_node(1, cfg.model.effective_tables())
        header = node_restore_header(checkpoint, other, cfg)
        actor.restore_begin(header)
        digest = RowsDigest()
        for chunk in node_restore_rows(checkpoint, header):
            digest.update(chunk.table_name, chunk.records)
            actor.restore_rows(chunk.table_name, chunk.row_start, chunk.records)
        with pytest.raises(StorageNodeError, match="restore from a checkpoint of the same plan"):
            actor.restore_finish(digest.hexdigests())
        _assert_rows_unchanged(actor, before)
        assert not list((tmp_path / "flash0").glob("ndp-restore-*"))
    finally:
        actor.shutdown()


def test_restore_messages_are_bounded_in_bytes_and_tile_each_piece(checkpoint):
    cfg = tiny_job(num_nodes=3)
    tables = cfg.model.effective_tables()
    for node in range(3):
        header = node_restore_header(
            checkpoint, plan_shards(cfg).shards_for_node(node, tables), cfg
        )
        chunks = list(node_restore_rows(checkpoint, header, chunk_bytes=SMALL_CHUNK_BYTES))
        assert all(c.records.nbytes <= SMALL_CHUNK_BYTES for c in chunks)
        for spec in header.shards:
            ranges = [(c.row_start, c.row_end) for c in chunks if c.table_name == spec.table_name]
            starts, ends = zip(*ranges, strict=True)
            assert starts[0] == spec.row_start and ends[-1] == spec.row_end
            assert list(starts[1:]) == list(ends[:-1])
