"""Runs own their directories: one run at a time per output, checkpoint and flash directory."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from tmpfs_mounts import tmpfs_mounts

import ndp.dir_lock
from ndp.cli.train import main
from ndp.dir_lock import (
    LOCK_FILE,
    DirInUseError,
    DirNotWritableError,
    RunIdentity,
    claim_dir,
    claim_dirs,
)

_HOLD = (
    "import sys; from ndp.dir_lock import claim_dir; claim_dir(sys.argv[1], role='test'); "
    "print('held', flush=True); sys.stdin.read()"
)


@contextmanager
def _run_holding(directory: Path) -> Iterator[subprocess.Popen]:
    """Another process ("the other run") that holds `directory` until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_the_lock_file_names_the_run_by_pid_host_start_time_and_command(tmp_path):
    with claim_dir(tmp_path, role="--output-dir"):
        identity = json.loads((tmp_path / LOCK_FILE).read_text())

    assert identity["pid"] == os.getpid() and identity["host"] == socket.gethostname()
    assert identity["started"][:4].isdigit() and identity["command"]


def test_a_directory_held_by_another_run_is_refused_naming_it_and_the_run(tmp_path):
    with _run_holding(tmp_path) as other:
        with pytest.raises(DirInUseError) as refused:
            claim_dir(tmp_path, role="--output-dir")

    message = str(refused.value)
    assert message.startswith(f"--output-dir: {tmp_path} is in use by another run")
    assert f"pid {other.pid} on host {socket.gethostname()}" in message


def test_a_directory_is_released_when_its_run_ends_even_by_an_error(tmp_path, caplog):
    with pytest.raises(RuntimeError), claim_dir(tmp_path, role="--output-dir"):
        raise RuntimeError("the run failed")

    assert not (tmp_path / LOCK_FILE).exists()
    with caplog.at_level(logging.WARNING), claim_dir(tmp_path, role="--output-dir"):
        pass
    assert not caplog.records


def test_a_lock_left_by_a_killed_run_is_named_and_taken_over_with_a_warning(tmp_path, caplog):
    with _run_holding(tmp_path) as other:
        os.kill(other.pid, signal.SIGKILL)
        other.wait(timeout=30)
        assert (tmp_path / LOCK_FILE).exists()

        with caplog.at_level(logging.WARNING, logger="ndp.dir_lock"):
            lock = claim_dir(tmp_path, role="storage.flash_dir")

    with lock:
        assert RunIdentity.from_json((tmp_path / LOCK_FILE).read_text()).pid == os.getpid()
    (warning,) = caplog.messages
    assert f"storage.flash_dir: taking over {tmp_path}" in warning
    assert f"pid {other.pid}" in warning and "that process is gone" in warning


def test_directories_claimed_together_are_all_taken_or_none(tmp_path):
    free, held = tmp_path / "free", tmp_path / "held"
    with _run_holding(held), pytest.raises(DirInUseError, match="storage.flash_dir"):
        claim_dirs([("--output-dir", free), ("storage.flash_dir", held)])

    assert not (free / LOCK_FILE).exists()


def test_a_directory_named_by_two_settings_is_claimed_once(tmp_path):
    with claim_dirs([("--output-dir", tmp_path), ("checkpoint.dir", tmp_path / ".")]) as locks:
        assert len(locks.locks) == 1


def test_a_claimer_never_holds_a_lock_file_its_releaser_unlinked(tmp_path, monkeypatch):
    """The releaser unlinks between the claimer's open and its flock: the claimer must lock
    the file now at the path, not the unlinked one, or two runs would both hold the dir."""
    first = claim_dir(tmp_path, role="first")
    real_flock = ndp.dir_lock.fcntl.flock
    calls = []

    def flock_after_release(fd: int, operation: int) -> None:
        if not calls:
            first.release()
        calls.append(fd)
        real_flock(fd, operation)

    monkeypatch.setattr(ndp.dir_lock.fcntl, "flock", flock_after_release)
    with claim_dir(tmp_path, role="second"):
        monkeypatch.setattr(ndp.dir_lock.fcntl, "flock", real_flock)
        assert len(calls) == 2
        with pytest.raises(DirInUseError):
            claim_dir(tmp_path, role="third")


@pytest.mark.parametrize(
    ("setting", "flags"),
    [
        ("--output-dir", ["--mode", "reference"]),
        ("storage.flash_dir", ["--set", "storage.flash_dir={held}"]),
        ("checkpoint.dir", ["--set", "checkpoint.enabled=true", "--set", "checkpoint.dir={held}"]),
    ],
)
def test_ndp_train_into_a_directory_another_run_holds_exits_2_naming_it_and_the_run(
    tmp_path, capsys, setting, flags
):
    held = tmp_path / "held"
    output_dir = held if setting == "--output-dir" else tmp_path / "run"
    tiny = ["--set", "train.steps=2", "--set", "model.max_rows_per_table=100"]
    args = [*tiny, *(flag.format(held=held) for flag in flags), "--output-dir", str(output_dir)]

    with _run_holding(held) as other:
        status = main(args)

    assert status == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{setting}: {held} is in use by another run (pid {other.pid}" in line
    assert sorted(p.name for p in held.iterdir()) == [LOCK_FILE]
    assert not (output_dir / "metrics.jsonl").exists()


def test_a_directory_on_a_read_only_file_system_is_one_line_naming_it_and_the_errno(tmp_path):
    with tmpfs_mounts(tmp_path) as mount:
        read_only = mount(64 * 1024, read_only=True)
        with pytest.raises(DirNotWritableError) as caught:
            claim_dir(read_only / "flash", role="storage.flash_dir")
    message = str(caught.value)
    assert "storage.flash_dir" in message and str(read_only / "flash") in message
    assert "EROFS" in message and "\n" not in message and "O_DIRECT" not in message
