"""Run ndp-train on a three-node Ray cluster on this machine and report where actors ran.

Run as a script by `test_multinode.py` (never imported by pytest): it needs a Ray of its own,
which must not meet the session's `ray_session` instance in one process. Prints one JSON line:
{"rc": ..., "nodes": {node_id: resources}, "actors": [{"name", "node_id", "state"}], ...}.

The cluster is made of real raylet processes (`ray.cluster_utils.Cluster`): a head with no
ndp resources, node A advertising `storage_node: 2`, node B advertising `gpu_worker: 1`.
`Cluster.shutdown()` stops exactly these processes (never `ray stop`, which would kill
every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402


def main(config_path: str, output_dir: str) -> int:
    temp_dir = tempfile.mkdtemp(prefix="ndp-mn-", dir="/tmp")  # short: unix socket paths
    common = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**common, "num_cpus": 1, "temp_dir": temp_dir, "resources": {"head": 1}},
    )
    report: dict = {}
    try:
        storage = cluster.add_node(**common, num_cpus=1, resources={"storage_node": 2})
        gpu = cluster.add_node(**common, num_cpus=1, resources={"gpu_worker": 1})
        cluster.wait_for_nodes()
        report["storage_host"] = storage.node_id
        report["gpu_host"] = gpu.node_id
        report["head"] = cluster.head_node.node_id
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        train = subprocess.run(
            [
                os.path.join(os.path.dirname(sys.executable), "ndp-train"),
                "--config",
                config_path,
                "--address",
                cluster.address,
                "--output-dir",
                output_dir,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
        )
        report["rc"] = train.returncode
        report["stderr_tail"] = train.stderr[-3000:]
        # Inspect the GCS's actor table (dead actors stay listed) from a fresh driver.
        ray.init(address=cluster.address, log_to_driver=False)
        report["actors"] = [
            {"name": a.get("Name", ""), "node_id": a["Address"]["NodeID"], "state": a["State"]}
            for a in ray._private.state.actors().values()
        ]
        ray.shutdown()
    finally:
        cluster.shutdown()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
