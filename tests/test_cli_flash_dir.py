"""`ndp-train` on a flash directory that cannot hold the shard files: exit 2, one short line.

The storage nodes find the problem inside their Ray actors; the line must still be the node's
own message, not the actor's traceback folded into one 1,000-character line (unit tests of
each case are in tests/storage/test_flash_dir_errors.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tmpfs_mounts import tmpfs_mounts

NDP_TRAIN = Path(sys.executable).parent / "ndp-train"
TINY_NDP = [
    "--mode", "ndp",
    "--set", "train.steps=2",
    "--set", "train.batch_size=64",
    "--set", "train.eval_batches=1",
    "--set", "logging.progress_bar=false",
    "--set", "model.max_rows_per_table=500",
]  # fmt: skip


@pytest.mark.slow
def test_a_full_flash_dir_exits_2_with_the_node_s_one_line_naming_the_bytes(tmp_path):
    with tmpfs_mounts(tmp_path) as mount:
        flash_dir = mount(64 << 10)
        result = subprocess.run(
            [str(NDP_TRAIN), *TINY_NDP, "--set", f"storage.flash_dir={flash_dir}"],
            cwd=tmp_path,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        left_behind = [name for name in os.listdir(flash_dir) if name.endswith(".shard")]

    assert result.returncode == 2, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("ndp-train: error:")]
    assert len(line) < 300, line
    assert f"storage.flash_dir {flash_dir}:" in line and "bytes free" in line
    assert "ray::" not in line and "Traceback" not in result.stderr
    assert left_behind == []
