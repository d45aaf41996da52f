"""The repository's set-up contract: package metadata, pinned CPU set, quick start, CI, data."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU_LOCK = REPO_ROOT / "requirements.lock"
NODEPS_LOCK = REPO_ROOT / "requirements-nodeps.lock"
CUDA_LOCK = REPO_ROOT / "requirements-cuda.lock"
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup_env.sh"


def pins(lock: Path) -> dict[str, str]:
    """{distribution name (lower case): version} of a lock file; every entry must be pinned.

    Extras are dropped from the name (`ray[default]` -> `ray`); `extras` reads them.
    """
    result = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("--"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"{lock.name}: {line!r} is not pinned with =="
        result[name.split("[", 1)[0].strip().lower()] = version.strip()
    return result


def extras(lock: Path) -> dict[str, set[str]]:
    """{distribution name (lower case): extras} of the lock file's entries that name extras."""
    result = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\[([^\]]*)\]\s*==", line.split("#", 1)[0])
        if match:
            result[match[1].lower()] = {e.strip() for e in match[2].split(",")}
    return result


def test_pyproject_declares_the_three_packages_the_console_scripts_and_python_311():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["requires-python"] == ">=3.11"
    scripts = project["project"]["scripts"]
    assert {"ndp-train", "ndp-bench", "ndp-data"} <= set(scripts)
    assert scripts["ndp-train"] == "ndp.cli.train:main"
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in ("ndp", "storage_node", "gpu_worker"):
        assert f"{package}*" in include
        assert (REPO_ROOT / package / "__init__.py").is_file()
    assert project["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    assert "ruff" in project["tool"]


def test_cpu_lock_pins_the_verified_set_and_never_the_cuda_fbgemm_wheel():
    cpu = pins(CPU_LOCK)
    assert cpu["torch"] == "2.13.0"
    assert cpu["fbgemm-gpu-cpu"] == "1.8.0"
    assert {"ray", "grpcio", "protobuf", "pyyaml", "numpy", "torchmetrics", "tqdm"} <= set(cpu)
    assert "fbgemm-gpu" not in cpu and "torchrec" not in cpu
    assert pins(NODEPS_LOCK) == {"torchrec": "1.8.0"}
    # the dashboard, the job server (`ray job submit`) and the state API need ray[default]
    assert "default" in extras(CPU_LOCK)["ray"]
    assert {"aiohttp", "aiohttp-cors", "opencensus", "prometheus-client", "py-spy"} <= set(cpu)


def test_cuda_lock_swaps_only_torch_source_and_fbgemm():
    cpu, cuda = pins(CPU_LOCK), pins(CUDA_LOCK)
    assert cuda["fbgemm-gpu"] == "1.8.0" and "fbgemm-gpu-cpu" not in cuda
    assert cuda["torch"] == cpu["torch"]
    assert {k: v for k, v in cuda.items() if k != "fbgemm-gpu"} == {
        k: v for k, v in cpu.items() if k != "fbgemm-gpu-cpu"
    }
    assert extras(CUDA_LOCK) == extras(CPU_LOCK)
    assert "download.pytorch.org" in CUDA_LOCK.read_text()


def test_setup_installs_torchrec_without_its_dependencies_into_dot_venv():
    script = SETUP_SCRIPT.read_text()
    assert "VENV=.venv" in script
    assert re.search(r"pip install .*--no-deps -r \"\$\{LOCKS\[1\]\}\"", script)
    assert "requirements-nodeps.lock" in script
    assert re.search(r'NDP_CUDA:-0}" = "1"', script)  # the CUDA set only on request
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "VENV := .venv" in makefile
    for target in ("train", "test"):
        assert re.search(rf"^{target}: setup$", makefile, re.MULTILINE)


def test_installed_environment_has_no_cuda_fbgemm_on_a_cpu_torch():
    import torch

    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch: the CUDA set is expected here")
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("fbgemm-gpu")
    assert importlib.metadata.version("fbgemm-gpu-cpu") == pins(CPU_LOCK)["fbgemm-gpu-cpu"]
    assert importlib.metadata.version("torchrec") == pins(NODEPS_LOCK)["torchrec"]


def _quick_start_commands() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_readme_quick_start_is_exactly_two_commands():
    assert _quick_start_commands() == ["make train", "make test"]


def test_ci_runs_the_readmes_test_command_and_nothing_else():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    commands = [
        line.strip()
        for line in ci.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
        and not line.startswith(("set ", "cd "))
    ]  # fmt: skip
    assert commands == [f"exec {_quick_start_commands()[1]}"]
    assert os.access(REPO_ROOT / ".ci" / "run", os.X_OK)


def _venv_is_current() -> bool:
    """True when `make setup` would do nothing (so running .ci/run installs nothing)."""
    stamp = REPO_ROOT / ".venv" / ".ndp-installed"
    if not stamp.is_file() or Path(sys.prefix).resolve() != (REPO_ROOT / ".venv").resolve():
        return False
    text = b"".join(p.read_bytes() for p in (CPU_LOCK, NODEPS_LOCK, REPO_ROOT / "pyproject.toml"))
    return stamp.read_text().strip() == hashlib.sha256(text).hexdigest()


def _env_without_make_overrides(**extra: str) -> dict[str, str]:
    """This process's environment minus what an outer `make` hands down: under `make test
    ARGS=...` MAKEFLAGS carries that ARGS, which would override the inner run's ARGS and run
    the whole suite inside this test."""
    inherited = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    return {**env, **extra}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "passes"),
    [
        ("def test_ok():\n    assert True\n", True),
        ("def test_broken():\n    assert False\n", False),
        ("# no tests: pytest exits 5, which must not count as a pass\n", False),
    ],
    ids=["passing", "failing", "no-tests-collected"],
)
def test_ci_fails_exactly_when_the_tests_do_not_pass(body, passes, tmp_path):
    if not _venv_is_current():
        pytest.skip(
            "run from the project's up-to-date .venv (make setup) so .ci/run installs nothing"
        )
    test_file = tmp_path / "test_probe.py"
    test_file.write_text(body)
    result = subprocess.run(
        [str(REPO_ROOT / ".ci" / "run")],
        env=_env_without_make_overrides(ARGS=f"-p no:cacheprovider {test_file}"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert (result.returncode == 0) is passes, result.stdout + result.stderr


def test_shipped_criteo_sample_matches_its_checksum_and_carries_its_licence():
    data = REPO_ROOT / "data"
    expected, name = (data / "SHA256SUMS").read_text().split()
    assert name == "criteo_day0_sample.tsv"
    assert hashlib.sha256((data / name).read_bytes()).hexdigest() == expected
    attribution = (data / "README.md").read_text()
    assert "CC BY-NC-SA 4.0" in attribution and "Criteo" in attribution
