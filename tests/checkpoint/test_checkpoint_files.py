"""Checkpoint files without actors: atomic writes, retention, verification, re-slicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from jobs import tiny_job

from ndp.checkpoint import (
    Checkpoint,
    CheckpointError,
    EngineState,
    TableChunk,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    remove_partial_checkpoints,
    resolve_checkpoint,
    write_checkpoint,
)


def _state(value: float, *, fail_after_chunks: int | None = None) -> EngineState:
    def chunks():
        for i, (lo, hi) in enumerate([(0, 100), (100, 300)]):
            if fail_after_chunks is not None and i >= fail_after_chunks:
                raise RuntimeError("simulated crash while writing")
            rows = np.arange(lo, hi, dtype=np.float32)[:, None]
            yield TableChunk("big", lo, hi, np.repeat(rows + value, 16, axis=1))
        yield TableChunk("small", 0, 40, np.full((40, 16), value, np.float32))

    return EngineState(
        dense_model={"w": torch.full((2,), value)},
        dense_optimizer={"state": {}},
        tables=chunks(),
        sparse_optimizer_step=3,
        plan={"num_nodes": 2},
    )


def test_a_crash_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    cfg = tiny_job()
    write_checkpoint(tmp_path, _state(1.0), next_step=4, cfg=cfg)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_checkpoint(tmp_path, _state(2.0, fail_after_chunks=1), next_step=8, cfg=cfg)
    loaded = resolve_checkpoint(tmp_path)
    assert loaded.next_step == 4
    assert loaded.dense_model()["w"].tolist() == [1.0, 1.0]


def test_a_killed_writer_s_temp_dir_is_ignored_and_cleaned(tmp_path):
    cfg = tiny_job()
    good = write_checkpoint(tmp_path, _state(1.0), next_step=4, cfg=cfg)
    partial = tmp_path / "step-00000007.tmp-deadbeef"
    (partial / "tables").mkdir(parents=True)
    (partial / "manifest.json").write_text("{")  # as a process killed mid-write leaves it
    assert latest_checkpoint(tmp_path) == good
    assert remove_partial_checkpoints(tmp_path) == [partial]
    assert not partial.exists()


def test_retention_keeps_the_newest(tmp_path):
    cfg = tiny_job()
    for step in (2, 4, 6, 8):
        write_checkpoint(tmp_path, _state(step), next_step=step, cfg=cfg)
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005", "step-00000007"]


def test_a_corrupt_file_is_refused_by_name(tmp_path):
    path = write_checkpoint(tmp_path, _state(1.0), next_step=4, cfg=tiny_job())
    chunk = path / "tables" / "big" / "100-300.npy"
    chunk.write_bytes(chunk.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="100-300.npy is corrupt"):
        Checkpoint(path)


def test_an_empty_dir_says_how_to_get_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint.enabled=true"):
        resolve_checkpoint(tmp_path)


def test_rows_are_read_across_chunk_boundaries(tmp_path):
    loaded = Checkpoint(write_checkpoint(tmp_path, _state(0.5), next_step=4, cfg=tiny_job()))
    records = loaded.table_records("big", 90, 150)
    assert records.shape == (60, 16)
    np.testing.assert_array_equal(records[:, 0], np.arange(90, 150) + 0.5)


def test_a_different_table_size_is_refused(tmp_path):
    loaded = Checkpoint(write_checkpoint(tmp_path, _state(0.5), next_step=4, cfg=tiny_job()))
    other = tiny_job()
    from dataclasses import replace

    tables = list(other.model.tables)
    tables[1] = replace(tables[1], num_rows=41)
    other = replace(other, model=replace(other.model, tables=tuple(tables)))
    with pytest.raises(CheckpointError, match="'small'"):
        loaded.check_fits(other)
