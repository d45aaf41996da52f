"""deploy/ must name the resources, entry points and install step that the code uses."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from ndp.config import load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _yaml(path: str):
    return yaml.safe_load((DEPLOY / path).read_text())


def _console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.fixture(scope="module")
def cluster_cfg():
    return load_config(DEPLOY / "configs" / "cluster.yaml")


def test_cluster_config_asks_for_the_custom_resources(cluster_cfg):
    assert cluster_cfg.cluster.storage_node_resources == {"storage_node": 1}
    assert cluster_cfg.cluster.gpu_worker_resources == {"GPU": 1, "gpu_worker": 1}
    assert Path(cluster_cfg.data.path).is_file()


def test_cluster_launcher_node_types_offer_what_the_config_asks_for(cluster_cfg):
    launcher = _yaml("ray-cluster.yaml")
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    storage, gpu = types["storage_node"]["resources"], types["gpu_worker"]["resources"]
    for key, amount in cluster_cfg.cluster.storage_node_resources.items():
        assert storage.get(key, 0) >= amount
    for key, amount in cluster_cfg.cluster.gpu_worker_resources.items():
        assert gpu.get(key, 0) >= amount
    # storage nodes must not be placeable on GPU machines or the head, and vice versa
    assert "storage_node" not in gpu and "gpu_worker" not in storage
    assert not {"storage_node", "gpu_worker"} & set(types["head"]["resources"])


def _group_resources(group: dict) -> dict[str, float]:
    params = group["rayStartParams"]
    raw = params.get("resources", "{}").strip().strip('"').replace('\\"', '"')
    resources = {k: float(v) for k, v in json.loads(raw).items()}
    if "num-gpus" in params:
        resources["GPU"] = float(params["num-gpus"])
    return resources


def test_kuberay_cluster_groups_offer_what_the_job_config_asks_for():
    cluster = _yaml("kuberay/raycluster.yaml")
    job = _yaml("kuberay/rayjob.yaml")
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] in _console_scripts() and argv[0] == "ndp-train"
    assert argv[argv.index("--address") + 1] == "auto"
    config_path = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(REPO / config_path, overrides)

    groups = {g["groupName"]: _group_resources(g) for g in cluster["spec"]["workerGroupSpecs"]}
    for key, amount in cfg.cluster.storage_node_resources.items():
        assert groups["storage-node"].get(key, 0) >= amount
    for key, amount in cfg.cluster.gpu_worker_resources.items():
        assert groups["gpu-worker"].get(key, 0) >= amount
    assert "gpu_worker" not in groups["storage-node"]
    assert "storage_node" not in groups["gpu-worker"]
    assert cluster["spec"]["rayVersion"] == _pinned("ray")
    # a RayJob goes through the head's job server, which only ray[default] has
    assert "default" in _pinned_extras("ray")
    # the cluster authenticates every caller, and the job keeps Ray's own node addresses
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in job["spec"]["runtimeEnvYAML"]


def _pinned_line(package: str) -> re.Match:
    for line in (REPO / "requirements.lock").read_text().splitlines():
        match = re.match(rf"{re.escape(package)}(?:\[([^\]]*)\])?==([^\s#]+)", line)
        if match:
            return match
    raise AssertionError(f"{package} not pinned in requirements.lock")


def _pinned(package: str) -> str:
    return _pinned_line(package)[2]


def _pinned_extras(package: str) -> set[str]:
    extras = _pinned_line(package)[1] or ""
    return {e.strip() for e in extras.split(",") if e.strip()}


def test_dockerfile_installs_with_setup_env_and_selects_cuda_by_build_arg():
    text = (DEPLOY / "Dockerfile").read_text()
    run_lines = [line for line in text.splitlines() if line.startswith("RUN ")]
    assert any("bash scripts/setup_env.sh" in line and "NDP_CUDA=" in line for line in run_lines)
    assert "ARG NDP_CUDA=0" in text
    assert (REPO / "scripts" / "setup_env.sh").is_file()
    # everything setup_env.sh reads must be copied into the image before it runs
    before = text.split("RUN NDP_CUDA=", 1)[0]
    for needed in (
        "requirements.lock",
        "requirements-cuda.lock",
        "requirements-nodeps.lock",
        "pyproject.toml",
        "scripts/",
    ):
        assert needed in before
    for package in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]:
        assert f"COPY {package.rstrip('*')}/" in before
    # the default command is an installed entry point on a config the image holds
    command = json.loads(text.split("\nCMD ", 1)[1].splitlines()[0])
    assert command[0] in _console_scripts()
    config = command[command.index("--config") + 1]
    assert (REPO / config).is_file() and f"COPY {config.split('/')[0]}/" in text


def test_documented_entry_points_exist():
    scripts = _console_scripts()
    docs = (REPO / "docs" / "cluster.md").read_text()
    for command in ("ndp-train", "ndp-storage-node"):
        assert command in scripts
        assert command in docs
    module, _, func = scripts["ndp-storage-node"].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))
