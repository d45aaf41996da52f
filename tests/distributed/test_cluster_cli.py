"""The cluster path of docs/cluster.md as a user walks it: `ray start` by hand, token auth on.

Three "machines" on this one: a head, a storage machine (`storage_node: 1`) and a worker
machine (`gpu_worker: 1`), each started with the `ray` CLI exactly as docs/cluster.md says,
each with a home of its own (where `ray get-auth-token --generate` writes the token on the
head and the token is copied to the others, as a user would copy it) and a Ray temp dir of
its own (`--temp-dir` is per node; without it a joining node would share the head's).

Why 127.0.0.2/.3/.4 and not 127.0.0.1: a joining `ray start` rewrites 127.0.0.1 and
localhost, in `--address` and in `--node-ip-address`, to the machine's network address
(Ray's `resolve_ip_for_localhost`), so the nodes would talk over the network interface (and
could not reach a head whose node address is 127.0.0.1). Other loopback addresses are taken
as given, so every connection stays on loopback (Ray's GCS and raylets still listen on all
interfaces, as on a real cluster; the token is what guards them).

Only the processes started here are stopped, by their sessions (each `ray start` runs in a
session of its own): never `ray stop`, which stops every Ray on the machine. No `auto`
address is used outside the job (whose `auto` the head's job server resolves from its own
temp dir): `auto` on this machine could find someone else's Ray. Every command runs with
its machine's HOME and no RAY_* variable of this process, so your own `~/.ray/auth_token`
and the test session's Ray are neither read nor touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
HEAD_IP, STORAGE_IP, WORKER_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"
MODULE_BUDGET_S = 240
"""Hard bound on the whole module (cluster start, every run, the stop); it takes 70-90 s on
two shared cores at load 2-3, 105 s at load 5 and 150 s at load 8."""
START_TIMEOUT_S = 60
RUN_TIMEOUT_S = 120

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
    "train": {"steps": 3, "batch_size": 16, "device": "cpu", "eval_batches": 1},
    "cluster": {
        "num_storage_nodes": 1,
        "num_gpu_workers": 1,
        # the resource names of deploy/configs/cluster.yaml (GPU dropped: no GPU here)
        "storage_node_resources": {"storage_node": 1},
        "gpu_worker_resources": {"gpu_worker": 1},
    },
    "logging": {"progress_bar": False},
}


class Budget:
    """The time left to the module: every subprocess waits at most that long."""

    def __init__(self, total_s: float) -> None:
        self.deadline = time.monotonic() + total_s

    def left(self, cap_s: float) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"the module's {MODULE_BUDGET_S} s budget is spent")
        return min(cap_s, remaining)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(home: Path) -> dict[str, str]:
    """This process's environment without any Ray setting, as on a fresh machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@dataclass
