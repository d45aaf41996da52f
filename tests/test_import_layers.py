"""Dependencies point one way: the import-linter contracts in pyproject.toml hold, cover every
module, and break when a module imports across a layer (docs/architecture.md, "Layers")."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("ndp", "storage_node", "gpu_worker", "protos")
CLIENT_SIDE = {"client", "codec", "rpc_methods", "auth", "tls", "errors", "wire_writer"}
"""The storage node's client and the wire modules it needs: what a GPU worker may import."""
PROCESS_SETTINGS = {"process_env"}
"""Allocator settings for the processes at either end of the wire (`gpu_worker.actor`)."""


def contracts() -> dict[str, dict]:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {contract["id"]: contract for contract in config["contracts"]}


def children(package: str) -> set[str]:
    """Direct submodules and subpackages of a package (names without the package)."""
    folder = REPO_ROOT / package
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    return modules | {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_lint_imports_keeps_every_contract():
    result = lint_imports(REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(contracts())} kept, 0 broken" in result.stdout


def test_every_ndp_module_sits_in_a_layer():
    layered = {
        name.strip()
        for layer in contracts()["layers"]["layers"]
        for name in layer.replace("|", ":").split(":")
    }
    missing = {f"ndp.{name}" for name in children("ndp")} - layered
    assert not missing, f"add {sorted(missing)} to a layer of the `layers` contract"


def test_every_storage_node_module_is_client_side_or_internal():
    forbidden = {
        m.removeprefix("storage_node.") for m in contracts()["node-client"]["forbidden_modules"]
    }
    unclassified = children("storage_node") - forbidden - CLIENT_SIDE - PROCESS_SETTINGS
    assert not unclassified, (
        f"storage_node.{sorted(unclassified)}: forbid it to GPU workers in the `node-client` "
        "contract, or name it client-side here and in docs/architecture.md"
    )
    assert not forbidden & (CLIENT_SIDE | PROCESS_SETTINGS)


def test_a_storage_node_importing_the_coordinator_breaks_the_layers(tmp_path):
    for package in PACKAGES:
        shutil.copytree(
            REPO_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "storage_node" / "stats.py", "a") as module:
        module.write("\nimport ndp.coordinator  # noqa: E402\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "storage_node.stats -> ndp.coordinator" in result.stdout
