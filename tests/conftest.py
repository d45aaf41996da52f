"""Shared fixtures: one local Ray instance per test session, kept on loopback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from tls_certs import make_test_certs

from storage_node.tls import TlsFiles

REPO_ROOT = Path(__file__).resolve().parent.parent
CRITEO_SAMPLE = REPO_ROOT / "data" / "criteo_day0_sample.tsv"


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance on 127.0.0.1 shared by every test that needs actors (no dashboard:
    it starts faster)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from ndp.ray_local import init_local_ray

    init_local_ray(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def one_torch_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def criteo_sample() -> Path:
    return CRITEO_SAMPLE


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory) -> TlsFiles:
    """A test CA and a node certificate for 127.0.0.1 / localhost (needs the openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make test certificates")
    return make_test_certs(tmp_path_factory.mktemp("tls"))