class Machine:
    """One pretend machine: its home (with `.ray/auth_token`) and its Ray temp dir."""

    name: str
    ip: str
    root: Path
    sessions: list[int] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.root / self.name / "home"

    @property
    def temp_dir(self) -> Path:
        return self.root / self.name / "ray"

    def env(self, **extra: str) -> dict[str, str]:
        return {**clean_env(self.home), **extra}

    def start(self, *args: str, **extra_env: str) -> subprocess.Popen:
        """`RAY_AUTH_MODE=token ray start ...`, in a session of its own (its Ray processes
        stay in it after `ray start` returns, which is how they are found and stopped)."""
        agent_port = free_port()  # not the default 52365 another Ray here may hold
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", *args]
            + [f"--node-ip-address={self.ip}", f"--temp-dir={self.temp_dir}", "--num-cpus=1"]
            + [f"--dashboard-agent-listen-port={agent_port}", "--disable-usage-stats"],
            env=self.env(RAY_AUTH_MODE="token", **extra_env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.sessions.append(proc.pid)
        return proc


def wait_started(proc: subprocess.Popen, what: str, budget: Budget) -> None:
    out, _ = proc.communicate(timeout=budget.left(START_TIMEOUT_S))
    assert proc.returncode == 0, f"{what}: ray start failed:\n{out[-3000:]}"


def processes_of(sessions: list[int], root: Path) -> list[int]:
    """Pids in `sessions`, or whose command line names `root` (a Ray process that left its
    session would still name its temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        session = int(stat.rsplit(")", 1)[1].split()[4])
        if (session in sessions or f"{root}/" in cmdline) and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def stop_processes(sessions: list[int], root: Path, grace_s: float = 3.0) -> list[int]:
    """SIGTERM what the sessions started, SIGKILL what is left after `grace_s`; return the
    pids still alive after that (zombies aside)."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_of(sessions, root):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and processes_of(sessions, root):
            time.sleep(0.5)
            alive = [p for p in processes_of(sessions, root) if not _zombie(p)]
            if not alive:
                return []
    return [p for p in processes_of(sessions, root) if not _zombie(p)]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@dataclass
class HandStartedCluster:
    head: Machine
    storage: Machine
    worker: Machine
    gcs_address: str
    dashboard: str
    config: Path
    root: Path
    budget: Budget

    def ray_list(self, what: str) -> list[dict]:
        """`ray list nodes|actors` against the head's dashboard, as a user on the head."""
        done = subprocess.run(
            [str(BIN / "ray"), "list", what, "--address", self.dashboard]
            + ["--format", "json", "--detail", "--limit", "1000"],
            env=self.head.env(RAY_AUTH_MODE="token"),
            capture_output=True,
            text=True,
            timeout=self.budget.left(60),
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    def ndp_actors_of(self, job_id: str) -> dict[str, str]:
        """{actor name: node id} of the ndp actors the job made (dead ones stay listed)."""
        return {
            a["name"]: a["node_id"]
            for a in self.ray_list("actors")
            if a["job_id"] == job_id and (a.get("name") or "").startswith("ndp-")
        }

    def node_ids(self) -> dict[str, str]:
        """Node id of each machine, found by the resource it advertises."""
        ids = {}
        for node in self.ray_list("nodes"):
            resources = node["resources_total"]
            if node["is_head_node"]:
                ids["head"] = node["node_id"]
            elif "storage_node" in resources:
                ids["storage"] = node["node_id"]
            elif "gpu_worker" in resources:
                ids["worker"] = node["node_id"]
        return ids


@pytest.fixture(scope="module")
def cluster(request):
    budget = Budget(MODULE_BUDGET_S)
    root = Path(tempfile.mkdtemp(prefix="ndp-cc-", dir="/tmp"))  # short: unix socket paths
    head, storage, worker = (
        Machine("head", HEAD_IP, root),
        Machine("storage", STORAGE_IP, root),
        Machine("worker", WORKER_IP, root),
    )
    machines = (head, storage, worker)
    for machine in machines:
        machine.home.mkdir(parents=True)
    port, dashboard_port = free_port(), free_port()
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    failed_before = request.session.testsfailed
    try:
        # on the head: make the token (saved in ~/.ray/auth_token), then start the head
        made = subprocess.run(
            [str(BIN / "ray"), "get-auth-token", "--generate"],
            env=head.env(),
            capture_output=True,
            text=True,
            timeout=budget.left(60),
        )
        assert made.returncode == 0, made.stderr
        token_file = head.home / ".ray" / "auth_token"
        assert made.stdout.strip() == token_file.read_text().strip()
        for other in (storage, worker):  # "copy the head's token to each machine"
            (other.home / ".ray").mkdir()
            shutil.copy(token_file, other.home / ".ray" / "auth_token")
        wait_started(
            head.start(
                "--head",
                f"--port={port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
            ),
            "head",
            budget,
        )
        address = f"{HEAD_IP}:{port}"
        joining = [
            storage.start(f"--address={address}", """--resources={"storage_node": 1}"""),
            worker.start(f"--address={address}", """--resources={"gpu_worker": 1}"""),
        ]
        for proc, name in zip(joining, ("storage", "worker"), strict=True):
            wait_started(proc, name, budget)
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        yield HandStartedCluster(head, storage, worker, address, dashboard, config, root, budget)
    finally:
        left = stop_processes([s for m in machines for s in m.sessions], root)
        assert not left, f"Ray processes of this test still running: {left}"
        if request.session.testsfailed == failed_before:  # else kept, with Ray's logs
            shutil.rmtree(root, ignore_errors=True)


def start_ndp_train(cluster: HandStartedCluster, run: str, **env: str) -> subprocess.Popen:
    """`ndp-train --address HEAD_IP:PORT` on the head, writing into `run`."""
    return subprocess.Popen(
        [str(BIN / "ndp-train"), "--config", str(cluster.config), "--address"]
        + [cluster.gcs_address, "--output-dir", str(cluster.root / run)],
        env=cluster.head.env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ndp_train_joins_with_ray_auth_mode_token_and_says_what_to_set_without_it(cluster):
    """The same join twice, at once: as documented, and without RAY_AUTH_MODE (the token is
    in ~/.ray/auth_token either way, as on the head). Run side by side because both spend
    most of their time importing torch."""
    documented = start_ndp_train(cluster, "run-direct", RAY_AUTH_MODE="token")
    # one connection attempt instead of Ray's default 20, one a second
    refused = start_ndp_train(cluster, "refused", RAY_gcs_server_port_wait_time_s="1")
    _, refused_stderr = refused.communicate(timeout=cluster.budget.left(RUN_TIMEOUT_S))
    _, documented_stderr = documented.communicate(timeout=cluster.budget.left(RUN_TIMEOUT_S))

    assert refused.returncode == 2, refused_stderr[-3000:]
    assert "Traceback" not in refused_stderr
    last = refused_stderr.strip().splitlines()[-1]
    assert last.startswith(f"ndp-train: error: cluster.address {cluster.gcs_address}:")
    assert "set RAY_AUTH_MODE=token" in last and "~/.ray/auth_token" in last
    assert not (cluster.root / "refused" / "summary.json").exists()

    assert documented.returncode == 0, documented_stderr[-3000:]
    summary = json.loads((cluster.root / "run-direct" / "summary.json").read_text())
    assert summary["steps"] == 3
    nodes = cluster.node_ids()
    jobs = cluster.ray_list("jobs")
    (driver,) = [j for j in jobs if j["type"] == "DRIVER" and not j.get("submission_id")]
    where = cluster.ndp_actors_of(driver["job_id"])
    assert where == {"ndp-storage-node-0": nodes["storage"], "ndp-gpu-worker-0": nodes["worker"]}


def test_a_wrong_token_is_refused_naming_where_it_came_from(cluster):
    join = (
        f"from ndp.ray_local import init_local_ray; init_local_ray(address='{cluster.gcs_address}')"
    )
    env = cluster.head.env(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 32, RAY_gcs_server_port_wait_time_s="1"
    )
    done = subprocess.run(
        [sys.executable, "-c", join],
        env=env,
        capture_output=True,
        text=True,
        timeout=cluster.budget.left(60),
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ndp.errors.ConfigError: cluster.address {cluster.gcs_address}: ")
    assert "refused the token in RAY_AUTH_TOKEN, which is not the cluster's" in last


def test_ray_job_submit_runs_ndp_train_on_the_cluster(cluster):
    out = cluster.root / "run-job"
    submit = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--"]
    submit += ["ndp-train", "--config", str(cluster.config), "--address", "auto"]
    submit += ["--output-dir", str(out)]
    # without RAY_AUTH_MODE the job server refuses the submission
    refused = subprocess.run(
        submit,
        env=cluster.head.env(),
        capture_output=True,
        text=True,
        timeout=cluster.budget.left(60),
    )
    assert refused.returncode != 0
    assert "Authentication required" in refused.stdout + refused.stderr

    done = subprocess.run(
        submit,
        env=cluster.head.env(RAY_AUTH_MODE="token"),
        capture_output=True,
        text=True,
        timeout=cluster.budget.left(RUN_TIMEOUT_S),
    )
    jobs = [j for j in cluster.ray_list("jobs") if j.get("type") == "SUBMISSION"]
    statuses = [(j["status"], j.get("message")) for j in jobs]
    assert done.returncode == 0, (statuses, (done.stdout + done.stderr)[-3000:])
    assert [status for status, _ in statuses] == ["SUCCEEDED"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3

    nodes = cluster.node_ids()
    where = cluster.ndp_actors_of(jobs[0]["job_id"])
    assert where == {"ndp-storage-node-0": nodes["storage"], "ndp-gpu-worker-0": nodes["worker"]}
