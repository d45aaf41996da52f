"""Resume: a run stopped at step s and resumed ends with the uninterrupted run's model."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from jobs import BATCH, STEPS, assert_same_model, model_of, tiny_job

from ndp.checkpoint import Checkpoint, resolve_checkpoint
from ndp.cli.train import main
from ndp.coordinator import NdpEngine
from ndp.data.loader import build_datasets
from ndp.recovery import ResilientEngine, resume
from ndp.train_loop import training_batches

pytestmark = [pytest.mark.ray]


def _run(engine, cfg, data, start: int, stop: int) -> list[float]:
    batches = training_batches(data, cfg.train.batch_size, stop, start_step=start)
    return [engine.train_step(step, batch) for step, batch in batches]


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory):
    """8 steps straight through (checkpoint after step 3 as a side effect, unused here)."""
    cfg = tiny_job(sparse_optimizer="adam", interval_steps=4)
    data = build_datasets(cfg)[0]
    root = tmp_path_factory.mktemp("straight")
    with NdpEngine(cfg) as engine:
        job = ResilientEngine(engine, cfg, checkpoint_root=root, train_data=data, total_steps=STEPS)
        losses = _run(job, cfg, data, 0, STEPS)
        return losses, model_of(engine, cfg)


@pytest.mark.parametrize("resume_nodes", [2, 3])
def test_stop_at_half_and_resume_gives_the_uninterrupted_model(
    ray_session, tmp_path, uninterrupted, resume_nodes
):
    straight_losses, straight_model = uninterrupted
    cfg = tiny_job(sparse_optimizer="adam", interval_steps=4)
    data = build_datasets(cfg)[0]
    with NdpEngine(cfg) as engine:  # stopped after 4 steps: checkpoint step-3
        job = ResilientEngine(
            engine, cfg, checkpoint_root=tmp_path, train_data=data, total_steps=STEPS
        )
        _run(job, cfg, data, 0, STEPS // 2)
    checkpoint = resolve_checkpoint(tmp_path)
    assert checkpoint.path.name == "step-00000003" and checkpoint.next_step == STEPS // 2

    resumed_cfg = replace(cfg, cluster=replace(cfg.cluster, num_storage_nodes=resume_nodes))
    with NdpEngine(resumed_cfg) as engine:
        assert engine.plan.num_nodes == resume_nodes
        start = resume(engine, checkpoint)
        losses = _run(engine, resumed_cfg, data, start, STEPS)
        model = model_of(engine, resumed_cfg)
    assert start == STEPS // 2
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(straight_losses[STEPS // 2 :]), rtol=0, atol=1e-6
    )
    assert_same_model(model, straight_model)


def test_resume_stages_no_restore_files_on_the_coordinator_s_machine(
    ray_session, tmp_path, uninterrupted, monkeypatch
):
    """Storage nodes share no file system with the coordinator (a real cluster): restoring
    may not create files on its side for them to read. Nodes lay out their restore
    directories under their own flash dir and remove them."""
    straight_losses, straight_model = uninterrupted
    cfg = tiny_job(sparse_optimizer="adam", interval_steps=4)
    data = build_datasets(cfg)[0]
    with NdpEngine(cfg) as engine:
        job = ResilientEngine(
            engine, cfg, checkpoint_root=tmp_path / "ckpt", train_data=data, total_steps=STEPS
        )
        _run(job, cfg, data, 0, STEPS // 2)
    checkpoint = resolve_checkpoint(tmp_path / "ckpt")

    flash_dir = tmp_path / "flash"
    resumed_cfg = replace(
        cfg,
        cluster=replace(cfg.cluster, num_storage_nodes=3),
        storage=replace(cfg.storage, flash_dir=str(flash_dir)),
    )

    def no_local_staging(*args, **kwargs):
        raise AssertionError("import_state staged files on the coordinator's machine")

    with NdpEngine(resumed_cfg) as engine:
        with monkeypatch.context() as patch:  # only in this (the coordinator's) process
            patch.setattr(tempfile, "mkdtemp", no_local_staging)
            patch.setattr(tempfile, "mkstemp", no_local_staging)
            start = resume(engine, checkpoint)
        assert not list(flash_dir.glob("ndp-restore-*"))
        losses = _run(engine, resumed_cfg, data, start, STEPS)
        model = model_of(engine, resumed_cfg)
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(straight_losses[STEPS // 2 :]), rtol=0, atol=1e-6
    )
    assert_same_model(model, straight_model)


def test_ndp_train_resume_continues_a_stopped_run_to_the_uninterrupted_model(ray_session, tmp_path):
    """`ndp-train --resume`: a run that stopped after step 3 (as a coordinator crash leaves it)
    and is resumed writes the final checkpoint an uninterrupted run writes, bit for bit."""
    cfg = tiny_job(sparse_optimizer="adam", interval_steps=4)
    config = tmp_path / "job.yaml"
    config.write_text(cfg.to_yaml())

    def ndp_train(run: str, *flags: str) -> None:
        assert main(["--config", str(config), "--output-dir", str(tmp_path / run), *flags]) == 0

    ndp_train("straight")
    ndp_train("stopped", "--set", f"train.steps={STEPS // 2}")
    ndp_train("stopped", "--resume")

    last = f"checkpoints/step-{STEPS - 1:08d}"
    straight, resumed = (
        Checkpoint(tmp_path / "straight" / last),
        Checkpoint(tmp_path / "stopped" / last),
    )
    exact = {"rtol": 0, "atol": 0}
    torch.testing.assert_close(resumed.dense_model(), straight.dense_model(), **exact)
    torch.testing.assert_close(resumed.dense_optimizer(), straight.dense_optimizer(), **exact)
    assert resumed.sparse_optimizer_step == straight.sparse_optimizer_step
    for table in cfg.model.tables:
        np.testing.assert_array_equal(
            resumed.table_records(table.name, 0, table.num_rows),
            straight.table_records(table.name, 0, table.num_rows),
        )
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["samples"] == (STEPS // 2) * BATCH


def test_a_restore_refused_by_one_node_changes_no_node_and_no_worker(
    ray_session, tmp_path, monkeypatch
):
    """Every node verifies its stream before any node (or the dense half) is replaced."""
    from storage_node import restore as node_restore

    cfg = tiny_job(sparse_optimizer="adagrad", interval_steps=2)
    data = build_datasets(cfg)[0]
    with NdpEngine(cfg) as engine:
        job = ResilientEngine(engine, cfg, checkpoint_root=tmp_path, train_data=data, total_steps=4)
        _run(job, cfg, data, 0, 3)  # a checkpoint after 2 steps, then one more step
        checkpoint = resolve_checkpoint(tmp_path)
        assert checkpoint.next_step == 2
        before = model_of(engine, cfg)

        digests = node_restore.RowsDigest.hexdigests
        calls = {"n": 0}

        def second_node_sends_wrong_digests(self):
            calls["n"] += 1  # the coordinator asks once per node, in node order
            good = digests(self)
            return {t: "0" * 64 for t in good} if calls["n"] == 2 else good

        monkeypatch.setattr(node_restore.RowsDigest, "hexdigests", second_node_sends_wrong_digests)
        with pytest.raises(Exception, match="sha256 mismatch"):
            engine.import_state(checkpoint)
        assert calls["n"] == 2
        assert_same_model(model_of(engine, cfg), before)
        assert [s["applied_step"] for s in engine.node_stats()] == [2, 2]
