"""A checkpoint's manifest is verified like its files: edited, truncated or digest-less
manifests are refused by name, and `--resume` falls back past them to the newest intact one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from jobs import tiny_job

from ndp.checkpoint import (
    MANIFEST_DIGEST,
    Checkpoint,
    CheckpointError,
    EngineState,
    TableChunk,
    manifest_digest,
    resolve_checkpoint,
    sha256_file,
    write_checkpoint,
)
from ndp.cli.train import main


def _state() -> EngineState:
    return EngineState(
        dense_model={"w": torch.ones(2)},
        dense_optimizer={"state": {}},
        tables=[
            TableChunk("big", 0, 300, np.zeros((300, 16), np.float32)),
            TableChunk("small", 0, 40, np.zeros((40, 16), np.float32)),
        ],
        sparse_optimizer_step=3,
    )


def _write(root: Path, next_step: int) -> Path:
    return write_checkpoint(root, _state(), next_step=next_step, cfg=tiny_job())


def _edit_manifest(checkpoint: Path, **fields: object) -> None:
    path = checkpoint / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    path.write_text(json.dumps(manifest, indent=1))


def _truncate_manifest(checkpoint: Path) -> None:
    path = checkpoint / "manifest.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_an_edited_next_step_is_refused_naming_the_manifest(tmp_path):
    checkpoint = _write(tmp_path, next_step=12)
    _edit_manifest(checkpoint, next_step=10)

    with pytest.raises(CheckpointError, match=r"step-00000011/manifest.json fails its digest"):
        Checkpoint(checkpoint)


def test_a_truncated_manifest_is_refused_naming_it(tmp_path):
    checkpoint = _write(tmp_path, next_step=4)
    _truncate_manifest(checkpoint)

    with pytest.raises(CheckpointError, match=r"manifest.json does not parse .* truncated"):
        Checkpoint(checkpoint)


def test_a_file_altered_together_with_its_listed_sha256_is_refused(tmp_path):
    checkpoint = _write(tmp_path, next_step=4)
    model = checkpoint / "dense" / "model.pt"
    torch.save({"w": torch.zeros(2)}, model)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    _edit_manifest(checkpoint, sha256={**manifest["sha256"], "dense/model.pt": sha256_file(model)})

    with pytest.raises(CheckpointError, match="fails its digest"):
        Checkpoint(checkpoint)


def test_a_manifest_without_its_digest_is_refused(tmp_path):
    checkpoint = _write(tmp_path, next_step=4)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    del manifest[MANIFEST_DIGEST]
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(CheckpointError, match="fails its digest"):
        Checkpoint(checkpoint)


def test_a_manifest_with_a_valid_digest_but_a_missing_field_is_named(tmp_path):
    checkpoint = _write(tmp_path, next_step=4)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    del manifest["tables"]
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(CheckpointError, match="'tables' is missing"):
        Checkpoint(checkpoint)


def test_a_manifest_from_before_digests_loads_with_a_warning(tmp_path, caplog):
    """Chosen: format-1 checkpoints (no digest) stay usable; their files are still checked."""
    checkpoint = _write(tmp_path, next_step=4)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    del manifest[MANIFEST_DIGEST]
    manifest["format"] = "ndp-checkpoint/1"
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))

    with caplog.at_level(logging.WARNING, logger="ndp.checkpoint"):
        assert Checkpoint(checkpoint).next_step == 4
    assert "predates manifest digests" in caplog.text and str(checkpoint) in caplog.text


def test_resume_from_a_directory_takes_the_newest_intact_checkpoint_and_names_the_skipped(
    tmp_path, caplog
):
    _write(tmp_path, next_step=4)
    _write(tmp_path, next_step=8)
    _edit_manifest(_write(tmp_path, next_step=12), next_step=10)

    with caplog.at_level(logging.WARNING, logger="ndp.checkpoint"):
        checkpoint = resolve_checkpoint(tmp_path)

    assert checkpoint.path.name == "step-00000007" and checkpoint.next_step == 8
    skipped, resumed = caplog.messages
    assert "skipping checkpoint step-00000011" in skipped and "fails its digest" in skipped
    assert "resuming from step-00000007" in resumed


def test_a_directory_of_only_broken_checkpoints_is_refused_naming_the_newest(tmp_path):
    _truncate_manifest(_write(tmp_path, next_step=4))
    _edit_manifest(_write(tmp_path, next_step=8), next_step=6)

    with pytest.raises(CheckpointError, match=r"no intact checkpoint .* all 2 .*step-00000007"):
        resolve_checkpoint(tmp_path)


DAMAGES = {
    "truncated": _truncate_manifest,
    "next_step edited": lambda checkpoint: _edit_manifest(checkpoint, next_step=2),
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_ndp_train_resume_path_to_a_broken_checkpoint_exits_2_naming_its_manifest(
    tmp_path, capsys, damage
):
    checkpoint = _write(tmp_path / "ckpt", next_step=4)
    damage(checkpoint)
    config = tmp_path / "job.yaml"
    config.write_text(tiny_job().to_yaml())

    status = main(
        [
            "--config",
            str(config),
            "--resume",
            str(checkpoint),
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )

    assert status == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{checkpoint}/manifest.json" in line and "Traceback" not in line
    assert not (tmp_path / "run").exists()
