"""ndp-train as a `ray job submit` job on a real multi-node Ray cluster (three raylets here).

The cluster runs in a subprocess (`multinode_driver.py`) so that it never meets the
session-wide `ray_session` instance; the driver submits ndp-train through the head's
dashboard (the path docs/cluster.md documents), reads the actors back from the dashboard's
state API and tears down exactly the processes it started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow

CONFIG = {
    "model": {
        "bottom_mlp": [8, 8],
        "top_mlp": [8, 1],
        "tables": [
            {"name": "a", "num_rows": 50, "embedding_dim": 8, "features": ["fa"]},
            {"name": "b", "num_rows": 30, "embedding_dim": 8, "features": ["fb"]},
        ],
    },
    "data": {"source": "synthetic", "synthetic": {"num_samples": 128, "num_val_samples": 32}},
    "train": {"steps": 3, "batch_size": 16, "device": "cpu"},
    "cluster": {
        "num_storage_nodes": 2,
        "num_gpu_workers": 1,
        # the resource names of deploy/configs/cluster.yaml (GPU dropped: no GPU here)
        "storage_node_resources": {"storage_node": 1},
        "gpu_worker_resources": {"gpu_worker": 1},
    },
    "logging": {"progress_bar": False},
}


def test_submitted_job_succeeds_and_the_dashboard_lists_its_actors_where_their_resources_are(
    tmp_path,
):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "run"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run(
        [sys.executable, str(HERE / "multinode_driver.py"), str(config), str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0, (report.get("job_status"), report["stderr_tail"])
    assert report["job_status"] == "SUCCEEDED"

    summary = json.loads((out / "summary.json").read_text())
    assert summary  # the job's ndp-train finished its 3 steps and wrote the run summary

    # the dashboard's state API lists the named actors, all made by the submitted job
    named = {a["name"]: a for a in report["actors"] if a["name"].startswith("ndp-")}
    assert {"ndp-storage-node-0", "ndp-storage-node-1", "ndp-gpu-worker-0"} <= set(named)
    assert {a["job_id"] for a in named.values()} == {report["job_id"]}

    where = {name: a["node_id"] for name, a in named.items()}
    assert where["ndp-storage-node-0"] == report["storage_host"]
    assert where["ndp-storage-node-1"] == report["storage_host"]
    assert where["ndp-gpu-worker-0"] == report["gpu_host"]
    assert report["head"] not in where.values()
