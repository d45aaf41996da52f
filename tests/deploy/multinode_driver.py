"""Submit ndp-train as a Ray job to a three-node cluster on this machine; report where actors ran.

Run as a script by `test_multinode.py` (never imported by pytest): it needs a Ray of its own,
which must not meet the session's `ray_session` instance in one process. Prints one JSON line:
{"rc", "job_status", "stderr_tail", "dashboard", "job_id", "storage_host", "gpu_host", "head",
"temp_dir", "actors": [{"name", "node_id", "state", "job_id"}]}.

The cluster is made of real raylet processes (`ray.cluster_utils.Cluster`): a head with no
ndp resources that runs Ray's dashboard (and so the job server and the state API) on
127.0.0.1 and a free port, node A advertising `storage_node: 2`, node B advertising
`gpu_worker: 1`. ndp-train goes in the way docs/cluster.md documents it, `ray job submit
--address http://127.0.0.1:PORT -- ndp-train ... --address auto`; the actors are then read
from the dashboard's state API (`ray.util.state.list_actors`), which is what the dashboard's
actor page shows. `Cluster.shutdown()` stops exactly the processes this script started
(never `ray stop`, which would kill every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from ray.cluster_utils import Cluster  # noqa: E402

JOB_TIMEOUT_S = 150
BIN = os.path.dirname(sys.executable)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keep_address_in(temp_dir: str) -> None:
    """Make `Cluster` record its address in `temp_dir` instead of /tmp/ray.

    Why: `Cluster` writes the machine-wide /tmp/ray/ray_current_cluster (what `auto` means
    to every Ray user here) and deletes it at shutdown, which would redirect or break other
    Ray users on this machine. And the job server resolves the `RAY_ADDRESS` it gives a job
    from `<temp_dir>/ray_current_cluster`; without that file, `auto` falls back to any GCS
    process on the machine, so the job could join someone else's Ray.
    """
    import ray._common.utils
    import ray._private.utils

    write, reset = ray._private.utils.write_ray_address, ray._common.utils.reset_ray_address
    ray._private.utils.write_ray_address = lambda address, _=None: write(address, temp_dir)
    ray._common.utils.reset_ray_address = lambda _=None: reset(temp_dir)


def wait_for_job_agent(cluster: Cluster, timeout_s: float) -> bool:
    """Wait until the head's dashboard agent (which runs submitted jobs) has registered.

    Why: the job server gives up after 10 s without an agent ("No available agent to submit
    job"), and on a busy machine the head's agent can take longer than that to come up.
    """
    from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD
    from ray._raylet import GcsClient
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX

    gcs = GcsClient(address=cluster.gcs_address)
    key = f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{cluster.head_node.node_id}".encode()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gcs.internal_kv_get(key, namespace=KV_NAMESPACE_DASHBOARD):
            return True
        time.sleep(0.5)
    return False


def main(config_path: str, output_dir: str) -> int:
    temp_dir = tempfile.mkdtemp(prefix="ndp-mn-", dir="/tmp")  # short: unix socket paths
    port = free_port()
    dashboard = f"http://127.0.0.1:{port}"
    common = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    head = {
        **common,
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": port,
        # a port of its own for the head's agent (which runs the jobs), not the default 52365
        # that any other Ray on this machine may hold; the other nodes get one anyway
        "dashboard_agent_listen_port": None,
        "num_cpus": 1,
        "temp_dir": temp_dir,
        "resources": {"head": 1},
    }
    keep_address_in(temp_dir)
    cluster = Cluster(initialize_head=True, head_node_args=head)
    report: dict = {"dashboard": dashboard, "rc": 1, "stderr_tail": "", "temp_dir": temp_dir}
    submission_id = f"ndp-multinode-{os.getpid()}"
    try:
        storage = cluster.add_node(**common, num_cpus=1, resources={"storage_node": 2})
        gpu = cluster.add_node(**common, num_cpus=1, resources={"gpu_worker": 1})
        cluster.wait_for_nodes()
        report["storage_host"] = storage.node_id
        report["gpu_host"] = gpu.node_id
        report["head"] = cluster.head_node.node_id
        if wait_for_job_agent(cluster, timeout_s=60):
            run_job(config_path, output_dir, dashboard, submission_id, report)
        else:
            report["stderr_tail"] = "the head's dashboard agent did not register in 60 s"
    finally:
        cluster.shutdown()
    if report["rc"] == 0:
        shutil.rmtree(temp_dir, ignore_errors=True)  # kept, with Ray's logs, on failure
    print(json.dumps(report))
    return 0


def run_job(
    config_path: str, output_dir: str, dashboard: str, submission_id: str, report: dict
) -> None:
    """Submit ndp-train with `ray job submit`, wait (bounded) for it, list the actors."""
    # The documented path: the jobs CLI against the head's dashboard.
    submit = subprocess.run(
        [
            os.path.join(BIN, "ray"),
            "job",
            "submit",
            "--address",
            dashboard,
            "--no-wait",
            "--submission-id",
            submission_id,
            "--runtime-env-json",
            json.dumps({"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}}),
            "--",
            os.path.join(BIN, "ndp-train"),
            "--config",
            config_path,
            "--address",
            "auto",
            "--output-dir",
            output_dir,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if submit.returncode != 0:
        report["stderr_tail"] = (submit.stdout + submit.stderr)[-3000:]
        return
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    client = JobSubmissionClient(dashboard)
    status = None
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            status = client.get_job_status(submission_id).value
            if status in TERMINAL or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        report["job_status"] = status
        report["job_id"] = client.get_job_info(submission_id).job_id
        report["stderr_tail"] = client.get_job_logs(submission_id)[-3000:]
        # What the dashboard's actor page shows (dead actors stay listed after the job).
        report["actors"] = [
            {"name": a.name or "", "node_id": a.node_id, "state": a.state, "job_id": a.job_id}
            for a in list_actors(address=dashboard, limit=1000, raise_on_missing_output=False)
        ]
        report["rc"] = 0 if status == "SUCCEEDED" else 1
    finally:
        if status not in TERMINAL:  # the bounded wait ran out: stop the job before its nodes
            client.stop_job(submission_id)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
