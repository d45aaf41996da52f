"""Checkpoint files without actors: atomic writes, retention, schedule, verification, re-slicing."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from jobs import tiny_job

import ndp.checkpoint
from ndp.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointSchedule,
    EngineState,
    TableChunk,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    remove_partial_checkpoints,
    resolve_checkpoint,
    restore_rng_state,
    write_checkpoint,
)
from ndp.config import load_config


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


def test_a_checkpoint_holds_config_plan_rng_position_and_a_checksum_of_every_file(tmp_path):
    cfg = tiny_job()
    torch.manual_seed(11)
    path = write_checkpoint(tmp_path, _state(1.0), next_step=4, cfg=cfg)
    expected_draw = torch.rand(3)
    loaded = Checkpoint(path)
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert set(loaded.manifest["sha256"]) == files - {"manifest.json"}
    assert {"config.yaml", "plan.json", "rng.pt", "dense/model.pt", "dense/optimizer.pt"} <= files
    assert loaded.next_step == 4 and loaded.sparse_optimizer_step == 3
    assert loaded.plan() == {"num_nodes": 2}
    (tmp_path / "run.yaml").write_text(loaded.config_yaml())
    assert load_config(tmp_path / "run.yaml") == cfg
    torch.rand(5)
    restore_rng_state(loaded.rng_state())
    assert torch.equal(torch.rand(3), expected_draw)


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


class _Crash(BaseException):
    """The writing process dies here: nothing after it touches the disk."""


def _die_at(monkeypatch, crash_point) -> None:
    """Make the process 'die' at the first os.rename/shutil.rmtree for which `crash_point`
    is true: that call and every later rename/rmtree (clean-up handlers too) raise `_Crash`."""
    rename, rmtree = os.rename, shutil.rmtree
    dead = False

    def guard(name, real):
        def call(path, *args, **kwargs):
            nonlocal dead
            dead = dead or crash_point(name, Path(path))
            if dead:
                raise _Crash(f"{name}({path})")
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "rename", guard("rename", rename))
    monkeypatch.setattr(shutil, "rmtree", guard("rmtree", rmtree))


def test_a_crash_between_setting_a_step_aside_and_renaming_its_rewrite_in_keeps_it_loadable(
    tmp_path, monkeypatch
):
    cfg = tiny_job()
    write_checkpoint(tmp_path, _state(1.0), next_step=4, cfg=cfg)
    _die_at(monkeypatch, lambda name, path: name == "rename" and ".tmp-" in path.name)
    with pytest.raises(_Crash):
        write_checkpoint(tmp_path, _state(2.0), next_step=4, cfg=cfg)
    monkeypatch.undo()
    assert not (tmp_path / "step-00000003").exists()  # the crash hit between the renames
    loaded = resolve_checkpoint(tmp_path)
    assert loaded.next_step == 4
    assert loaded.dense_model()["w"].tolist() == [1.0, 1.0]
    remove_partial_checkpoints(tmp_path)  # what the next run's schedule does first
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003"]
    assert Checkpoint(tmp_path / "step-00000003").dense_model()["w"].tolist() == [1.0, 1.0]


def test_a_crash_before_the_replaced_step_is_deleted_loads_the_rewrite(tmp_path, monkeypatch):
    cfg = tiny_job()
    write_checkpoint(tmp_path, _state(1.0), next_step=4, cfg=cfg)
    _die_at(monkeypatch, lambda name, path: name == "rmtree" and ".old-" in path.name)
    with pytest.raises(_Crash):
        write_checkpoint(tmp_path, _state(2.0), next_step=4, cfg=cfg)
    monkeypatch.undo()
    assert len(list(tmp_path.iterdir())) == 2  # the rewrite and the old copy set aside
    assert resolve_checkpoint(tmp_path).dense_model()["w"].tolist() == [2.0, 2.0]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003"]
    remove_partial_checkpoints(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003"]


def test_a_failed_rename_of_a_rewrite_puts_the_old_step_back(tmp_path, monkeypatch):
    cfg = tiny_job()
    write_checkpoint(tmp_path, _state(1.0), next_step=4, cfg=cfg)
    rename = os.rename

    def refuse_the_rewrite(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError("simulated: no space left")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", refuse_the_rewrite)
    with pytest.raises(OSError, match="simulated"):
        write_checkpoint(tmp_path, _state(2.0), next_step=4, cfg=cfg)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003"]
    assert Checkpoint(tmp_path / "step-00000003").dense_model()["w"].tolist() == [1.0, 1.0]


def test_every_directory_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced: list[Path] = []
    fsync_dir = ndp.checkpoint._fsync_dir
    monkeypatch.setattr(
        ndp.checkpoint, "_fsync_dir", lambda path: (synced.append(path), fsync_dir(path))
    )
    write_checkpoint(tmp_path, _state(1.0), next_step=4, cfg=tiny_job())
    assert synced[-1] == tmp_path  # the rename itself
    inside = {Path(*path.relative_to(tmp_path).parts[1:]) for path in synced[:-1]}
    assert inside == {
        Path(),
        Path("dense"),
        Path("tables"),
        Path("tables/big"),
        Path("tables/small"),
    }
    assert all(".tmp-" in path.relative_to(tmp_path).parts[0] for path in synced[:-1])


def test_retention_keeps_the_newest(tmp_path):
    cfg = tiny_job()
    for step in (2, 4, 6, 8):
        write_checkpoint(tmp_path, _state(step), next_step=step, cfg=cfg)
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005", "step-00000007"]


class _Engine:
    """Hands over a fresh `_state` at every barrier (what `NdpEngine.export_state` does)."""

    def export_state(self) -> EngineState:
        return _state(1.0)


def test_each_scheduled_save_keeps_only_the_newest_keep_last(tmp_path):
    schedule = CheckpointSchedule(tiny_job(interval_steps=2, keep_last=2), tmp_path)
    saved = [schedule.maybe_save(_Engine(), steps_done) for steps_done in range(1, 9)]
    assert [path.name for path in saved if path is not None] == [
        "step-00000001",
        "step-00000003",
        "step-00000005",
        "step-00000007",
    ]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005", "step-00000007"]


def test_interval_minutes_is_due_once_the_minutes_since_the_last_save_have_passed(tmp_path):
    now = [0.0]
    schedule = CheckpointSchedule(tiny_job(interval_minutes=10), tmp_path, clock=lambda: now[0])
    assert not schedule.due(1)
    now[0] = 599.0
    assert not schedule.due(2)
    now[0] = 600.0
    assert schedule.due(3)
    schedule.save(_Engine(), 3)
    assert not schedule.due(3)  # that step is saved already
    now[0] = 1199.0
    assert not schedule.due(4)  # the ten minutes count from the save, not from the start
    now[0] = 1200.0
    assert schedule.due(5)


def test_steps_and_minutes_together_checkpoint_at_whichever_comes_first(tmp_path):
    now = [0.0]
    schedule = CheckpointSchedule(
        tiny_job(interval_steps=4, interval_minutes=1), tmp_path, clock=lambda: now[0]
    )
    assert [schedule.due(s) for s in (1, 2, 3, 4)] == [False, False, False, True]
    now[0] = 60.0
    assert schedule.due(5)


def test_a_disabled_schedule_is_never_due(tmp_path):
    now = [0.0]
    # the config refuses intervals without `enabled` (tests/faults/test_strict_config.py);
    # the schedule must still never fire on a config built past that check
    job = tiny_job(enabled=True, interval_steps=1, interval_minutes=1)
    job = replace(job, checkpoint=replace(job.checkpoint, enabled=False))
    schedule = CheckpointSchedule(
        job,
        tmp_path,
        clock=lambda: now[0],
    )
    now[0] = 3600.0
    assert not any(schedule.due(s) for s in range(1, 5))


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
